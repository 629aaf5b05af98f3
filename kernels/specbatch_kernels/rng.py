"""Counter-based uniforms inside Triton kernels: the same function as ``specbatch.sampling.rng.uniform``.

Philox-4x32-10 with key = the row key's two 32-bit halves and counter = (position, sample index,
role, lane); only the first output word is used, as ``u = ((x0 >> 8) + 0.5) * 2**-24`` in (0, 1).
Here the 32x32 -> 64-bit products use native uint32 arithmetic (``tl.umulhi`` for the high word,
a wrapping multiply for the low word), so the result is bit for bit the torch reference's.

The reference this must match sits in ``specbatch/sampling/rng.py``; ``tests/test_kernels_rng.py`` checks
them against each other.  Memory traffic: none (pure arithmetic on scalars or blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl

from specbatch.sampling import rng as _ref

PHILOX_M0 = tl.constexpr(_ref.PHILOX_M0)
PHILOX_M1 = tl.constexpr(_ref.PHILOX_M1)
PHILOX_W0 = tl.constexpr(_ref.PHILOX_W0)
PHILOX_W1 = tl.constexpr(_ref.PHILOX_W1)


@triton.jit
def _u32(x):
    """Low 32 bits of an integer value as uint32 (int64 inputs are masked first)."""
    return (tl.cast(x, tl.int64) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def philox_x0(c0, c1, c2, c3, k0, k1):
    """First output word of Philox-4x32-10; every argument is uint32 (scalar or block)."""
    m0 = tl.full((), PHILOX_M0, tl.uint32)
    m1 = tl.full((), PHILOX_M1, tl.uint32)
    w0 = tl.full((), PHILOX_W0, tl.uint32)
    w1 = tl.full((), PHILOX_W1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0


@triton.jit
def uniform(key, sample_index, position, role, lane):
    """Uniform float32 in (0, 1) for (row key, sample index, position, role, lane).

    key, sample_index, position: int64 (scalars or blocks); role, lane: integers.
    """
    key64 = key.to(tl.int64)
    k0 = _u32(key64)
    k1 = _u32(key64 >> 32)
    x0 = philox_x0(_u32(position), _u32(sample_index), _u32(role), _u32(lane), k0, k1)
    u = ((x0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
    # (2^24 - 1) + 0.5 rounds up to 2^24 in float32: clamp to the largest float32 below 1, as the torch contract does.
    return tl.minimum(u, 0.99999994)


@triton.jit
def _uniform_kernel(key_ptr, sample_ptr, pos_ptr, role_ptr, lane_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Test/bench entry point: out[i] = uniform(key[i], sample[i], pos[i], role[i], lane[i])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = tl.load(key_ptr + offs, mask=mask, other=0)
    sample = tl.load(sample_ptr + offs, mask=mask, other=0)
    pos = tl.load(pos_ptr + offs, mask=mask, other=0)
    role = tl.load(role_ptr + offs, mask=mask, other=0)
    lane = tl.load(lane_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, uniform(key, sample, pos, role, lane), mask=mask)


def uniform_triton(key, sample_index, position, role, lane):
    """Host helper: all arguments int64 tensors of one shape [N] -> float32 [N] from the kernel."""
    import torch

    args = [torch.as_tensor(t, dtype=torch.int64).contiguous() for t in (key, sample_index, position, role, lane)]
    n = args[0].numel()
    out = torch.empty(n, dtype=torch.float32, device=args[0].device)
    block = 256
    _uniform_kernel[(triton.cdiv(n, block),)](*args, out, n, BLOCK=block)
    return out
