"""Fused warp-and-sample kernel vs the torch reference (plain rows and draft proposals).

Triton is forced (interpreted on CPU) and each test asserts the kernel ran.  Tokens must equal
the reference's except where a decision sits within float32 rounding of its boundary
(``specbatch_kernels.parity``); those are counted, printed and bounded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from specbatch.sampling import rng
from specbatch.sampling.warping import (
    History,
    WarpParams,
    apply_bias_and_penalties,
    sample_from_probs,
    warp as reference_warp,
)
from specbatch_kernels import ops, parity
from specbatch_kernels import warp as kwarp
from tests.kernel_support import force_triton
from tests.test_kernels_verify import KINDS, row_params

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture
def triton_path(monkeypatch):
    return force_triton(monkeypatch, kwarp, "warp_and_sample_triton", "sample")


def make_rows(vocab, rows, dtype, seed, zeros=False, kinds=KINDS):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3  # [M, V]
    if zeros and vocab > 1:
        banned = torch.rand(rows, vocab, generator=g) < 0.4
        banned[:, -1] = False
        logits = logits.masked_fill(banned, float("-inf"))
    logits = logits.to(dtype)
    warp = row_params([kinds[int(i)] for i in torch.randint(0, len(kinds), (rows,), generator=g)], vocab, g)
    key = torch.randint(0, 2**62, (rows,), generator=g)
    sample_index = torch.randint(0, 16, (rows,), generator=g)
    position = torch.randint(0, 300, (rows,), generator=g)
    return logits, warp, key, sample_index, position


def check_rows(logits, warp, key, sample_index, position, role, history=None, ban=None, label=""):
    rows, vocab = logits.shape
    tokens, logprob = ops.warp_and_sample(logits, warp, key, sample_index, position, role, history=history, ban=ban)
    tokens2, probs = ops.warp_and_sample(logits, warp, key, sample_index, position, role, history=history, ban=ban,
                                         return_probs=True)
    assert torch.equal(tokens, tokens2)
    ref_probs = reference_warp(logits, warp, history, ban)  # [M, V]
    u = rng.uniform(key, sample_index, position, int(role))
    ref_tokens = sample_from_probs(ref_probs, u)
    scores = apply_bias_and_penalties(logits, warp, history)
    if ban is not None:
        scores = scores.masked_fill(ban, float("-inf"))
    equal, near = parity.classify_sample(tokens, ref_tokens, ref_probs, scores, warp, u)
    bad = ~equal & ~near
    assert not bool(bad.any()), f"{label}: rows {bad.nonzero().squeeze(1).tolist()} differ away from any boundary"
    n_near = int((~equal).sum())
    assert n_near <= max(1, rows // 20), f"{label}: {n_near} near-boundary mismatches"
    ok = ~parity.truncation_near(scores, warp)  # rows whose p itself is not in doubt
    torch.testing.assert_close(probs[ok], ref_probs[ok], atol=1e-5, rtol=1e-4)
    assert torch.equal(probs[ok] == 0, ref_probs[ok] == 0)  # the same support, exact zeros included
    ref_logprob = ref_probs.gather(1, tokens[:, None]).squeeze(1).log()
    torch.testing.assert_close(logprob[ok & equal], ref_logprob[ok & equal], atol=2e-4, rtol=1e-4)
    print(f"{label}: {rows} rows, {n_near} near-boundary mismatch(es), {int(near.sum())} row(s) near a boundary")


CASES = [  # (vocab, rows, dtype, exact zeros, kinds)
    (1, 5, torch.float32, False, KINDS),
    (7, 64, torch.bfloat16, True, KINDS),
    (7, 50, torch.float16, False, KINDS),
    (1000, 48, torch.float32, True, KINDS),
    (1000, 30, torch.bfloat16, False, KINDS),
    (32001, 4, torch.float32, False, ("top_k", "tiny_top_p", "min_p", "all")),
    (151936, 2, torch.float16, True, ("min_p", "top_k_1")),  # top-p at this size: test_kernels_verify
]


@pytest.mark.parametrize("vocab,rows,dtype,zeros,kinds", CASES,
                         ids=[f"V{c[0]}-R{c[1]}-{str(c[2])[6:]}{'-zeros' if c[3] else ''}" for c in CASES])
def test_warp_and_sample_matches_reference(triton_path, vocab, rows, dtype, zeros, kinds):
    case = make_rows(vocab, rows, dtype, seed=vocab + rows, zeros=zeros, kinds=kinds)
    check_rows(*case, rng.Role.SAMPLE, label=f"V={vocab} R={rows} {dtype}")
    assert triton_path["sample"] == 2


def test_draft_role_uses_its_own_uniforms(triton_path):
    """Draft proposals draw with role DRAFT: the same row gives the reference's DRAFT token."""
    logits, warp, key, sample_index, position = make_rows(200, 40, torch.float32, seed=4, kinds=("plain",))
    check_rows(logits, warp, key, sample_index, position, rng.Role.DRAFT, label="draft role")
    plain, _ = ops.warp_and_sample(logits, warp, key, sample_index, position, rng.Role.SAMPLE)
    draft, _ = ops.warp_and_sample(logits, warp, key, sample_index, position, rng.Role.DRAFT)
    assert not torch.equal(plain, draft)
    assert triton_path["sample"] == 4


def test_warp_and_sample_with_bias_penalties_and_bans(triton_path):
    rows, vocab = 12, 30
    logits, warp, key, sample_index, position = make_rows(vocab, rows, torch.float32, seed=8, kinds=KINDS)
    warp.repetition_penalty[:] = 1.4
    warp.presence_penalty[:] = 0.5
    warp.frequency_penalty[:] = 0.3
    warp.logit_bias = [{2: 5.0} if i % 2 else {} for i in range(rows)]
    g = torch.Generator().manual_seed(1)
    history = History(prompt_ids=torch.randint(0, vocab, (rows, 6), generator=g),
                      output_ids=torch.randint(-1, vocab, (rows, 5), generator=g))
    ban = torch.zeros(rows, vocab, dtype=torch.bool)
    ban[:, 0] = True
    check_rows(logits, warp, key, sample_index, position, rng.Role.SAMPLE, history=history, ban=ban,
               label="bias+penalties+ban")
    assert triton_path["sample"] == 2


def test_greedy_rows_take_the_first_argmax(triton_path):
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5], [-1.0, -5.0, -1.0, float("-inf")]])
    warp = row_params(["greedy"] * 3, 4, torch.Generator().manual_seed(0))
    zeros = torch.zeros(3, dtype=torch.int64)
    tokens, logprob = ops.warp_and_sample(logits, warp, torch.arange(3), zeros, zeros, rng.Role.SAMPLE)
    assert tokens.tolist() == [1, 0, 0]
    assert logprob.tolist() == [0.0, 0.0, 0.0]
    assert triton_path["sample"] == 1


def test_top_k_1_and_tiny_top_p_keep_only_the_top_token(triton_path):
    logits, warp, key, sample_index, position = make_rows(500, 20, torch.float32, seed=6,
                                                          kinds=("top_k_1", "tiny_top_p"))
    tokens, probs = ops.warp_and_sample(logits, warp, key, sample_index, position, return_probs=True)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert bool((probs.max(dim=-1).values == 1).all()) and bool(((probs > 0).sum(dim=-1) == 1).all())
    assert triton_path["sample"] == 1


# ---- the top-p tie contract: every token tied with the crossing token is kept -----------------

TIE_EXAMPLE = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0]  # top_p 0.5: the crossing is the 3rd zero


def sampled_rows(rows: int, temperature, top_k, top_p) -> WarpParams:
    """WarpParams of `rows` rows from per-row temperature [M], top_k [M] int64, top_p [M]."""
    return WarpParams(temperature.to(torch.float32), top_k, top_p.to(torch.float32), torch.zeros(rows),
                      torch.ones(rows), torch.zeros(rows), torch.zeros(rows))


def kept_sets(logits, warp):
    """(kernel kept set, reference kept set), [M, V] bool each, through ops with Triton forced."""
    rows = logits.shape[0]
    zeros = torch.zeros(rows, dtype=torch.int64)
    _, probs = ops.warp_and_sample(logits, warp, torch.arange(rows), zeros, zeros, return_probs=True)
    return probs > 0, reference_warp(logits, warp) > 0


def test_top_p_keeps_every_token_tied_with_the_crossing_token(triton_path):
    logits = torch.tensor([TIE_EXAMPLE, TIE_EXAMPLE[::-1]])  # [2, 8]: the same row, reversed
    warp = sampled_rows(2, torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.full((2,), 0.5))
    zeros = torch.zeros(2, dtype=torch.int64)
    _, probs = ops.warp_and_sample(logits, warp, torch.arange(2), zeros, zeros, return_probs=True)
    expected = torch.tensor([[0.25] * 4 + [0.0] * 4, [0.0] * 4 + [0.25] * 4])
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(reference_warp(logits, warp), expected)
    assert triton_path["sample"] == 1


def bf16_tie_rows(rows: int, vocab: int, seed: int):
    """Logits rounded to bfloat16 (many exact ties near any top-p crossing) and sampled rows with
    top_p in [0.1, 0.95], a quarter with top-k too, temperatures 1 or in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 2).to(torch.bfloat16)  # [M, V]
    temperature = torch.where(torch.rand(rows, generator=g) < 0.5, torch.ones(rows), torch.rand(rows, generator=g) + 0.5)
    top_k = torch.where(torch.rand(rows, generator=g) < 0.25, vocab // 4, 0).to(torch.int64)
    top_p = torch.rand(rows, generator=g) * 0.85 + 0.1
    return logits, sampled_rows(rows, temperature, top_k, top_p)


def sort_dependent_kept(scores: torch.Tensor, warp: WarpParams) -> torch.Tensor:
    """[M, V] bool: what transformers' TopK/TopPLogitsWarper keep, a sort-dependent part of a group
    tied at the crossing. scores: [M, V] float32."""
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        s = scores[i : i + 1] / warp.temperature[i]
        if int(warp.top_k[i]) > 0:
            s = TopKLogitsWarper(int(warp.top_k[i]))(None, s)
        kept[i] = TopPLogitsWarper(float(warp.top_p[i]))(None, s)[0] > float("-inf")
    return kept


def test_bf16_ties_kernel_and_reference_keep_the_same_set(triton_path):
    rows, vocab = 48, 2048
    logits, warp = bf16_tie_rows(rows, vocab, seed=11)
    kernel, reference = kept_sets(logits, warp)
    scores = logits.float()
    near = parity.truncation_near(scores, warp)  # a cumulative mass within float rounding of top_p
    assert int(near.sum()) <= rows // 20, int(near.sum())
    differ = (kernel != reference).any(dim=-1) & ~near
    assert not bool(differ.any()), f"rows {differ.nonzero().squeeze(1).tolist()} keep different sets"
    # power: in many rows a sort-dependent rule drops part of the group tied at the crossing.
    partial = (sort_dependent_kept(scores, warp) != reference).any(dim=-1) & ~near
    assert int(partial.sum()) >= rows // 5, int(partial.sum())
    temp = warp.temperature[:, None]
    crossing = torch.where(reference, scores / temp, float("inf")).amin(dim=-1, keepdim=True)  # [M, 1]
    assert torch.equal(reference, scores / temp >= crossing)  # every score >= the crossing score
    assert triton_path["sample"] == 1


def test_permuting_the_vocabulary_permutes_the_kept_set(triton_path):
    rows, vocab = 16, 512
    logits, warp = bf16_tie_rows(rows, vocab, seed=12)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(3))
    kernel, reference = kept_sets(logits, warp)
    kernel_perm, reference_perm = kept_sets(logits[:, perm].contiguous(), warp)
    assert torch.equal(kernel_perm, kernel[:, perm])
    assert torch.equal(reference_perm, reference[:, perm])
    assert triton_path["sample"] == 2
