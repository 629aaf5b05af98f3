"""The kernels' own warping in distribution: from raw logits with top-k / top-p / min-p /
greedy, the first token a verification step emits follows the exact warped p.

The harness (test_kernels_harness.py) hands the kernels p already warped; here the kernels warp
themselves (temperature, sorting-free thresholds, online softmax) and the emitted token of
20 000 independent rows (distinct sample indices) is compared with p computed in float64.
With one proposal per row, the first emitted token is the accepted proposal or the recovered
token at position 0, and exact speculative sampling makes it a draw from p whatever q is.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from specbatch.sampling import rng
from specbatch.sampling.warping import WarpParams, sample_from_probs, truncate_and_normalize
from specbatch_kernels import ops
from specbatch_kernels import verify as kverify
from tests.exactness.distribution import assert_distribution, compare
from tests.kernel_support import force_triton

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

ROWS = 20_000
VOCAB = 8

SETTINGS = {  # temperature, top_k, top_p, min_p
    "top_k": (1.3, 3, 1.0, 0.0),
    "top_p": (1.1, 0, 0.7, 0.0),
    "min_p": (1.4, 0, 1.0, 0.2),
    "all": (1.5, 5, 0.85, 0.05),
    "greedy": (0.0, 0, 1.0, 0.0),
}


@pytest.fixture
def triton_path(monkeypatch):
    return force_triton(monkeypatch, kverify, "verify_triton", "verify")


@pytest.mark.parametrize("one_hot", [False, True], ids=["dense_q", "one_hot_q"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_first_emitted_token_follows_warped_p(triton_path, setting, one_hot):
    g = torch.Generator().manual_seed(7)
    target = torch.randn(VOCAB, generator=g) * 2  # [V]
    draft = target + torch.randn(VOCAB, generator=g) * 1.5  # [V] the draft disagrees often
    temperature, top_k, top_p, min_p = SETTINGS[setting]
    n = ROWS * 2
    warp = WarpParams(torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
                      torch.full((n,), min_p), torch.ones(n), torch.zeros(n), torch.zeros(n))
    exact = truncate_and_normalize(target[None, :], warp.index(torch.zeros(1, dtype=torch.int64)))[0]  # [V]

    key = torch.full((ROWS,), 99, dtype=torch.int64)
    sample_index = torch.arange(ROWS, dtype=torch.int64)
    position = torch.zeros(ROWS, dtype=torch.int64)
    q = torch.softmax(draft, dim=0)[None, :].expand(ROWS, VOCAB).contiguous()  # [R, V]
    if one_hot:
        proposals = q.argmax(dim=-1)
        draft_probs = None
    else:
        proposals = sample_from_probs(q, rng.uniform(key, sample_index, position, rng.Role.DRAFT))
        draft_probs = q[:, None, :].contiguous()
    logits = target[None, None, :].expand(ROWS, 2, VOCAB).contiguous()  # [R, G+1, V]
    result, _ = ops.verify(logits, proposals[:, None], torch.ones(ROWS, dtype=torch.int64), draft_probs, warp,
                           key, sample_index, position)
    rejections = int((result.num_accepted == 0).sum())
    assert rejections > 500 or setting == "greedy", rejections  # the residual path is exercised
    counts = torch.bincount(result.tokens[:, 0], minlength=VOCAB)
    assert_distribution(counts, exact, label=f"kernel {setting} {'one-hot' if one_hot else 'dense'} q")
    # power: the untruncated distribution is told apart wherever truncation moved enough mass.
    untruncated = torch.softmax(target / (temperature or 1.0), dim=0)
    if float((untruncated - exact).abs().sum()) / 2 > 0.05:
        assert not compare(counts, untruncated).ok
    assert triton_path["verify"] == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_token_follows_the_tie_inclusive_top_p(monkeypatch, backend):
    """[0,0,0,0,-1,-2,-3,-4] at top_p 0.5: the crossing falls inside the group of tied 0s, and
    every tied token is kept.  The first token of plain sampling and of a verification step
    (proposals from the untruncated softmax, so the residual path runs) follows 1/4 on each 0,
    and a sort-dependent rule (transformers' TopPLogitsWarper: three of the four) is told apart."""
    calls = force_triton(monkeypatch, kverify, "verify_triton", "verify")
    ops.force_backend(backend)
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    exact = torch.tensor([0.25] * 4 + [0.0] * 4)
    sort_dependent = torch.softmax(TopPLogitsWarper(0.5)(None, logits[None, :].clone())[0], dim=0)
    n = ROWS
    warp = WarpParams(torch.ones(n), torch.zeros(n, dtype=torch.int64), torch.full((n,), 0.5), torch.zeros(n),
                      torch.ones(n), torch.zeros(n), torch.zeros(n))
    key = torch.full((n,), 5, dtype=torch.int64)
    sample_index = torch.arange(n, dtype=torch.int64)
    position = torch.zeros(n, dtype=torch.int64)
    plain, _ = ops.warp_and_sample(logits.expand(n, VOCAB).contiguous(), warp, key, sample_index, position)
    q = torch.softmax(logits, dim=0).expand(n, VOCAB).contiguous()  # [R, V]
    proposals = sample_from_probs(q, rng.uniform(key, sample_index, position, rng.Role.DRAFT))
    result, _ = ops.verify(logits.expand(n, 2, VOCAB).contiguous(), proposals[:, None], torch.ones(n, dtype=torch.int64),
                           q[:, None, :].contiguous(), warp, key, sample_index, position)
    assert int((result.num_accepted == 0).sum()) > 1000  # the residual path is exercised
    for label, tokens in (("plain", plain), ("verify", result.tokens[:, 0])):
        counts = torch.bincount(tokens, minlength=VOCAB)
        assert_distribution(counts, exact, label=f"{backend} {label}")
        assert not compare(counts, sort_dependent).ok
    assert calls["verify"] == (1 if backend == "triton" else 0)
