"""Counter-based random numbers (specbatch.sampling.rng): known answers, the counter layout, and the
property the whole design rests on: a row's draws do not depend on the batch that computed them."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from scipy import stats

from specbatch.sampling import rng, speculative
from specbatch.sampling.warping import SamplingParams, WarpParams, warp

# Random123's kat_vectors for philox4x32-10: counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


# Many tiny operations: one torch thread avoids synchronization overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = rng.philox4x32(*(torch.tensor(c) for c in counter), *(torch.tensor(k) for k in key))
    assert [int(o) for o in out] == list(expected)


def test_philox_known_answers_vectorized():
    """All vectors at once in one batch: elementwise, so the same answers."""
    cols = list(zip(*[c + k for c, k, _ in PHILOX_KAT]))
    out = rng.philox4x32(*(torch.tensor(c, dtype=torch.int64) for c in cols))
    assert [[int(w[i]) for w in out] for i in range(3)] == [list(e) for _, _, e in PHILOX_KAT]


def test_uniform_counter_layout():
    """u = min(((x0 >> 8) + 0.5) * 2^-24, 1 - 2^-24) in float32, x0 the first word of
    Philox(counter = (position, sample, role, lane), key = the key's low and high 32-bit words):
    pinned so that kernels reproduce it bit for bit."""
    key = torch.tensor([0x0123456789ABCDEF & 0x7FFFFFFFFFFFFFFF, 42, 0])
    sample, position, lane = torch.tensor([3, 0, 7]), torch.tensor([11, 0, 2**20]), torch.tensor([0, 5, 9])
    for role in rng.Role:
        x0, _, _, _ = rng.philox4x32(position, sample, torch.tensor(int(role)), lane, key & rng.MASK32, key >> 32)
        expected = (((x0 >> 8).to(torch.float32) + 0.5) * 2.0**-24).clamp(max=1 - 2.0**-24)
        u = rng.uniform(key, sample, position, role, lane)
        assert u.dtype == torch.float32
        assert torch.equal(u, expected)


def test_uniform_is_strictly_inside_the_unit_interval():
    # The extreme Philox outputs: x0 = 0 gives 2^-25; x0 = 2^32 - 1 would round to 1.0 in float32
    # (k + 0.5 rounds to even above 2^23) and is clamped to the largest float32 below 1.
    words = torch.tensor([0, 0xFF, 0x7FFFFF00, 0xFFFFFF00, 0xFFFFFFFF])
    with mock.patch.object(rng, "philox4x32", lambda *args: (words, words, words, words)):
        u = rng.uniform(torch.zeros(5, dtype=torch.int64), 0, 0, rng.Role.ACCEPT)
    assert u.tolist() == [2.0**-25, 2.0**-25, 0.5 - 2.0**-25, 1 - 2.0**-24, 1 - 2.0**-24]
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())  # Gumbel noise stays finite
    n = 200_000
    u = rng.uniform(torch.tensor(7), torch.arange(n) % 13, torch.arange(n), rng.Role.ACCEPT)
    assert bool(((u > 0) & (u < 1)).all())


def test_uniform_is_uniform_and_independent_across_counters():
    n = 100_000
    idx = torch.arange(n)
    u0 = rng.uniform(torch.tensor(99), idx, torch.zeros(n, dtype=torch.int64), rng.Role.SAMPLE)
    u1 = rng.uniform(torch.tensor(99), idx, torch.ones(n, dtype=torch.int64), rng.Role.SAMPLE)
    u2 = rng.uniform(torch.tensor(99), idx, torch.zeros(n, dtype=torch.int64), rng.Role.RESIDUAL)
    for u in (u0, u1, u2):
        counts = torch.bincount((u * 32).long(), minlength=32)
        assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    for a, b in ((u0, u1), (u0, u2)):  # neighbouring positions, different roles: independent
        joint = torch.bincount((a * 8).long() * 8 + (b * 8).long(), minlength=64)
        assert stats.chisquare(joint.numpy()).pvalue > 1e-4
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02


def test_every_coordinate_changes_the_draw():
    base = dict(key=torch.tensor(5), sample_index=torch.tensor(1), position=torch.tensor(2), role=rng.Role.DRAFT)
    u = rng.uniform(**base)
    for name, other in [("key", torch.tensor(6)), ("sample_index", torch.tensor(2)), ("position", torch.tensor(3)),
                        ("role", rng.Role.ACCEPT)]:
        assert rng.uniform(**{**base, name: other}) != u, name
    assert rng.uniform(**base, lane=1) != u
    assert rng.uniform(torch.tensor(5 + (1 << 32)), base["sample_index"], base["position"], base["role"]) != u


def test_row_key_is_stable_and_separates_seeds_and_prompts():
    assert rng.row_key(0, "a") == 6539243125055167529  # pinned: changing the hash changes every job's output
    assert rng.row_key(1234, "prompt-17") == 4476460823106779312
    keys = {rng.row_key(seed, pid) for seed in range(4) for pid in ["a", "b", 1, 2]}
    assert len(keys) == 16
    assert all(0 <= k < 2**63 for k in keys)
    assert rng.row_key(0, 5) == rng.row_key(0, "5")  # ids are hashed as text


def test_draws_do_not_depend_on_batch_order_or_size():
    g = torch.Generator().manual_seed(0)
    r = 257
    key = torch.randint(0, 2**62, (r,), generator=g)
    sample = torch.randint(0, 16, (r,), generator=g)
    pos = torch.randint(0, 4096, (r,), generator=g)
    offsets = torch.arange(5)[None, :]
    full = rng.uniform(key[:, None], sample[:, None], pos[:, None] + offsets, rng.Role.ACCEPT)  # [R, 5]
    perm = torch.randperm(r, generator=g)
    permuted = rng.uniform(key[perm, None], sample[perm, None], pos[perm, None] + offsets, rng.Role.ACCEPT)
    assert torch.equal(permuted, full[perm])
    for i in (0, 100, 256):  # alone
        alone = rng.uniform(key[i : i + 1, None], sample[i : i + 1, None], pos[i : i + 1, None] + offsets, rng.Role.ACCEPT)
        assert torch.equal(alone, full[i : i + 1])
    for size in (1, 7, 64):  # other batch sizes
        chunks = [rng.uniform(key[s : s + size, None], sample[s : s + size, None], pos[s : s + size, None] + offsets, rng.Role.ACCEPT)
                  for s in range(0, r, size)]
        assert torch.equal(torch.cat(chunks), full)
    flat = rng.uniform(key.repeat_interleave(5), sample.repeat_interleave(5), (pos[:, None] + offsets).reshape(-1), rng.Role.ACCEPT)
    assert torch.equal(flat.view(r, 5), full)  # broadcast and flattened forms agree


def test_gumbel_noise():
    n, v = 20_000, 6
    key = torch.full((n,), 3)
    noise = rng.gumbel(key, torch.arange(n), torch.zeros(n, dtype=torch.int64), v)  # [N, V]
    assert noise.shape == (n, v) and bool(torch.isfinite(noise).all())
    euler_gamma = 0.5772156649
    assert abs(float(noise.mean()) - euler_gamma) < 0.03
    assert abs(float(noise.var()) - math.pi**2 / 6) < 0.1
    # Lane = token id + 1 under role GUMBEL.
    u = rng.uniform(key[:5, None], torch.arange(5)[:, None], 0, rng.Role.GUMBEL, torch.arange(1, v + 1)[None, :])
    assert torch.equal(noise[:5], -torch.log(-torch.log(u)))
    # Gumbel-max samples the distribution.
    p = torch.tensor([0.1, 0.4, 0.0, 0.2, 0.25, 0.05])
    choice = speculative.coupled_choice(p.expand(n, -1), noise)
    counts = torch.bincount(choice, minlength=v)
    assert counts[2] == 0
    keep = p > 0
    expected = p[keep].double() / p[keep].double().sum() * n
    assert stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue > 1e-4


def test_verify_rows_do_not_depend_on_their_batch():
    """The reference verifier decides each row from that row's inputs and keys only: a mixed batch
    (greedy and sampled rows, ragged proposals, one-hot and dense q) equals the rows run alone,
    in reverse order, and in chunks."""
    g = torch.Generator().manual_seed(4)
    r, gamma, v = 64, 4, 8
    logits = torch.randn(r * (gamma + 1), v, generator=g) * 2
    temps = torch.where(torch.arange(r) % 4 == 0, 0.0, 1.0).repeat_interleave(gamma + 1)
    params = [SamplingParams(temperature=float(t)) for t in temps]
    p = warp(logits, WarpParams.from_params(params)).view(r, gamma + 1, v)
    q = torch.softmax(torch.randn(r, gamma, v, generator=g), dim=-1)
    draft = torch.multinomial(q.view(-1, v), 1, generator=g).view(r, gamma)
    num = torch.randint(0, gamma + 1, (r,), generator=g)
    key = torch.randint(0, 2**62, (r,), generator=g)
    sample = torch.randint(0, 4, (r,), generator=g)
    pos = torch.randint(0, 100, (r,), generator=g)

    for q_arg in (q, None):
        def run(idx):
            return speculative.verify(draft[idx], num[idx], p[idx], None if q_arg is None else q_arg[idx], key[idx], sample[idx], pos[idx])

        full = run(torch.arange(r))
        assert int(full.num_tested.sum()) > int(full.num_accepted.sum())  # some rejections
        rev = run(torch.arange(r - 1, -1, -1))
        assert torch.equal(rev.tokens.flip(0), full.tokens) and torch.equal(rev.num_emitted.flip(0), full.num_emitted)
        for i in range(0, r, 9):
            alone = run(torch.tensor([i]))
            assert torch.equal(alone.tokens, full.tokens[i : i + 1])
        chunks = [run(torch.arange(s, min(s + 5, r))).tokens for s in range(0, r, 5)]
        assert torch.equal(torch.cat(chunks), full.tokens)


def test_generated_sequences_do_not_depend_on_batch_order_or_size():
    """Whole speculative runs: a row's tokens are the same alone, in any order and batch size
    (drafter uses only the row's own tokens; proposal counts are a function of row and position)."""
    from tests.exactness import harness

    sc = harness.scenario("penalties")
    rows = 240
    ids = torch.arange(rows)
    full = harness.run_chain(speculative.verify, sc, length=6, gamma=3, row_ids=ids).sequences
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(5))
    assert torch.equal(harness.run_chain(speculative.verify, sc, length=6, gamma=3, row_ids=perm).sequences, full[perm])
    chunks = [harness.run_chain(speculative.verify, sc, length=6, gamma=3, row_ids=ids[s : s + 17]).sequences for s in range(0, rows, 17)]
    assert torch.equal(torch.cat(chunks), full)
    for i in (0, 13, 239):
        alone = harness.run_chain(speculative.verify, sc, length=6, gamma=3, row_ids=ids[i : i + 1]).sequences
        assert torch.equal(alone, full[i : i + 1])
