"""The opt-in sigmoid approximation: its kernel matches its torch reference, and its distance
from exact sampling is measured, reported (printed: run with -s) and bounded.

TV below is the total-variation distance between the distribution of the first token emitted
by one step (one proposal drawn from q) and the exact target p = softmax(logits / T).
"""

from __future__ import annotations

import math

import pytest
import torch

from specbatch.sampling.warping import WarpParams
from specbatch_kernels import approximate, ops, reference
from specbatch_kernels.reference import VerifyStep
from tests.kernel_support import force_triton
from tests.test_kernels_verify import make_step

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

VOCAB = 16
ROWS = 20_000


@pytest.fixture
def triton_path(monkeypatch):
    return force_triton(monkeypatch, approximate, "verify_triton", "approximate")


def sampling_bound(p: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A bound on the TV of n samples from p to p itself: E[TV] plus McDiarmid's deviation."""
    p = p.to(torch.float64)
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


def regimes() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(logits [V], q [V]) per regime: the draft is the target plus noise."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(VOCAB, generator=g)
    noise = torch.randn(VOCAB, generator=g)
    out = {}
    for name, logits in {
        "peaked logits (N(0, 3^2))": base * 3,
        "flat logits (N(0, 0.5^2))": base * 0.5,
        "normalized log-probs": torch.log_softmax(base * 2, dim=0),
    }.items():
        out[name] = (logits, torch.softmax(logits + noise, dim=0))
    return out


def test_approximate_kernel_matches_its_reference(triton_path):
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        300, 48, 4, torch.bfloat16, one_hot=False, seed=21, kinds=("plain",))
    for q in (draft_probs, None):
        result, logprobs = ops.verify(logits, draft_tokens, num_proposed, q, warp, key, sample_index, position,
                                      approximate=True)
        pairs = warp.index(torch.arange(48).repeat_interleave(5))
        ref, ref_logprobs, _ = reference.verify_approximate(VerifyStep(logits, draft_tokens, num_proposed, q, pairs, key,
                                                                       sample_index, position))
        same = (result.tokens == ref.tokens).all(dim=1) & (result.num_accepted == ref.num_accepted)
        assert int((~same).sum()) <= 1  # rounding at a boundary, at most
        emitted = torch.arange(5)[None, :] < ref.num_emitted[:, None]
        ok = same[:, None] & emitted
        torch.testing.assert_close(logprobs[ok], ref_logprobs[ok], atol=1e-4, rtol=1e-4)
    assert triton_path["approximate"] == 2


def test_total_variation_is_measured_and_bounded(triton_path):
    """Report the approximation's TV from exact per regime; the measurement must agree with the
    analytic value, and the exact kernels in the same setup must show no distance at all."""
    lines = ["", f"approximate (sigmoid) verification, V={VOCAB}, {ROWS} one-proposal steps:",
             f"{'regime':32s} {'TV measured':>12s} {'TV analytic':>12s} {'exact kernel TV':>16s}"]
    for name, (logits, q) in regimes().items():
        measured, analytic = approximate.measure_tv(logits, q, rows=ROWS)
        exact_p = torch.softmax(logits.to(torch.float64), dim=0)
        noise = sampling_bound(approximate.output_distribution(logits, q), ROWS)
        assert abs(measured - analytic) <= noise, (name, measured, analytic, noise)
        exact_tv = _exact_kernel_tv(logits, q)
        assert exact_tv <= sampling_bound(exact_p, ROWS), (name, exact_tv)
        lines.append(f"{name:32s} {measured:12.4f} {analytic:12.4f} {exact_tv:16.4f}")
        if name == "normalized log-probs":
            # sigmoid(log p) = p / (1 + p): close to p when p is small, so this regime stays close.
            assert analytic < 0.2, analytic
    print("\n".join(lines))
    assert triton_path["approximate"] == 3


def _exact_kernel_tv(logits: torch.Tensor, q: torch.Tensor) -> float:
    """The same experiment through the exact kernels (approximate=False)."""
    v = logits.shape[0]
    key = torch.zeros(ROWS, dtype=torch.int64)
    sample_index = torch.arange(ROWS, dtype=torch.int64)
    position = torch.zeros(ROWS, dtype=torch.int64)
    from specbatch.sampling import rng
    from specbatch.sampling.warping import sample_from_probs

    qs = q[None, :].expand(ROWS, v).contiguous()
    draft = sample_from_probs(qs, rng.uniform(key, sample_index, position, rng.Role.DRAFT))
    ones = torch.ones(ROWS)
    warp = WarpParams(ones, torch.zeros(ROWS, dtype=torch.int64), ones.clone(), torch.zeros(ROWS), ones.clone(),
                      torch.zeros(ROWS), torch.zeros(ROWS))
    target = logits[None, None, :].expand(ROWS, 2, v).contiguous()
    result, _ = ops.verify(target, draft[:, None], torch.ones(ROWS, dtype=torch.int64), qs[:, None, :].contiguous(),
                           warp, key, sample_index, position)
    empirical = torch.bincount(result.tokens[:, 0], minlength=v).to(torch.float64) / ROWS
    return 0.5 * float((empirical - torch.softmax(logits.to(torch.float64), dim=0)).abs().sum())


def test_approximate_is_opt_in_and_refuses_what_it_cannot_do(triton_path):
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        20, 4, 2, torch.float32, one_hot=False, seed=3, kinds=("top_p",))
    with pytest.raises(ValueError, match="top-k, top-p or min-p"):
        ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position,
                   approximate=True)
    warp.top_p[:] = 1.0
    warp.temperature[0] = 0.0
    with pytest.raises(ValueError, match="greedy"):
        ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position,
                   approximate=True)
    ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position)  # exact: fine
    assert triton_path["approximate"] == 2  # entered twice, refused twice (before any launch)
