"""Slot attention: the Triton kernel vs its torch mirror vs a dense attention written here.

Random small steps (ragged own lengths and widths, rows without tokens, padding rows, GQA,
shared prompts read by several rows and rows without one, sliding windows shorter than the
context) run under TRITON_INTERPRET=1.  The chain of checks: the kernel equals the mirror
(``specbatch_kernels.reference_attention``), the mirror equals a per-row dense attention built
here in float64 from the row's keys in logical order, and, on the queries the model uses, the
model's own attention (``llama._matmul_attention``, ``attention.shared_prefix_attention``).  A
deliberately wrong input (window one longer, a prompt key left out) must fail the comparison.
Stale cache positions (beyond a row's length) hold NaN: nothing may read them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from specbatch_kernels import attention as kattention
from specbatch_kernels import ops, reference_attention
from tests.kernel_support import force_triton, keep_backend_choice

pytestmark = [pytest.mark.triton]

NAN = float("nan")


@dataclass
class Case:
    q: torch.Tensor  # [B, W, nh, hd]
    k_cache: torch.Tensor  # [S, kvh, Lmax, hd]
    v_cache: torch.Tensor
    slots: torch.Tensor  # [B]
    own_start: torch.Tensor  # [B]
    num_tokens: torch.Tensor  # [B]
    prefix_k: torch.Tensor | None = None  # [P, kvh, Lp, hd]
    prefix_v: torch.Tensor | None = None
    prefix_slot: torch.Tensor | None = None  # [B]
    prefix_len: torch.Tensor | None = None  # [B]
    window: int | None = None

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.slots, self.own_start, self.num_tokens,
                self.prefix_k, self.prefix_v, self.prefix_slot, self.prefix_len, self.window)


def make_case(seed: int, dtype: torch.dtype, g: int, hd: int, prefix: bool, window: int | None,
              index_dtype: torch.dtype = torch.int64, padding_rows: int = 1) -> Case:
    """A random step: B <= 6 rows (the last ``padding_rows`` are padding rows), W in 1..5, own
    regions of 0..20 tokens before the call, num_tokens in 0..W, distinct row slots; with a
    prefix, 2 prompt slots of up to 24 tokens read by several rows each, and rows reading none.
    Cache positions beyond every length are NaN."""
    gen = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi, n=(): torch.randint(lo, hi + 1, n, generator=gen)  # noqa: E731  (inclusive)
    B, W, kvh = int(ri(3, 6)), int(ri(1, 5)), int(ri(1, 2))
    nh, S, Lmax, P, Lp = kvh * g, B + 2, 28, 2, 24
    slots = torch.randperm(S, generator=gen)[:B]
    num_tokens = ri(0, W, (B,))
    num_tokens[0] = W  # at least one full row
    own_start = ri(0, Lmax - W, (B,))
    own_start[1] = 0  # a row with no own history (first token after its prompt)
    pad = max(0, B - padding_rows)  # the padding rows: pad ..
    num_tokens[pad:] = 0
    own_start[pad:] = 0
    x = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q = x(B, W, nh, hd)
    k_cache, v_cache = x(S, kvh, Lmax, hd), x(S, kvh, Lmax, hd)
    for r in range(B):  # stale: beyond the row's own tokens
        end = int(own_start[r] + num_tokens[r])
        k_cache[slots[r], :, end:] = NAN
        v_cache[slots[r], :, end:] = NAN
    case = Case(q, k_cache, v_cache, slots.to(index_dtype), own_start.to(index_dtype), num_tokens.to(index_dtype),
                window=window)
    if prefix:
        prompt_tokens = torch.tensor([int(ri(1, Lp)), int(ri(1, Lp))])  # [P] each prompt's length
        prefix_slot = ri(0, P - 1, (B,))
        prefix_len = prompt_tokens[prefix_slot]
        prefix_len[2] = 0  # a row without a prompt link (prefix_slot stays arbitrary)
        prefix_len[pad:] = 0
        prefix_k, prefix_v = x(P, kvh, Lp, hd), x(P, kvh, Lp, hd)
        for p in range(P):
            prefix_k[p, :, int(prompt_tokens[p]):] = NAN
            prefix_v[p, :, int(prompt_tokens[p]):] = NAN
        case = replace(case, prefix_k=prefix_k, prefix_v=prefix_v, prefix_slot=prefix_slot.to(index_dtype),
                       prefix_len=prefix_len.to(index_dtype))
    return case


def dense(case: Case, window: int | None = None, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, in float64: the row's keys in logical order (prompt keys 0.., then own keys at
    prefix_len + i), each query j at prefix_len + own_start + min(j, num_tokens - 1) attending
    keys at or before it (own keys only the call's real ones) within the window.
    -> [B, W, nh, hd] float64; a query without keys gives zeros."""
    window = case.window if window is None else window
    q = case.q.double()
    B, W, nh, hd = q.shape
    kvh = case.k_cache.shape[1]
    out = torch.zeros(B, W, nh, hd, dtype=torch.float64)
    for r in range(B):
        start, n = int(case.own_start[r]), int(case.num_tokens[r])
        plen = 0
        keys, values, key_pos = [], [], []
        if case.prefix_k is not None:
            plen = int((case.prefix_len if prefix_len is None else prefix_len)[r])
            ps = int(case.prefix_slot[r])
            keys.append(case.prefix_k[ps, :, :plen])
            values.append(case.prefix_v[ps, :, :plen])
            key_pos += list(range(plen))
        s = int(case.slots[r])
        keys.append(case.k_cache[s, :, : start + n])
        values.append(case.v_cache[s, :, : start + n])
        key_pos += [plen + i for i in range(start + n)]
        k = torch.cat(keys, dim=1).double()  # [kvh, L, hd]
        v = torch.cat(values, dim=1).double()
        pos = torch.tensor(key_pos, dtype=torch.float64)  # [L]
        for j in range(W):
            qpos = plen + start + min(j, max(n - 1, 0))
            visible = pos <= qpos
            if window is not None:
                visible &= qpos - pos < window
            if not bool(visible.any()):
                continue
            for h in range(nh):
                kv = h // (nh // kvh)
                scores = (k[kv, visible] @ q[r, j, h]) * hd**-0.5  # [L visible]
                out[r, j, h] = torch.softmax(scores, dim=0) @ v[kv, visible]
    return out


def real(case: Case) -> torch.Tensor:
    """[B, W] bool: the queries whose outputs are used (j < num_tokens)."""
    return torch.arange(case.q.shape[1])[None, :] < case.num_tokens[:, None]


def tolerance(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.allclose(a.double(), b.double(), **tolerance(dtype))


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton backend for one test and count kernel launches through ops."""
    return force_triton(monkeypatch, kattention, "slot_attention_triton", "attention")


# A sampled set of configurations: (seed, dtype, g, hd, prefix, window, index dtype).
CASES = [
    (0, torch.float32, 1, 16, False, None, torch.int64),
    (1, torch.float32, 2, 32, True, None, torch.int64),
    (2, torch.float32, 4, 16, True, 7, torch.int32),
    (3, torch.float32, 2, 16, False, 5, torch.int64),
    (4, torch.bfloat16, 4, 32, True, 9, torch.int64),
    (5, torch.bfloat16, 1, 16, True, None, torch.int32),
    (6, torch.bfloat16, 2, 16, False, 3, torch.int64),
    (7, torch.float32, 1, 32, True, 1, torch.int64),
]


@pytest.mark.parametrize("seed,dtype,g,hd,prefix,window,index_dtype", CASES)
def test_kernel_equals_reference_and_dense(triton_path, seed, dtype, g, hd, prefix, window, index_dtype):
    case = make_case(seed, dtype, g, hd, prefix, window, index_dtype)
    got = ops.slot_attention(*case.args())
    assert triton_path["attention"] == 1
    assert got.dtype == dtype and got.shape == case.q.shape
    want = reference_attention.slot_attention(*case.args())
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    # (1) kernel = mirror on every query, padded ones included (they attend like the last real one).
    torch.testing.assert_close(got.double(), want.double(), **tolerance(dtype))
    # (2) mirror = dense per-row attention, in float32 to float32 rounding.
    if dtype == torch.float32:
        torch.testing.assert_close(want.double(), dense(case), atol=2e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(want.double(), dense(case), **tolerance(dtype))
    # (3) padding rows: zeros.
    assert (got[-1] == 0).all() and (want[-1] == 0).all()


@pytest.mark.parametrize("seed", range(100, 116))
def test_random_steps(triton_path, seed):
    """Random configurations: kernel = mirror = dense on every query."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (), generator=gen))]  # noqa: E731
    dtype, g, hd = pick([torch.float32, torch.bfloat16]), pick([1, 2, 4]), pick([16, 32])
    prefix, window, index_dtype = pick([False, True]), pick([None, 1, 2, 4, 8, 17]), pick([torch.int32, torch.int64])
    case = make_case(seed, dtype, g, hd, prefix, window, index_dtype, padding_rows=pick([0, 1, 2]))
    got = ops.slot_attention(*case.args())
    want = reference_attention.slot_attention(*case.args())
    torch.testing.assert_close(got.double(), want.double(), **tolerance(dtype))
    torch.testing.assert_close(want.double(), dense(case), **tolerance(dtype))
    assert triton_path["attention"] == 1


def test_small_key_tiles_and_strided_queries(triton_path):
    """Several key tiles per row (BLOCK_N 16 over up to 52 keys) and q a strided view, as the
    model's q is a slice of the fused q/k/v projection."""
    case = make_case(11, torch.float32, 2, 32, True, 13)
    B, W, nh, hd = case.q.shape
    kvh = case.k_cache.shape[1]
    qkv = torch.randn(B, W, nh + 2 * kvh, hd)
    qkv[:, :, :nh] = case.q
    strided = replace(case, q=qkv[:, :, :nh])
    assert not strided.q.is_contiguous()
    got = ops.slot_attention(*strided.args())
    torch.testing.assert_close(got.double(), dense(case), atol=2e-5, rtol=1e-5)
    assert triton_path["attention"] == 1


@pytest.mark.parametrize("hd", [8, 24])
def test_head_size_not_a_power_of_two_is_masked(triton_path, hd):
    """hd below 16 or not a power of two: the kernel pads the head dim by masking."""
    case = make_case(71 + hd, torch.float32, 2, hd, True, 6)
    got = ops.slot_attention(*case.args())
    torch.testing.assert_close(got.double(), dense(case), atol=2e-5, rtol=1e-5)
    assert triton_path["attention"] == 1


def test_padding_only_step_gives_zeros(triton_path):
    """A step of nothing but padding rows: zeros from both backends, never NaN."""
    case = make_case(21, torch.bfloat16, 2, 16, True, 4, padding_rows=6)
    assert int(case.num_tokens.sum()) == 0 and int(case.prefix_len.sum()) == 0 and int(case.own_start.sum()) == 0
    got = ops.slot_attention(*case.args())
    want = reference_attention.slot_attention(*case.args())
    assert (got == 0).all() and (want == 0).all()


@pytest.mark.parametrize("prefix", [False, True])
def test_reference_equals_the_models_attention(prefix):
    """The mirror equals the model's own attention on the queries it uses: ``_matmul_attention``
    over the rows' gathered slots (unshared), ``shared_prefix_attention`` with prompt groups."""
    from specbatch.models.attention import shared_prefix_attention
    from specbatch.models.llama import _matmul_attention

    case = make_case(31 + prefix, torch.float32, 2, 16, prefix, 6)
    B, W = case.q.shape[:2]
    qi = case.own_start[:, None] + torch.arange(W)  # [B, W] own-region index (unclamped, as the model)
    Lo = int((case.own_start + case.num_tokens).max())
    i = torch.arange(Lo)
    allowed = (i <= qi[:, :, None]) & (qi[:, :, None] - i < case.window)  # [B, W, Lo]
    allowed |= ~real(case)[:, :, None]  # padded queries attend anywhere (finite, unused), as in the model
    keys = case.k_cache[case.slots, :, :Lo].nan_to_num()  # the model's cache holds no NaN
    values = case.v_cache[case.slots, :, :Lo].nan_to_num()
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    want = reference_attention.slot_attention(*case.args())
    if not prefix:
        model = _matmul_attention(case.q, keys, values, bias[:, None, None])
    else:
        groups, group = torch.unique(case.prefix_slot, return_inverse=True)
        rank = torch.zeros_like(group)
        for r in range(B):
            rank[r] = int((group[:r] == group[r]).sum())
        Lp = int(case.prefix_len.max())
        p = torch.arange(Lp)
        plen = case.prefix_len[:, None, None]
        pre_allowed = (p < plen) & (plen + qi[:, :, None] - p < case.window)
        pre_allowed |= ~real(case)[:, :, None]
        pre_bias = torch.zeros(pre_allowed.shape).masked_fill_(~pre_allowed, float("-inf"))
        model = shared_prefix_attention(case.q, keys, values, case.prefix_k[groups, :, :Lp].nan_to_num(),
                                        case.prefix_v[groups, :, :Lp].nan_to_num(), torch.cat([pre_bias, bias], -1),
                                        group, rank, int(rank.max()) + 1)
    use = real(case)
    model = model.reshape(case.q.shape)  # _matmul_attention leaves the heads as [kvh, g]
    torch.testing.assert_close(want[use], model[use], atol=2e-5, rtol=1e-5)


def test_wrong_variants_fail_the_comparison(triton_path):
    """The comparison catches a window off by one and a prompt key left out: the kernel run on
    those inputs must differ from the dense attention of the true ones (else the checks above
    could pass a kernel with that bug)."""
    case = make_case(41, torch.float32, 2, 16, True, 5)
    truth = dense(case)
    assert close(ops.slot_attention(*case.args()), truth, torch.float32)
    wider = replace(case, window=case.window + 1)
    assert not close(ops.slot_attention(*wider.args()), truth, torch.float32)
    shorter = replace(case, window=None)  # also the window ignored
    assert not close(ops.slot_attention(*shorter.args()), truth, torch.float32)
    unwindowed = make_case(42, torch.float32, 2, 16, True, None)
    one_less = replace(unwindowed, prefix_len=(unwindowed.prefix_len - 1).clamp(min=0))
    assert not close(ops.slot_attention(*one_less.args()), dense(unwindowed), torch.float32)
    # and the dense side: the same mistakes made there are caught against the kernel.
    assert not close(dense(case, window=case.window - 1), ops.slot_attention(*case.args()), torch.float32)
    assert not close(dense(unwindowed, prefix_len=one_less.prefix_len), ops.slot_attention(*unwindowed.args()),
                     torch.float32)
    assert triton_path["attention"] == 6


def test_torch_backend_runs_the_reference(monkeypatch):
    """On the torch backend the wrapper runs the mirror (no Triton launch)."""
    keep_backend_choice(monkeypatch)
    ops.force_backend("torch")
    launched = []
    monkeypatch.setattr(kattention, "slot_attention_triton", lambda *a, **k: launched.append(1))
    case = make_case(51, torch.bfloat16, 4, 16, True, 6)
    got = ops.slot_attention(*case.args())
    assert not launched
    torch.testing.assert_close(got, reference_attention.slot_attention(*case.args()), atol=0, rtol=0)
    assert kattention.slot_attention is ops.slot_attention


def test_wrapper_refuses_bad_arguments():
    case = make_case(61, torch.float32, 2, 16, True, 4)
    bad = [
        (replace(case, q=case.q[..., :15]), "does not fit"),
        (replace(case, slots=case.slots.float()), "int32 or int64"),
        (replace(case, num_tokens=case.num_tokens[:-1]), "shape"),
        (replace(case, prefix_v=None), "go together"),
        (replace(case, window=0), "window"),
        (replace(case, k_cache=case.k_cache.to(torch.bfloat16)), "k_cache"),
        (replace(case, k_cache=case.k_cache[:, :1].expand(-1, 2, -1, -1), v_cache=case.v_cache[:, :1].expand(-1, 2, -1, -1),
                 q=case.q[:, :, :1].expand(-1, -1, 3, -1), prefix_k=None, prefix_v=None, prefix_slot=None,
                 prefix_len=None), "multiple"),
    ]
    for c, message in bad:
        with pytest.raises(ValueError, match=message):
            ops.slot_attention(*c.args())
