"""Counter-based random numbers: every draw is a pure function of where it is used.

A draw is keyed by

    (row key, sample index, position, role[, lane])

where the *row key* is a 64-bit hash of (job seed, prompt id) made once on the host
(:func:`row_key`), the *sample index* is which of the N samples of a prompt this row is,
*position* is the absolute position in the completion (0 = first generated token), and
*role* says what the draw is for (:class:`Role`).  ``lane`` is 0 except for per-token noise
(coupled verification), where it is the token id + 1.

The generator is Philox-4x32-10 (Salmon et al., SC'11): key = the row key's two 32-bit
halves, counter = (position, sample index, role, lane).  Only the first output word is used,
turned into a float32 uniform in the open interval (0, 1) with 24 random bits::

    u = min(((x0 >> 8) + 0.5) * 2**-24, 1 - 2**-24)    (float32 arithmetic)

(in float32, k + 0.5 rounds to even for k >= 2**23, and the one value that would round up to
1.0 is clamped to the largest float32 below 1, so u is always inside the open interval).

Torch has no unsigned 32-bit multiply, so the 32x32 -> 64-bit products are computed in
int64 from 16-bit halves, which never overflows.  The Triton kernels compute the same
function with native uint32 arithmetic (``kernels/specbatch_kernels/rng.py``); tests check they agree bit for bit.

Because nothing here has state, a row's draws do not depend on which batch, slot, shard or
actor computed them, nor on the order of rows in a batch.
"""

from __future__ import annotations

import enum
import hashlib

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_MAX = 1.0 - 2.0**-24  # largest float32 below 1


class Role(enum.IntEnum):
    """What a random number is used for; part of the counter, so roles never share draws."""

    DRAFT = 0  # the drafter sampling its proposal at a position
    ACCEPT = 1  # the acceptance test u * q(x) < p(x)
    RESIDUAL = 2  # the recovered token drawn from norm(max(p - q, 0)) at the first rejection
    SAMPLE = 3  # a token drawn from p: bonus tokens, plain rows, each sample's first token
    GUMBEL = 4  # per-token Gumbel noise for coupled verification (lane = token id + 1)


def row_key(seed: int, prompt_id: str | int) -> int:
    """64-bit key of one prompt's rows under one job seed (stable across processes and runs)."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{prompt_id}".encode(), digest_size=8).digest()
    # Keep it a non-negative int64 so it fits a torch.int64 tensor.
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, a: int64 tensor < 2**32, b < 2**32."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    t_lo = a * b_lo  # < 2**48
    t_hi = a * b_hi  # < 2**48
    mid = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2**49
    lo = mid & MASK32
    hi = ((t_hi >> 16) + (mid >> 32)) & MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding uint32 values (all broadcastable)."""
    c0, c1, c2, c3 = (t.to(torch.int64) & MASK32 for t in (c0, c1, c2, c3))
    k0, k1 = k0.to(torch.int64) & MASK32, k1.to(torch.int64) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniform(
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
    role: Role | int | torch.Tensor,
    lane: torch.Tensor | int = 0,
) -> torch.Tensor:
    """Uniform float32 in (0, 1), one per broadcast element of the inputs.

    key: int64 row keys; sample_index, position: integer tensors; all broadcast together.
    """
    key = torch.as_tensor(key, dtype=torch.int64)
    device = key.device
    sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=device)
    position = torch.as_tensor(position, dtype=torch.int64, device=device)
    lane = torch.as_tensor(lane, dtype=torch.int64, device=device)
    role_t = torch.as_tensor(role if isinstance(role, torch.Tensor) else int(role), dtype=torch.int64, device=device)
    x0, _, _, _ = philox4x32(position, sample_index, role_t, lane, key & MASK32, key >> 32)
    u = ((x0 >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    # float32 rounds k + 0.5 to even for k >= 2**23, so k = 2**24 - 1 would give exactly 1.0
    # (and Gumbel noise +inf): clamp to the largest float32 below 1 to stay inside (0, 1).
    return u.clamp(max=UNIFORM_MAX)


def gumbel(key: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise per token for coupled verification.

    key, sample_index, position: [M] -> returns [M, vocab_size] float32.
    """
    lane = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=key.device)  # [V]
    u = uniform(key[:, None], sample_index[:, None], position[:, None], Role.GUMBEL, lane[None, :])  # [M, V]
    return -torch.log(-torch.log(u))
