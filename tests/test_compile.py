"""The opt-in compiled step (specbatch.models.compile) against the eager forward (float32, CPU).

Compiling a tiny model takes tens of seconds per kind of step, so one module-scoped compiled
model serves every test here, and the steps below are chosen to meet each kind once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.models import load_model, load_tokenizer
from specbatch.models.compile import compile_steps
from specbatch.engine.request import Request
from specbatch.sampling.warping import SamplingParams
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("compile"), vocab_size=32, hidden_size=32,
                                num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def models(ckpt):
    """(compiled, eager) copies of one tiny checkpoint, plus a list counting compiled calls."""
    compiled, eager = load_model(ckpt), load_model(ckpt)
    inner = compile_steps(compiled, max_width=4, autotune=False)  # autotuning: its own test below
    calls: list[int] = []

    def counting(*args):
        calls.append(1)
        return inner(*args)

    compiled.compiled_body = counting
    return compiled, eager, calls


def test_compiled_steps_match_eager_logits_and_cache(models):
    """Prefill eager, then steps of every kind: batch 1 and 3, width 1 and ragged width 3, rows in
    and out of slot order; logits and the written cache agree with the eager model's."""
    compiled, eager, calls = models
    caches = [m.new_cache(4, 32) for m in (compiled, eager)]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 32, (3, 6), generator=g)

    def both(tokens, slots, num_tokens, last_only=False):
        slots, num_tokens = torch.tensor(slots), torch.tensor(num_tokens)
        with torch.inference_mode():  # as the engine runs it: the next test reuses these compiled kinds
            return [m(tokens, c, slots, num_tokens, last_only=last_only) for m, c in zip((compiled, eager), caches)]

    a, b = both(prompts, [0, 1, 2], [6, 4, 5], last_only=True)  # prefill: eager in both
    assert not calls
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    steps = [
        (torch.randint(2, 32, (3, 1), generator=g), [0, 1, 2], [1, 1, 1]),
        (torch.randint(2, 32, (3, 3), generator=g), [0, 1, 2], [3, 1, 2]),  # ragged verify step
        (torch.randint(2, 32, (2, 3), generator=g), [2, 0], [2, 3]),        # out of slot order
        (torch.randint(2, 32, (1, 1), generator=g), [1], [1]),
        (torch.randint(2, 32, (2, 1), generator=g), [3, 1], [1, 1]),        # a fresh slot: no prefix
    ]
    for i, (tokens, slots, num_tokens) in enumerate(steps):
        a, b = both(tokens, slots, num_tokens)
        assert len(calls) == i + 1, "a step ran eager"
        for row, n in enumerate(num_tokens):  # padding positions are unspecified
            torch.testing.assert_close(a[row, :n], b[row, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[0].lengths, caches[1].lengths, atol=0, rtol=0)
    for kc, ke in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(kc, ke, atol=1e-5, rtol=1e-5)


def test_every_kind_of_step_traces_as_one_graph(ckpt):
    """No graph break in the compiled body: ragged steps (some rows with fewer tokens), rows out
    of slot order, and rows reading a shared prompt slot.  A break would split the step at every
    layer, and dynamo would then compile each layer's frame separately (one variant per layer's
    weights), so a deep model would pass the recompile limit and silently run eager."""
    from specbatch.models.llama import _Plan

    model = load_model(ckpt)
    model.unpack()
    g = torch.Generator().manual_seed(2)
    unshared, shared = model.new_cache(4, 32), model.new_cache(4, 16, prompt_slots=1, prompt_len=16)
    steps = [  # (cache, width, slots, num_tokens)
        (unshared, 3, [0, 1, 2], [3, 1, 2]),
        (unshared, 3, [2, 0], [2, 3]),
        (shared, 1, [0, 1, 2], [1, 1, 1]),
        (shared, 3, [2, 0, 1], [3, 1, 2]),
    ]
    with torch.inference_mode():
        model(torch.randint(2, 32, (3, 6), generator=g), unshared, torch.arange(3), torch.tensor([6, 4, 5]), last_only=True)
        model(torch.randint(2, 32, (1, 6), generator=g), shared, torch.tensor([4]), torch.tensor([6]), last_only=True)
        shared.copy_prefix(4, [0, 1, 2], 6)
        for cache, width, slots, num_tokens in steps:
            slots, num_tokens = torch.tensor(slots), torch.tensor(num_tokens)
            plan = _Plan(model, cache, slots, num_tokens, width)
            x = torch.nn.functional.embedding(torch.randint(2, 32, (len(slots), width), generator=g), model.embed)
            traced = torch._dynamo.explain(model.body)(x, cache.k, cache.v, plan, None)
            assert traced.graph_break_count == 0, [b.reason for b in traced.break_reasons]
            cache.lengths.index_add_(0, slots, num_tokens)


def test_engine_on_compiled_target_gives_the_eager_rows(models, ckpt):
    """Same seeds, same rows: compiled logits differ from eager ones by rounding only, far below
    what would move an inverse-CDF draw on these peaked distributions.  The n-gram drafter makes
    the steps ragged (0 to 3 proposals per row), so widths 1 to 4 all occur."""
    compiled, eager, calls = models
    tokenizer = load_tokenizer(ckpt)
    params = SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=7)
    requests = [Request(f"p{i}", [1, 10 + i, 11, 12, 10 + i, 11], params) for i in range(2)]
    rows = []
    for model in (compiled, eager):
        engine = Engine(model, tokenizer, NgramDrafter(), EngineConfig(max_batch_size=4, num_draft_tokens=3, measure_cost=False))
        outs = engine.generate([dataclasses.replace(r) for r in requests])
        rows.append([(o.request_id, o.sample_index, o.token_ids, o.finish_reason) for o in outs])
    assert rows[0] == rows[1]
    assert calls
    assert engine.stats.proposed > 0


def test_autotuned_step_matches_eager(ckpt):
    """The shipped CPU setting (GEMM kernels autotuned) on one kind of step: batch 2, width 1."""
    compiled, eager = load_model(ckpt), load_model(ckpt)
    compile_steps(compiled, max_width=1)
    caches = [m.new_cache(2, 16) for m in (compiled, eager)]
    prompt = torch.randint(2, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    out = []
    for model, cache in zip((compiled, eager), caches):
        model(prompt, cache, torch.arange(2), torch.tensor([5, 3]), last_only=True)
        out.append([model(torch.tensor([[7], [9]]), cache, torch.arange(2), torch.ones(2, dtype=torch.int64))
                    for _ in range(2)])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compile_steps_rejects_a_zero_width(ckpt):
    with pytest.raises(ValueError, match="max_width"):
        compile_steps(load_model(ckpt), max_width=0)


def test_job_spec_compiles_the_target_only_when_asked(ckpt, tmp_path, monkeypatch):
    """`models.target.compile` (default false) reaches the worker's engine.  compile_steps itself
    is replaced by a recorder here: the tests above cover what it does."""
    import specbatch.models.compile as compile_module
    from specbatch.jobs.spec import spec_from_dict
    from specbatch.jobs.build import build_engine

    compiled_models = []
    monkeypatch.setattr(compile_module, "compile_steps", compiled_models.append)
    base = {"name": "t", "input": {"path": str(tmp_path / "prompts.parquet")}, "output": {"path": str(tmp_path / "out")},
            "models": {"target": {"path": str(ckpt), "dtype": "float32"}}, "resources": {"gpus_per_actor": 0}}
    plain = build_engine(spec_from_dict(base))
    assert not compiled_models and plain.description["compiled"] is False
    base["models"]["target"]["compile"] = True
    loaded = build_engine(spec_from_dict(base))
    assert compiled_models == [loaded.engine.target] and loaded.description["compiled"] is True
