"""Shared prompt KV: a prompt's K/V held once in a prompt slot, its samples' row slots holding
only their own tokens, gives the logits of the unshared layout (every row a full copy), on
ragged batches, after rollback and after a slot is refilled with another prompt's sample.

Both layouts run the same calls side by side: prefill each prompt once, fan it out to its rows
(copy vs link), then steps of ragged widths in scrambled slot order, rollbacks, a refill.
"""

from __future__ import annotations

import pytest
import torch

from specbatch.models.cache import CacheLayout, plan_shared_cache, prompt_slots_for
from specbatch.models import load_model, load_tokenizer
from tests.tiny import make_tiny_checkpoint
from tests.twin import Side, Twin, ragged_script

CONFIGS = {
    "llama-gqa": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "mistral-sliding": dict(arch="mistral", sliding_window=5),
    "qwen3": dict(arch="qwen3"),
}
ROWS, ROW_LEN, PROMPTS, PROMPT_LEN = 6, 24, 3, 16


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / request.param, vocab_size=48, seed=7,
                                **CONFIGS[request.param])
    return load_model(path, dtype=torch.float32)


def twin(model) -> Twin:
    """The unshared layout (the reference: every row a full copy) and the shared one, one model."""
    unshared = model.new_cache(ROWS + 1, PROMPT_LEN + ROW_LEN)  # the last slot prefills
    shared = model.new_cache(ROWS, ROW_LEN, prompt_slots=PROMPTS, prompt_len=PROMPT_LEN)
    return Twin(Side(model, unshared, lambda p: ROWS), Side(model, shared, lambda p: ROWS + p), ROWS,
                model.config.vocab_size)


def test_shared_prompt_logits_equal_the_unshared_layout(model):
    ragged_script(twin(model), wide=18)  # W > 16: the other mask kind


def test_dense_groups_and_contiguous_prompt_slots_take_views_with_equal_logits(model, monkeypatch):
    """Rows that are equal runs of one prompt each (in the slot order attention runs in) take the
    dense path (no scatter into group matrices), other rows the scatter path; prompt slots that
    are a contiguous run are read as a view of the pool, others gathered. Logits equal the
    unshared layout's in every case, and each call takes the paths its rows call for."""
    from specbatch.models import llama

    taken = []

    def recording(q, own_k, own_v, prefix_k, prefix_v, bias, group, rank, *args, **kwargs):
        taken.append(("dense" if group is None else "scatter", "view" if prefix_k._base is not None else "gather"))
        return attention(q, own_k, own_v, prefix_k, prefix_v, bias, group, rank, *args, **kwargs)

    attention = llama.shared_prefix_attention
    monkeypatch.setattr(llama, "shared_prefix_attention", recording)
    pair = twin(model)
    pair.admit([5, 9, 11, 3, 7], [0, 1, 2], prompt_slot=0)
    pair.admit([12, 4, 4, 8], [3, 4, 5], prompt_slot=2)
    script = [
        ([0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], ("dense", "gather")),  # two runs of three; prompt slots 0, 2
        ([4, 1, 5, 0, 3, 2], [2, 1, 3, 1, 2, 1], ("dense", "gather")),  # scrambled: dense in slot order
        ([0, 1, 3, 4, 5], [1, 2, 1, 1, 1], ("scatter", "gather")),  # groups of 2 and 3
        ([2, 1], [1, 1], ("dense", "view")),  # one prompt
        ("refill", None, None),  # rows 1 and 4 become samples of a third prompt, in prompt slot 1
        ([0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], ("scatter", "view")),  # groups interleave in slot order
        ([0, 2, 3, 5], [2, 1, 1, 3], ("dense", "gather")),  # not a run of slots: the caller's order
        ([3, 5, 0, 2], [2, 1, 1, 3], ("scatter", "gather")),  # ... here with the groups out of order
        ([1, 4, 3, 5], [1, 1, 1, 1], ("dense", "view")),
    ]
    for slots, widths, paths in script:
        if slots == "refill":
            pair.reset([1, 4])
            pair.admit([30, 31, 32], [1, 4], prompt_slot=1)
            continue
        taken.clear()
        pair.step(slots, widths)
        assert taken == [paths] * model.config.num_hidden_layers, (slots, taken[:1])


def test_a_row_rolled_back_into_its_prompt_is_refused(model):
    pair = twin(model)
    pair.admit([5, 9, 11, 3], [0], prompt_slot=0)
    pair.b.cache.set_lengths([0], [2])  # below its prefix of 3
    with pytest.raises(ValueError, match="rolled back into its shared prompt"):
        model(torch.tensor([[1]]), pair.b.cache, torch.tensor([0]), torch.tensor([1]))


def test_rows_of_one_prompt_read_its_prompt_slot_and_hold_only_their_tokens(model):
    cache = model.new_cache(ROWS, ROW_LEN, prompt_slots=PROMPTS, prompt_len=PROMPT_LEN)
    prompt = torch.arange(1, 13)[None]  # [1, 12]
    model(prompt, cache, torch.tensor([ROWS + 1]), torch.tensor([12]), last_only=True)
    cache.copy_prefix(ROWS + 1, [0, 1, 2, 3], 12)
    assert cache.prefix_of[:4].tolist() == [1] * 4 and cache.prefix_len[:4].tolist() == [12] * 4
    model(torch.ones(4, 1, dtype=torch.int64), cache, torch.arange(4), torch.ones(4, dtype=torch.int64))
    assert cache.lengths[:4].tolist() == [13] * 4  # logical lengths
    assert torch.count_nonzero(cache.k[0][:4, :, 1:]) == 0  # own regions: one token each, at index 0


def test_the_planner_fits_rows_by_completion_length():
    class Config:  # a demo-model-sized KV: 30 layers x 3 KV heads x 64
        num_hidden_layers, num_key_value_heads, head_dim = 30, 3, 64

    per_token = 2 * 30 * 3 * 64 * 2  # bfloat16
    budget = 200 * 1600 * per_token  # 200 rows of 1600 tokens, unshared
    layout = plan_shared_cache(Config, budget, max_len=1600, max_rows=4096, row_len=100, samples_per_prompt=16,
                               dtype=torch.bfloat16)
    assert layout.prompt_len == 1599 and layout.max_len == 100
    assert layout.prompt_slots == prompt_slots_for(layout.num_slots, 16)
    assert layout.tokens() * per_token <= budget < CacheLayout(layout.num_slots + 1, 100, prompt_slots_for(layout.num_slots + 1, 16), 1599).tokens() * per_token
    assert layout.num_slots >= 5 * 200  # five times the rows of the unshared layout


# ---------------------------------------------------------------------------------------------
# Through the engine: the same seeds give the same samples in both layouts


@pytest.fixture(scope="module")
def pair_of_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-shared")
    target = make_tiny_checkpoint(root / "target", vocab_size=48, seed=11, num_layers=2)
    draft = make_tiny_checkpoint(root / "draft", vocab_size=48, seed=12, num_layers=1)
    return load_model(target, dtype=torch.float32), load_model(draft, dtype=torch.float32), load_tokenizer(target)


def _generate(models, shared: bool, drafter_kind: str, max_batch: int = 8):
    from specbatch.engine.drafting.model import ModelDrafter
    from specbatch.engine.drafting.ngram import NgramDrafter
    from specbatch.engine.engine import Engine, EngineConfig
    from specbatch.engine.request import Request
    from specbatch.sampling.warping import SamplingParams

    target, draft, tok = models
    drafter = {"none": None, "ngram": NgramDrafter(1, 3), "model": ModelDrafter(draft, 48)}[drafter_kind]
    params = SamplingParams(n=5, max_new_tokens=9, temperature=0.9, top_k=20, seed=4, ignore_eos=True)
    prompts = [[1 + (i * 7 + j * 3) % 40 for j in range(3 + i % 9)] for i in range(11)]  # ragged prompts
    prompts[3] = [17]  # one token: nothing to prefill
    config = EngineConfig(max_batch_size=max_batch, num_draft_tokens=3, measure_cost=False, max_model_len=40,
                          samples_per_prompt=params.n, max_new_tokens=params.max_new_tokens, share_prompt_kv=shared)
    engine = Engine(target, tok, drafter, config)
    assert engine.cache.shared == shared
    with torch.inference_mode():
        outs = engine.generate([Request(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert not [o.error for o in outs if o.error]
    return [(o.sample_index, o.token_ids) for o in outs], engine


@pytest.mark.parametrize("drafter_kind", ["none", "ngram", "model"])
def test_the_engine_samples_the_same_tokens_in_both_layouts(pair_of_models, drafter_kind):
    """11 prompts x 5 samples through 8 rows: prompts overlap, slots refill, prompt slots turn
    over; the shared layout's logits equal the unshared ones to rounding, so with the same
    seeds every sample's tokens are the same."""
    shared, engine = _generate(pair_of_models, True, drafter_kind)
    unshared, _ = _generate(pair_of_models, False, drafter_kind)
    assert shared == unshared
    assert engine.layout.prompt_slots == prompt_slots_for(8, 5) < 8


def test_a_prompt_slot_freed_under_its_running_samples_changes_them(pair_of_models):
    """Mutant: live rows do not hold their prompt slot, so the next prompt is prefilled into it
    while the previous prompt's samples still read it."""
    from unittest import mock

    from specbatch.engine import engine as engine_mod

    want, _ = _generate(pair_of_models, False, "ngram")
    with mock.patch.object(engine_mod.PromptSlots, "hold", lambda self, slot, count: None):
        got, _ = _generate(pair_of_models, True, "ngram")
    assert got != want


def test_completions_longer_than_the_planned_rows_are_error_rows(pair_of_models):
    from specbatch.engine.engine import Engine, EngineConfig
    from specbatch.engine.request import Request
    from specbatch.sampling.warping import SamplingParams

    target, _, tok = pair_of_models
    engine = Engine(target, tok, None, EngineConfig(max_batch_size=4, measure_cost=False, max_model_len=40,
                                                    samples_per_prompt=2, max_new_tokens=5))
    outs = engine.generate([Request("long", [1, 2, 3], SamplingParams(n=2, max_new_tokens=6)),
                            Request("fits", [1, 2, 3], SamplingParams(n=2, max_new_tokens=5, ignore_eos=True))])
    assert [o.finish_reason for o in outs] == ["error", "error", "length", "length"]
    assert "max_new_tokens 6 exceeds the 5 completion tokens" in outs[0].error
    assert [len(o.token_ids) for o in outs[2:]] == [5, 5]
