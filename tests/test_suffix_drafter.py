"""The suffix (sibling) drafter: its bounded cache, q recorded at propose time, scopes, and
coupled verification.

Distribution exactness through the engine (a cache shared by a prompt's samples with a bound so
small that it evicts all the time; one cache shared across prompts; per-row counts) and the
mutant that reads q from the cache after it learned the step's distributions are cases of the
engine harness: tests/exactness/engine_harness.py and engine_mutants.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specbatch.engine.drafting.factory import build_drafter
from specbatch.engine.engine import Engine, EngineConfig
from specbatch.models import load_model, load_tokenizer
from specbatch.engine.request import Request
from specbatch.engine.rows import Row
from specbatch.sampling.warping import SamplingParams, WarpParams, warp
from specbatch.engine.drafting.suffix import SuffixCache, SuffixDrafter, sparse_warp
from tests.tiny import make_tiny_checkpoint

V = 32
PROMPT = [1, 10, 11, 12, 10, 11]  # repeats, so suffixes recur
PARAMS = SamplingParams(max_new_tokens=3, temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("suffix") / "target", vocab_size=V)


@pytest.fixture(scope="module")
def target(ckpt):
    return load_model(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return load_tokenizer(ckpt)


def _entry(*pairs):
    return tuple(t for t, _ in pairs), tuple(p for _, p in pairs)


def _row(tokens, request_id="r", n=2, sample_index=0, slot=0, **params):
    req = Request(request_id, list(tokens), SamplingParams(n=n, seed=3, **params))
    return Row(request=req, sample_index=sample_index, slot=slot, key=11, tokens=list(tokens), num_prompt=len(tokens), capacity=64)


# ---------------------------------------------------------------------- the cache


def test_cache_never_exceeds_its_bound_and_evicts_least_recently_used():
    cache = SuffixCache(max_entries=5, min_n=1, max_n=2)
    a = _entry((4, 1.0))
    cache.insert("s", [1, 2], a)  # keys (2,), (1, 2)
    cache.insert("s", [3, 4], a)  # keys (4,), (3, 4)
    assert len(cache) == 4
    assert cache.lookup("s", [9, 2]) == (a, 1)  # refreshes (2,)
    cache.insert("s", [5, 6], a)  # 6 entries: the least recently used, (1, 2), goes
    assert len(cache) == 5 and cache.evicted == 1
    assert cache.peek("s", [1, 2]) == a  # still found through (2,)
    assert ("s", (1, 2)) not in cache.entries and ("s", (2,)) in cache.entries
    for i in range(50):
        cache.insert("s", [i, i + 1], a)
        assert len(cache) <= 5


def test_cache_prefers_the_longest_suffix_and_releases_by_scope():
    cache = SuffixCache(max_entries=100, min_n=1, max_n=3)
    short, long = _entry((7, 1.0)), _entry((8, 1.0))
    cache.insert("a", [5, 6], short)  # (6,), (5, 6)
    cache.insert("a", [1, 2, 6], long)  # (6,), (2, 6), (1, 2, 6): (6,) now maps to long
    cache.insert("a", [5, 6], short)  # (6,) back to short
    assert cache.lookup("a", [0, 2, 6]) == (long, 2)
    assert cache.lookup("a", [1, 2, 6]) == (long, 3)
    assert cache.lookup("a", [9, 9, 6]) == (short, 1)
    assert cache.lookup("b", [1, 2, 6]) is None  # scopes never share entries
    cache.insert("b", [6], long)
    cache.release("a")
    assert len(cache) == 1 and cache.lookup("b", [6]) == (long, 1)


def test_sparse_warp_keeps_top_m_of_the_warped_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]] * 4)
    params = WarpParams.from_params([
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),  # greedy: the argmax only
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.5),  # the top token holds 0.64 of the mass
    ])
    ids, probs = sparse_warp(logits, params, 3)
    assert ids[0].tolist() == [3, 2, 1]
    p = logits[0, [3, 2, 1]].softmax(-1)
    torch.testing.assert_close(probs[0], p)
    assert probs[1].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(probs[2], torch.cat([logits[0, [3, 2]].softmax(-1), torch.zeros(1)]))
    assert probs[3].tolist() == [1.0, 0.0, 0.0]


def test_sparse_warp_never_keeps_a_token_the_warped_target_cuts():
    """Cut among the top m, top-p keeps a subset of the target's own top-p set (min-p and top-k
    keep theirs exactly), on peaked and flat bfloat16 rows with every truncation mixed in."""
    g = torch.Generator().manual_seed(3)
    rows = 60
    logits = (torch.randn(rows, 500, generator=g) * torch.tensor([6.0, 1.0, 0.2] * 20)[:, None]).to(torch.bfloat16)
    settings = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp) for t, k, p, mp in
                zip([0.5, 1.0, 1.3, 0.0] * 15, [0, 3, 0, 20, 0, 2] * 10, [0.9, 1.0, 0.5, 0.95, 0.7] * 12, [0.0, 0.0, 0.1] * 20)]
    params = WarpParams.from_params(settings)
    ids, probs = sparse_warp(logits, params, 8)
    full = warp(logits.float(), params)  # [rows, V] the target's warped distribution
    kept = torch.zeros_like(full, dtype=torch.bool).scatter_(1, ids, probs > 0)
    assert not (kept & (full == 0)).any()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(rows))
    assert (probs[:, 0] > 0).all() and int(((probs > 0).sum(dim=-1) > 1).sum()) > rows // 4


def test_q_is_recorded_at_propose_time_and_the_cache_is_scoped_by_request():
    drafter = SuffixDrafter(V, top_m=4, min_n=1, max_n=2, max_entries=64)
    row = _row([1, 5, 6], temperature=1.0)
    params = WarpParams.from_params([row.params])
    logits = torch.full((1, 1, V), -5.0)
    logits[0, 0, 9] = 3.0
    logits[0, 0, 8] = 2.0
    row.tokens.append(9)  # the step emitted 9 after [1, 5, 6]
    drafter.observe([row], logits, torch.tensor([1]), params)
    row.tokens.pop()
    prop = drafter.propose([row], torch.tensor([1]), coupled=False)
    assert prop.num_proposed.tolist() == [1] and prop.tokens[0, 0].item() in (8, 9)
    before = prop.q.clone()
    assert before.sum().item() == pytest.approx(1.0, abs=1e-6) and (before > 0).sum() == 4  # top-m = 4, renormalized
    assert before[0, 0, 9] > before[0, 0, 8] > 0.1
    # The cache learns a different distribution at the same context: the proposal's q stays.
    logits2 = torch.full((1, 1, V), -5.0)
    logits2[0, 0, 12] = 4.0
    row.tokens.append(12)
    drafter.observe([row], logits2, torch.tensor([1]), params)
    row.tokens.pop()
    assert torch.equal(prop.q, before)
    assert drafter.cache.peek("r", [1, 5, 6])[0][0] == 12
    other = _row([1, 5, 6], request_id="other")
    assert drafter.confidence([other], [3]) == [[]]  # no entry, no earlier n-gram: nothing to propose
    # The chain's confidence: the cached probability of 12, then nothing ([.., 6, 12] has no match).
    assert drafter.confidence([row], [3]) == [[pytest.approx(1.0, abs=1e-3)]]


def test_proposals_chain_and_fall_back_to_ngram_lookup():
    drafter = SuffixDrafter(V, top_m=2, min_n=1, max_n=2, max_entries=64)
    drafter.cache.insert("r", [7], _entry((8, 1.0)))
    drafter.cache.insert("r", [8], _entry((9, 1.0)))
    row = _row([1, 9, 4, 1, 7])  # after [7 8 9] the cache misses; n-gram: 9 was followed by 4 earlier
    prop = drafter.propose([row], torch.tensor([4]), coupled=False)
    assert prop.tokens[0].tolist() == [8, 9, 4, 1]
    assert prop.q[0, 0, 8] == 1.0 and prop.q[0, 2, 4] == 1.0 and prop.q[0].sum().item() == 4.0
    assert drafter.stats()["cache_proposals"] == 2 and drafter.stats()["ngram_proposals"] == 2


def test_entries_of_a_prompt_go_when_its_last_sample_finishes(target, tokenizer):
    drafter = build_drafter("suffix", target, tokenizer, max_entries=10_000)
    eng = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=3, num_draft_tokens=3, measure_cost=False))
    params = dataclasses.replace(PARAMS, n=7, max_new_tokens=6, ignore_eos=True)
    seen = []
    eng.generate([Request("a", PROMPT, params), Request("b", PROMPT[:4], params)],
                 on_output=lambda out: seen.append(len(drafter.cache)))
    assert max(seen) > 0 and len(drafter.cache) == 0 and not drafter.cache.by_scope
    shard = build_drafter("suffix", target, tokenizer, max_entries=10_000, scope="shard")
    Engine(target, tokenizer, shard, EngineConfig(max_batch_size=3, num_draft_tokens=3, measure_cost=False)).generate(
        [Request("a", PROMPT, params)])
    assert len(shard.cache) > 0  # shared across prompts: kept (bounded by max_entries only)


# ---------------------------------------------------------------------- coupled verification
# (Distribution exactness with a shared, evicting cache, and the late-q mutant, run in the engine
# harness: tests/exactness/engine_harness.py cases suffix_*, engine_mutants.py suffix_q_read_late.)


def test_coupled_suffix_equals_plain_coupled_sampling(target, tokenizer):
    params = dataclasses.replace(PARAMS, n=48, max_new_tokens=8, temperature=0.8, ignore_eos=True)
    req = [Request("c", PROMPT, params)]
    cfg = dict(max_batch_size=16, num_draft_tokens=3, verification="coupled", measure_cost=False)
    plain = Engine(target, tokenizer, None, EngineConfig(**cfg)).generate(req)
    drafter = SuffixDrafter(V, top_m=4, max_entries=32)
    eng = Engine(target, tokenizer, drafter, EngineConfig(**cfg))
    spec = eng.generate(req)
    assert drafter.hits > 0 and eng.stats.accepted > 0 and eng.stats.tested > eng.stats.accepted
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
