"""The engine end to end on tiny random checkpoints (float32, CPU): reproducibility, batching,
stops, errors, limits, out-of-memory retries, adaptive gamma, greedy and coupled identities.

Exactness of the engine's output distribution (every drafter, penalties, min_new_tokens, stops,
N samples, refills, both verification backends) and the engine/drafter mutants it must catch live
in tests/exactness/ (engine_harness.py, test_engine_exactness.py, test_engine_mutants.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specbatch.sampling import rng
from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.drafting.factory import build_drafter
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.models import load_model, load_tokenizer
from specbatch.engine.request import Request
from specbatch.sampling.warping import SamplingParams, WarpParams, warp
from specbatch.jobs.build import EngineLike
from specbatch.sampling.speculative import coupled_choice
from tests.tiny import EOS_ID, make_tiny_pair

V = 32
L = 3  # completion tokens of BASE


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    target, draft = make_tiny_pair(root, vocab_size=V, draft_vocab_size=40)
    return target, draft


@pytest.fixture(scope="module")
def target(ckpts):
    return load_model(ckpts[0], dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(ckpts):
    return load_tokenizer(ckpts[0])


PROMPT = [1, 10, 11, 12, 10, 11]  # "<s> d e f d e": repeats, so the n-gram drafter has material


def run(target, tokenizer, drafter, params, n, gamma=3, verification="rejection", max_batch=256, prompt=PROMPT, rid="p0"):
    engine = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=max_batch, num_draft_tokens=gamma,
                                                               verification=verification, measure_cost=False))
    outs = engine.generate([Request(rid, list(prompt), dataclasses.replace(params, n=n))])
    return engine, outs


BASE = SamplingParams(max_new_tokens=L, temperature=1.0, seed=7)


def test_coupled_verification_equals_plain_coupled_sampling(target, tokenizer, ckpts):
    """Coupled: output token for token equal to plain Gumbel-max sampling with the same seed."""
    params = dataclasses.replace(BASE, max_new_tokens=6, temperature=1.0)
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32")
    engine, spec_outs = run(target, tokenizer, drafter, params, 64, verification="coupled")
    _, plain_outs = run(target, tokenizer, None, params, 64, verification="coupled")
    assert engine.stats.tested > engine.stats.accepted > 0
    assert [o.token_ids for o in spec_outs] == [o.token_ids for o in plain_outs]
    # And plain coupled sampling is Gumbel-max over p, re-derived here for sample 0.
    key = torch.tensor([rng.row_key(params.seed, "p0")])
    seq = list(PROMPT)
    for t in range(len(plain_outs[0].token_ids)):
        cache = target.new_cache(1, len(seq))
        logits = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([len(seq)]), last_only=True)[:, 0]
        p = warp(logits, WarpParams.from_params([params]))
        tok = int(coupled_choice(p, rng.gumbel(key, torch.tensor([0]), torch.tensor([t]), V))[0])
        assert tok == plain_outs[0].token_ids[t]
        seq.append(tok)


def test_greedy_speculative_equals_greedy_plain(target, tokenizer, ckpts):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32")
    prompts = [PROMPT, [1, 20, 21], [1, 5, 9, 14, 9, 5]]
    plain = [run(target, tokenizer, None, params, 1, prompt=p)[1][0].token_ids for p in prompts]
    spec = [run(target, tokenizer, drafter, params, 1, prompt=p)[1][0].token_ids for p in prompts]
    ngram = [run(target, tokenizer, NgramDrafter(), params, 1, prompt=p)[1][0].token_ids for p in prompts]
    assert spec == plain and ngram == plain


def test_draft_identical_to_target_accepts_everything(target, tokenizer, ckpts):
    params = dataclasses.replace(BASE, max_new_tokens=10, temperature=0.8, ignore_eos=True)
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[0]), dtype="float32")
    engine, outs = run(target, tokenizer, drafter, params, 16, gamma=4)
    assert engine.stats.tested > 0 and engine.stats.accepted == engine.stats.tested
    assert all(len(o.token_ids) == 10 for o in outs)


def test_row_tokens_do_not_depend_on_batch(target, tokenizer, ckpts):
    """A row's tokens are the same alone or in a full, mixed batch with slot refills."""
    drafter_kinds = [lambda: None, lambda: NgramDrafter(), lambda: build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32")]
    reqs = [
        Request("a", PROMPT, SamplingParams(n=5, max_new_tokens=9, temperature=0.9, seed=1)),
        Request("b", [1, 20, 21], SamplingParams(n=3, max_new_tokens=5, temperature=0.0, seed=1)),
        Request("c", [1, 7, 8, 9, 7, 8], SamplingParams(n=4, max_new_tokens=12, temperature=1.2, top_k=6, seed=1)),
    ]
    for make in drafter_kinds:
        full = Engine(target, tokenizer, make(), EngineConfig(max_batch_size=4, num_draft_tokens=3, measure_cost=False)).generate(reqs)
        for req in reqs:
            for i in req.indices():
                alone_req = Request(req.request_id, req.prompt_token_ids, req.params, sample_indices=[i])
                alone = Engine(target, tokenizer, make(), EngineConfig(max_batch_size=1, num_draft_tokens=3, measure_cost=False)).generate([alone_req])[0]
                batched = next(o for o in full if o.request_id == req.request_id and o.sample_index == i)
                assert alone.token_ids == batched.token_ids


def test_seed_reproducible_and_samples_independent(target, tokenizer):
    params = dataclasses.replace(BASE, max_new_tokens=8, temperature=1.0, seed=3)
    _, a = run(target, tokenizer, NgramDrafter(), params, 32)
    _, b = run(target, tokenizer, NgramDrafter(), params, 32)
    _, c = run(target, tokenizer, NgramDrafter(), dataclasses.replace(params, seed=4), 32)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # An engine copying the first token to all N rows would make these all equal.
    assert len({o.token_ids[0] for o in a}) > 1


def test_stops_and_finish_reasons(target, tokenizer):
    eng = Engine(target, tokenizer, NgramDrafter(), EngineConfig(max_batch_size=8, num_draft_tokens=3, measure_cost=False))
    base = SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=5)
    outs = eng.generate([Request("x", PROMPT, base)])
    for o in outs:
        assert o.finish_reason in ("eos", "length")
        if o.finish_reason == "eos":
            assert o.token_ids[-1] == EOS_ID and EOS_ID not in o.token_ids[:-1]
        else:
            assert len(o.token_ids) == 20
        assert o.num_tokens == len(o.token_ids) and o.counts.target_passes >= 1
        assert o.counts.draft_accepted <= o.counts.draft_tested <= o.counts.draft_proposed
    # A stop token id: take a token that sample 0 emits, and stop on it.
    free = eng.generate([Request("x", PROMPT, dataclasses.replace(base, n=1, ignore_eos=True))])[0]
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    cut = eng.generate([Request("x", PROMPT, dataclasses.replace(base, n=1, ignore_eos=True, stop_token_ids=(stop_tok,)))])[0]
    assert cut.token_ids == free.token_ids[: first + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == str(stop_tok)
    # A stop string spanning two tokens.
    words = tokenizer.decode(free.token_ids[2:4])
    s = eng.generate([Request("x", PROMPT, dataclasses.replace(base, n=1, ignore_eos=True, stop=(words,)))])[0]
    assert s.finish_reason == "stop" and s.stop_reason == words
    assert words not in s.text and len(s.token_ids) <= 4
    # min_new_tokens: no EOS before it.
    m = eng.generate([Request("x", PROMPT, dataclasses.replace(base, n=16, min_new_tokens=5))])
    assert all(EOS_ID not in o.token_ids[:5] for o in m)


def test_prompt_errors_are_rows_not_crashes(target, tokenizer):
    eng = Engine(target, tokenizer, None, EngineConfig(max_batch_size=4, max_model_len=16, measure_cost=False))
    outs = eng.generate([
        Request("long", [1] + [10] * 20, SamplingParams(n=2, max_new_tokens=4)),
        Request("ok", PROMPT, SamplingParams(n=2, max_new_tokens=4)),
        Request("empty", [], SamplingParams(n=1, max_new_tokens=4)),
    ])
    assert [o.finish_reason for o in outs[:2]] == ["error", "error"] and "max_model_len" in outs[0].error
    assert all(o.error is None and o.num_tokens > 0 for o in outs[2:4])
    assert outs[4].finish_reason == "error"


def test_max_model_len_cuts_rows_with_length(target, tokenizer):
    eng = Engine(target, tokenizer, NgramDrafter(), EngineConfig(max_batch_size=4, max_model_len=12, num_draft_tokens=4, measure_cost=False))
    outs = eng.generate([Request("x", PROMPT, SamplingParams(n=4, max_new_tokens=50, ignore_eos=True))])
    for o in outs:
        assert o.finish_reason == "length" and len(PROMPT) + o.num_tokens <= 13


def test_out_of_memory_halves_the_batch_and_retries(target, tokenizer):
    params = SamplingParams(n=8, max_new_tokens=6, temperature=1.0, seed=2)
    reference = Engine(target, tokenizer, None, EngineConfig(max_batch_size=8, measure_cost=False)).generate([Request("x", PROMPT, params)])
    eng = Engine(target, tokenizer, None, EngineConfig(max_batch_size=8, measure_cost=False))
    real_forward = eng.target.forward

    def forward(tokens, cache, slots, num_tokens, last_only=False):
        if tokens.shape[0] > 2:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return real_forward(tokens, cache, slots, num_tokens, last_only=last_only)

    eng.target.forward = forward
    try:
        outs = eng.generate([Request("x", PROMPT, params)])
    finally:
        del eng.target.forward
    assert eng.max_batch <= 2
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]


def test_adaptive_gamma_falls_back_to_plain_when_speculation_loses(target, tokenizer, ckpts):
    """A hot draft is rejected so often that, at the measured costs, plain sampling wins."""
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32", draft_temperature=3.0)
    eng = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=16, num_draft_tokens=4, adaptive_gamma=True))
    assert eng.cost_model is not None and (16, 5) in eng.cost_model.target
    # Replace the measured (wall-clock, noisy) costs by unambiguous ones: every target pass costs
    # the same whatever its width, and a draft step as much as a target step. A step of gamma
    # proposals then costs gamma + 1 plain steps and yields fewer tokens unless every proposal is
    # accepted, so plain sampling wins at any acceptance rate below 1, on any machine.
    eng.cost_model.target = {key: 1e-3 for key in eng.cost_model.target}
    eng.cost_model.draft = {b: 1e-3 for b in (1, 16)}
    params = SamplingParams(n=64, max_new_tokens=12, temperature=0.7, ignore_eos=True, seed=1)
    outs = eng.generate([Request("x", PROMPT, params)])
    assert eng.gamma == 0 and "plain sampling" in eng.gamma_reason
    assert all(len(o.token_ids) == 12 for o in outs)
    assert isinstance(eng, EngineLike)  # everything the worker reads: gamma and why, cost model, step shapes
    assert eng.steps_by_shape and sum(eng.rows_by_proposals.values()) >= 64


def test_the_cost_model_times_steps_on_the_engine_s_own_caches(target, tokenizer, ckpts):
    """Measured at start-up on the first slots of the engine's target and draft caches (their
    lengths restored), never on caches made for it: a model that captures a CUDA graph per cache
    then captures each step once, for the engine. The rows equal an unmeasured engine's."""
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32")
    made, used = [], []
    for model in (target, drafter.model):
        def new_cache(*args, _real=model.new_cache, **kwargs):
            made.append(_real(*args, **kwargs))
            return made[-1]

        def forward(tokens, cache, *args, _real=model.forward, **kwargs):
            used.append(cache)
            return _real(tokens, cache, *args, **kwargs)

        model.new_cache, model.forward = new_cache, forward
    try:
        eng = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=4, num_draft_tokens=2))
    finally:
        for model in (target, drafter.model):
            del model.new_cache, model.forward
    assert set(eng.cost_model.target) == {(b, w) for b in (1, 4) for w in (1, 2, 3)} and set(eng.cost_model.draft) == {1, 4}
    assert [id(c) for c in made] == [id(eng.cache), id(drafter.cache)]
    assert len(used) > 10 and {id(c) for c in used} == {id(eng.cache), id(drafter.cache)}
    assert not eng.cache.lengths.any() and not drafter.cache.lengths.any()
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, ignore_eos=True, seed=3)
    unmeasured = Engine(target, tokenizer, build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32"),
                        EngineConfig(max_batch_size=4, num_draft_tokens=2, measure_cost=False))
    rows = [[(o.sample_index, o.token_ids) for o in e.generate([Request("x", PROMPT, params)])] for e in (eng, unmeasured)]
    assert rows[0] == rows[1]


@pytest.mark.triton
def test_engine_on_the_triton_kernels_equals_the_torch_reference(target, tokenizer, ckpts):
    """The engine's verification through the fused kernels (interpreted on CPU) gives the same rows."""
    from specbatch_kernels import ops

    params = SamplingParams(n=6, max_new_tokens=5, temperature=0.9, top_k=12, top_p=0.9, seed=11)
    req = [Request("k", PROMPT, params)]

    def outputs():
        drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32")
        eng = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=6, num_draft_tokens=3, measure_cost=False))
        return [(o.token_ids, round(o.cumulative_logprob, 4)) for o in eng.generate(req)], eng.stats

    previous = ops.backend()
    try:
        ops.force_backend("torch")
        reference, _ = outputs()
        ops.force_backend("triton")
        assert ops.backend() == "triton"
        fused, stats = outputs()
    finally:
        ops.force_backend(previous)
    assert stats.tested > stats.accepted  # rejections happened on the kernel path
    assert fused == reference


def test_stale_draft_cache_is_caught_by_the_length_invariants(target, tokenizer, ckpts):
    """A model drafter that forgets to roll its cache back after a rejection is refused loudly."""
    from specbatch.engine.drafting.model import ModelDrafter

    class StaleDrafter(ModelDrafter):
        def commit(self, rows, num_proposed, num_accepted):  # never rolls back
            pass

    good = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32", draft_temperature=2.0)
    stale = StaleDrafter(good.model, V, draft_temperature=2.0)
    params = SamplingParams(n=8, max_new_tokens=10, temperature=1.0, ignore_eos=True)
    with pytest.raises(AssertionError, match="draft cache"):
        Engine(target, tokenizer, stale, EngineConfig(max_batch_size=8, measure_cost=False)).generate([Request("s", PROMPT, params)])


def test_the_model_drafters_host_lengths_are_its_caches_lengths(target, tokenizer, ckpts):
    """The model drafter keeps its cache's lengths on the host (no device read per step): after
    every proposal and every rollback they equal the cache's own, through rejections, fully
    accepted steps, finished rows and refilled slots."""
    drafter = build_drafter("model", target, tokenizer, path=str(ckpts[1]), dtype="float32", draft_temperature=1.5)
    checked = []

    def agree(name):
        real = getattr(drafter, name)

        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            assert drafter.lengths == drafter.cache.lengths.tolist(), name
            checked.append(name)
            return out

        setattr(drafter, name, call)

    for name in ("propose", "commit", "prefill", "copy_prefix", "release"):
        agree(name)
    eng = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=4, num_draft_tokens=3, measure_cost=False))
    params = SamplingParams(n=6, max_new_tokens=9, temperature=0.9, ignore_eos=True, seed=5)
    eng.generate([Request("a", PROMPT, params), Request("b", PROMPT[:3], params)])
    assert eng.stats.accepted < eng.stats.tested and checked.count("release") >= 12  # rejections; every row freed
