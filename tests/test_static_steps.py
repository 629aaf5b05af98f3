"""Static steps (specbatch.models.steps): the forward a CUDA graph captures gives the eager
forward's logits and cache lengths, on ragged batches in both KV layouts, after rollback and
slot refill; padding lands in the cache's tail; the setting's refusals are one line each.

The eager and the static model are two loads of one checkpoint making the same calls side by
side; on the CPU the static forward's attention is the slot-attention torch reference.
"""

from __future__ import annotations

import pytest
import torch

from specbatch.jobs.spec import SpecError, spec_from_dict
from specbatch.models import load_model
from specbatch.models.steps import StaticSteps, batch_buckets, use_static_steps
from tests.tiny import make_tiny_checkpoint
from tests.twin import Side, Twin, ragged_script

CONFIGS = {
    "llama-gqa": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "mistral-sliding": dict(arch="mistral", sliding_window=5),
    "qwen3": dict(arch="qwen3"),
}
ROWS, ROW_LEN, PROMPTS, PROMPT_LEN, WIDTH = 6, 24, 3, 16, 6


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("static") / request.param, vocab_size=48, seed=7,
                                **CONFIGS[request.param])


def twin(checkpoint, shared: bool) -> Twin:
    """An eager (reference) and a static-step load of the checkpoint, each with its own cache."""
    eager = load_model(checkpoint, dtype=torch.float32)
    static = load_model(checkpoint, dtype=torch.float32)
    use_static_steps(static, WIDTH, ROWS, graphs=False)
    if shared:
        make = lambda m: m.new_cache(ROWS, ROW_LEN, prompt_slots=PROMPTS, prompt_len=PROMPT_LEN)  # noqa: E731
        prefill_slot = lambda p: ROWS + p  # noqa: E731
    else:
        make = lambda m: m.new_cache(ROWS + 1, PROMPT_LEN + ROW_LEN)  # noqa: E731 (the last slot prefills)
        prefill_slot = lambda p: ROWS  # noqa: E731
    return Twin(Side(eager, make(eager), prefill_slot), Side(static, make(static), prefill_slot), ROWS, 48)


@pytest.mark.parametrize("layout", ["unshared", "shared"])
def test_static_steps_give_the_eager_logits(checkpoint, layout):
    ragged_script(twin(checkpoint, shared=layout == "shared"), wide=WIDTH)


def test_a_row_filled_to_its_slot_keeps_its_tokens_when_the_step_is_padded(checkpoint):
    """A row at its slot's last position in a step padded wider than it: its padding writes go
    to the tail (without one they would fall outside the slot, or onto its tokens if clamped)."""
    pair = twin(checkpoint, shared=False)
    prompt = list(range(1, PROMPT_LEN))
    pair.admit(prompt, [0, 1], prompt_slot=0)
    full = PROMPT_LEN + ROW_LEN
    pair.rollback([0], [full - 1])  # slot 0 holds one position less than its max_len
    pair.step([0, 1], [1, WIDTH])  # row 0 fills its slot; the step is WIDTH wide
    cache = pair.b.cache
    assert cache.k[0].shape[2] == full + WIDTH and cache.tail == WIDTH
    pair.rollback([0], [full - 2])
    pair.step([0], [1])  # its last tokens' K/V are intact: the same logits as eager


def test_a_cache_without_a_tail_is_refused(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    cache = model.new_cache(2, 16)  # made before the steps became static
    use_static_steps(model, WIDTH, 2, graphs=False)
    with pytest.raises(ValueError, match="needs a cache tail of 1 positions, this cache has 0"):
        model(torch.ones(2, 1, dtype=torch.int64), cache, torch.tensor([0, 1]), torch.tensor([1, 1]))


def test_the_mode_is_chosen_once_and_refused_where_it_cannot_run(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    assert isinstance(use_static_steps(model, 3, 4, graphs=False), StaticSteps) and model.steps.max_width == 3
    assert model.new_cache(2, 8).tail == 3
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        use_static_steps(load_model(checkpoint, dtype=torch.float32), 3, 4, graphs=True)
    compiled = load_model(checkpoint, dtype=torch.float32)
    compiled.compiled_body = compiled.body
    with pytest.raises(ValueError, match="choose compile or CUDA graphs"):
        use_static_steps(compiled, 3, 4, graphs=False)
    with pytest.raises(ValueError, match="max_width must be >= 1"):
        use_static_steps(load_model(checkpoint, dtype=torch.float32), 0, 4, graphs=False)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    with pytest.raises(ValueError):
        batch_buckets(0)


def _spec(**target):
    return {"name": "j", "input": {"path": "in.parquet"}, "output": {"path": "out"},
            "models": {"target": {"path": "m", **target}}}


def test_the_spec_setting_is_refused_where_it_cannot_run():
    assert spec_from_dict(_spec()).models.target.cuda_graphs is None
    with pytest.raises(SpecError, match=r"models\.target\.cuda_graphs: true needs a GPU per actor"):
        spec_from_dict({**_spec(cuda_graphs=True), "resources": {"gpus_per_actor": 0}})
    with pytest.raises(SpecError, match="exclude each other"):
        spec_from_dict(_spec(cuda_graphs=True, compile=True))
    assert spec_from_dict(_spec(cuda_graphs=True)).models.target.cuda_graphs is True
    # null keeps the fingerprints of specs written before the setting; a chosen value is part of it
    assert spec_from_dict(_spec()).fingerprint() != spec_from_dict(_spec(cuda_graphs=False)).fingerprint()


def test_null_means_graphs_on_a_gpu_for_a_native_model_not_compiled(checkpoint):
    from specbatch.jobs.build import _cuda_graphs

    model = load_model(checkpoint, dtype=torch.float32)
    target = spec_from_dict(_spec()).models.target
    assert _cuda_graphs(target, model, "cuda") is True
    assert _cuda_graphs(target, model, "cpu") is False
    assert _cuda_graphs(target.model_copy(update={"compile": True}), model, "cuda") is False
    assert _cuda_graphs(target.model_copy(update={"cuda_graphs": False}), model, "cuda") is False
    assert _cuda_graphs(target, object(), "cuda") is False  # not the native backend
