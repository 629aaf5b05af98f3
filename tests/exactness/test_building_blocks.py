"""Deterministic unit tests of the verifier's building blocks and of which random number decides what
(the statistical harness checks the whole; these pin the pieces the mutants break)."""

from __future__ import annotations

import torch

from specbatch.sampling import rng, speculative
from specbatch.sampling.warping import sample_from_probs


def t(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def test_acceptance_test_is_strict_and_division_free():
    p = t([0.2, 0.21, 0.0, 0.3], torch.float32)
    q = t([0.4, 0.4, 0.0, 0.0], torch.float32)
    u = t([0.5, 0.5, 0.5, 0.9], torch.float32)
    assert speculative.acceptance_test(p, q, u).tolist() == [False, True, False, True]


def test_residual_clamps_and_falls_back_to_p():
    p = t([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], torch.float32)
    q = t([[0.2, 0.7, 0.1], [0.2, 0.3, 0.5]], torch.float32)
    res = speculative.residual(p, q)
    torch.testing.assert_close(res[0], t([0.3, 0.0, 0.0], torch.float32))
    assert torch.equal(res[1], p[1])  # p <= q everywhere: sample from p


def test_first_rejection_counts_leading_accepts_within_proposed():
    accepted = t([[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], torch.bool)
    assert speculative.first_rejection(accepted, t([4, 4, 2, 4])).tolist() == [2, 4, 2, 0]
    assert speculative.first_rejection(torch.ones(2, 0, dtype=torch.bool), t([0, 0])).tolist() == [0, 0]


def _one_hot(idx, v):
    return torch.nn.functional.one_hot(t(idx), v).to(torch.float32)


def test_greedy_rows_accept_iff_argmax_and_emit_it_otherwise():
    v = 4
    p = _one_hot([[2, 1, 3], [2, 1, 3]], v)  # [2, G+1=3, V]: greedy target path 2, 1, then 3
    q = torch.full((2, 2, v), 0.25)
    draft = t([[2, 1], [2, 0]])
    res = speculative.verify(draft, t([2, 2]), p, q, t([1, 1]), t([0, 1]), t([0, 0]))
    assert res.tokens.tolist() == [[2, 1, 3], [2, 1, -1]]
    assert res.num_accepted.tolist() == [2, 1] and res.num_tested.tolist() == [2, 2]


def test_which_uniform_decides_what():
    """Accept tests use role ACCEPT at position + i, the recovered token role RESIDUAL and the bonus
    role SAMPLE, both at position + accepted."""
    v = 5
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 3, v, generator=g), -1)
    key, sample, pos = t([77]), t([2]), t([10])
    # q = p: every test accepts (u * p < p), the bonus comes from p_2 with the SAMPLE uniform at 12.
    res = speculative.verify(t([[1, 3]]), t([2]), p, p[:, :2].clone(), key, sample, pos)
    u = rng.uniform(key, sample, pos + 2, rng.Role.SAMPLE)
    assert res.tokens.tolist() == [[1, 3, int(sample_from_probs(p[:, 2], u))]]
    # p_1(x_1) = 0: the second test rejects for sure; the recovered token is drawn from
    # norm(max(p_1 - q_1, 0)) with the RESIDUAL uniform at position 11.
    p2 = p.clone()
    p2[0, 1, 3] = 0.0
    p2[0, 1] /= p2[0, 1].sum()
    q = torch.softmax(torch.randn(1, 2, v, generator=g), -1)
    accept0 = bool(rng.uniform(key, sample, pos, rng.Role.ACCEPT) * q[0, 0, 1] < p2[0, 0, 1])
    res = speculative.verify(t([[1, 3]]), t([2]), p2, q, key, sample, pos)
    if accept0:
        u = rng.uniform(key, sample, pos + 1, rng.Role.RESIDUAL)
        expected = int(sample_from_probs(speculative.residual(p2[:, 1], q[:, 1]), u))
        assert res.tokens.tolist() == [[1, expected, -1]]
    else:
        u = rng.uniform(key, sample, pos, rng.Role.RESIDUAL)
        expected = int(sample_from_probs(speculative.residual(p2[:, 0], q[:, 0]), u))
        assert res.tokens.tolist() == [[expected, -1, -1]]


def test_zero_proposals_is_plain_sampling():
    v = 6
    p = torch.softmax(torch.randn(3, 1, v, generator=torch.Generator().manual_seed(1)), -1)
    key, sample, pos = t([1, 2, 3]), t([0, 0, 1]), t([0, 5, 9])
    res = speculative.verify(torch.zeros(3, 0, dtype=torch.int64), t([0, 0, 0]), p, None, key, sample, pos)
    expected = sample_from_probs(p[:, 0], rng.uniform(key, sample, pos, rng.Role.SAMPLE))
    assert res.tokens[:, 0].tolist() == expected.tolist()
    assert res.num_emitted.tolist() == [1, 1, 1] and res.num_tested.tolist() == [0, 0, 0]


def test_cut_keeps_a_prefix_and_untests_the_rest():
    res = speculative.VerifyResult(
        tokens=t([[4, 5, 6, 7], [1, 2, -1, -1]]),
        num_emitted=t([4, 2]),
        num_tested=t([3, 2]),
        num_accepted=t([3, 1]),
        num_proposed=t([3, 3]),
    )
    out = speculative.cut(res, t([2, 5]))
    assert out.tokens.tolist() == [[4, 5, -1, -1], [1, 2, -1, -1]]
    assert out.num_emitted.tolist() == [2, 2]
    assert out.num_tested.tolist() == [2, 2] and out.num_accepted.tolist() == [2, 1]


def test_stop_cut_finds_the_first_stop_and_respects_the_budget():
    tokens = t([[5, 7, 9, -1], [5, 6, 8, 9], [7, 7, -1, -1]])
    is_stop = (tokens == 7) | (tokens == 9)
    emitted = t([3, 4, 2])
    assert speculative.stop_cut(tokens, emitted, is_stop, t([10, 10, 10])).tolist() == [2, 4, 1]
    assert speculative.stop_cut(tokens, emitted, is_stop, t([1, 2, 10])).tolist() == [1, 2, 1]
    # A stop after num_emitted (padding) does not count.
    assert speculative.stop_cut(t([[1, 7]]), t([1]), t([[False, True]]), t([5])).tolist() == [1]
