"""Host wrapper: what the engine calls.  Validates, allocates, picks the backend once.

Backends: ``"triton"`` runs the fused kernels; ``"torch"`` runs the unfused torch reference
(``specbatch_kernels.reference``: ``specbatch.sampling.warping`` + ``specbatch.sampling.speculative``, no Triton).
The kernel modules import Triton; they are imported only when a call takes the Triton path, so
the torch backend works where Triton is not installed.  The choice is made once, on first use:
``SPECBATCH_KERNELS=triton`` or ``=torch`` in the environment decides; otherwise Triton when CUDA
is available, else torch.  :func:`force_backend` overrides it (tests use it to run the kernels
under the interpreter).  An automatic "triton" applies to CUDA tensors; CPU tensors then take the
torch reference (one rule, :func:`_use_triton`).  A *forced* "triton" runs CPU tensors through
the kernels too, which needs ``TRITON_INTERPRET=1``.

Sparse adjustments (logit bias, repetition/presence/frequency penalties, min_new_tokens bans)
are applied in torch before the kernels (``specbatch.sampling.warping.apply_bias_and_penalties``); the
kernels do temperature/greedy, top-k, top-p, min-p, softmax, the acceptance test and the
recovered/bonus draw, with the counter-based uniforms computed in-kernel.

Row layout for verification: pair (r, i) of R rows and G+1 positions is flattened row-major,
``pair = r * (G + 1) + i``.  ``warp`` may hold R entries (one per row, expanded to its positions)
or R*(G+1) entries (one per pair); ``history`` and ``ban`` are per pair.
"""

from __future__ import annotations

import os

import torch

from specbatch.sampling import rng
from specbatch.sampling.warping import WARP_DTYPES, History, WarpParams, apply_bias_and_penalties
from specbatch.sampling.speculative import VerifyResult
from specbatch_kernels import reference, reference_attention
from specbatch_kernels.reference import SampleRows, VerifyStep

BACKENDS = ("triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_backend: str | None = None
_forced = False  # the backend was asked for (environment or force_backend), not inferred


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend() -> str:
    """The backend in use, chosen once: "triton" or "torch"."""
    global _backend, _forced
    if _backend is None:
        wanted = os.environ.get("SPECBATCH_KERNELS", "").strip().lower()
        if wanted:
            force_backend(wanted)
        else:
            _backend = "triton" if torch.cuda.is_available() and _triton_usable() else "torch"
            _forced = False
    return _backend


def force_backend(name: str | None) -> None:
    """Use ``name`` ("triton" or "torch") from now on; None chooses again on next use."""
    global _backend, _forced
    if name is None:
        _backend = None
        _forced = False
        return
    if name not in BACKENDS:
        raise ValueError(f"SPECBATCH_KERNELS must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not _triton_usable():
        raise RuntimeError("the triton backend was asked for but triton is not installed")
    _backend = name
    _forced = True


def _use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the kernels (the one dispatch rule)."""
    if backend() != "triton":
        return False
    return device.type == "cuda" or _forced


# --------------------------------------------------------------------------- validation


def _check_device(t: torch.Tensor, what: str) -> None:
    if _use_triton(t.device) and t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what}: the forced triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def _index_vector(t: torch.Tensor, n: int, what: str, device: torch.device) -> torch.Tensor:
    """A [n] int64 tensor on device, contiguous (small: made so rather than refused)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.shape != (n,):
        raise ValueError(f"{what} must have shape [{n}], got {tuple(t.shape)}")
    if t.dtype != torch.int64:
        raise ValueError(f"{what} must be int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the logits on {device}")
    return t.contiguous()


def _logits(t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{what} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape[-1] < 1:
        raise ValueError(f"{what} has an empty vocabulary")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous in the vocabulary dim (stride {t.stride(-1)})")
    _check_device(t, what)


def _params(warp: WarpParams, rows: int, per_row: int, device: torch.device) -> WarpParams:
    """Warp parameters with one entry per logits row: expands per-sequence entries if needed."""
    n = len(warp)
    if n == rows * per_row:
        out = warp
    elif n == rows:
        out = warp.index(torch.arange(rows, device=warp.temperature.device).repeat_interleave(per_row))
    else:
        raise ValueError(f"warp has {n} rows, expected {rows} (per row) or {rows * per_row} (per position)")

    def col(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != WARP_DTYPES[name]:
            raise ValueError(f"warp.{name} must be {WARP_DTYPES[name]}, got {t.dtype}")
        return t.to(device).contiguous()

    return out.map(col)


def _adjusted(flat: torch.Tensor, params: WarpParams, history: History | None, ban: torch.Tensor | None) -> torch.Tensor:
    """Apply bias, penalties and bans in torch when there are any. flat: [M, V] -> [M, V]."""
    needs = params.logit_bias is not None or (history is not None and params.any_penalty) or ban is not None
    if not needs:
        return flat
    scores = apply_bias_and_penalties(flat, params, history)  # [M, V] float32
    if ban is not None:
        scores = scores.masked_fill(ban.reshape(scores.shape).to(torch.bool), float("-inf"))
    return scores


# --------------------------------------------------------------------------- entry points


def warp_and_sample(
    logits: torch.Tensor,
    warp: WarpParams,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
    role: rng.Role | int = rng.Role.SAMPLE,
    history: History | None = None,
    ban: torch.Tensor | None = None,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp M rows of logits and draw one token each with the uniform of (key, sample, position, role).

    logits: [M, V] float32/bf16/fp16; warp: M rows; key, sample_index, position: [M] int64;
    role: Role.SAMPLE for plain rows, Role.DRAFT for draft proposals; history/ban as in
    ``specbatch.sampling.warping.warp``.
    Returns (tokens [M] int64, logprob [M] float32 = log p(token)), or with return_probs=True
    (tokens [M] int64, probs [M, V] float32 = the full warped distribution sampled from: the q a
    drafter must hand to verification).
    """
    _logits(logits, 2, "logits")
    m, v = logits.shape
    dev = logits.device
    key, sample_index, position = (
        _index_vector(t, m, name, dev) for t, name in ((key, "key"), (sample_index, "sample_index"), (position, "position"))
    )
    params = _params(warp, m, 1, dev)
    rows = SampleRows(_adjusted(logits, params, history, ban), params, key, sample_index, position, int(role))
    if _use_triton(dev):
        from specbatch_kernels import warp as kernels  # imports triton: only on this path

        tokens, logprob, probs = kernels.warp_and_sample_triton(rows, return_probs)
    else:
        tokens, logprob, probs = reference.warp_and_sample(rows, return_probs)
    return (tokens, probs) if return_probs else (tokens, logprob)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    draft_probs: torch.Tensor | None,
    warp: WarpParams,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
    history: History | None = None,
    ban: torch.Tensor | None = None,
    approximate: bool = False,
    coupled: bool = False,
) -> tuple[VerifyResult, torch.Tensor]:
    """Verify one speculative step from target logits (see ``specbatch.sampling.speculative.verify``).

    target_logits: [R, G+1, V] float32/bf16/fp16 (position i scores proposal i; G+1 = bonus);
    draft_tokens: [R, G] int64; num_proposed: [R] int64 in 0..G;
    draft_probs: [R, G, V] float32, the q each proposal was sampled from, or None (one-hot q);
    warp: R rows (per sequence) or R*(G+1) (per pair r*(G+1)+i); key, sample_index,
    position (completion position of the first proposal): [R] int64;
    history: per pair (R*(G+1) rows), ban: [R, G+1, V] or [R*(G+1), V] bool.
    approximate: opt-in sigmoid approximation of p (``specbatch_kernels.approximate``): NOT exact.
    coupled: Gumbel-coupled verification (``specbatch.sampling.speculative.verify_coupled``; draft_probs
    unused), which has no kernel: it runs the torch reference whatever the backend.
    Returns (VerifyResult, logprobs [R, G+1] float32: log p of each emitted token under the
    warped target at its position, 0 after num_emitted).
    """
    _logits(target_logits, 3, "target_logits")
    r, g1, v = target_logits.shape
    g = g1 - 1
    dev = target_logits.device
    if draft_tokens.shape != (r, g) or draft_tokens.dtype != torch.int64:
        raise ValueError(f"draft_tokens must be int64 [{r}, {g}], got {draft_tokens.dtype} {tuple(draft_tokens.shape)}")
    if draft_tokens.device != dev:
        raise ValueError(f"draft_tokens is on {draft_tokens.device}, the logits on {dev}")
    draft_tokens = draft_tokens.contiguous()
    num_proposed = _index_vector(num_proposed, r, "num_proposed", dev)
    key, sample_index, position = (
        _index_vector(t, r, name, dev) for t, name in ((key, "key"), (sample_index, "sample_index"), (position, "position"))
    )
    if draft_probs is not None:
        if draft_probs.shape != (r, g, v) or draft_probs.dtype != torch.float32:
            raise ValueError(f"draft_probs must be float32 [{r}, {g}, {v}], got {draft_probs.dtype} {tuple(draft_probs.shape)}")
        if v > 1 and draft_probs.stride(-1) != 1:
            raise ValueError("draft_probs must be contiguous in the vocabulary dim")
        if draft_probs.device != dev:
            raise ValueError(f"draft_probs is on {draft_probs.device}, the logits on {dev}")
    if dev.type == "cpu":  # value checks cost a device sync elsewhere; cheap here
        if bool(((num_proposed < 0) | (num_proposed > g)).any()):
            raise ValueError(f"num_proposed must be in 0..{g}")
        live = torch.arange(g)[None, :] < num_proposed[:, None]
        if bool(((draft_tokens < 0) | (draft_tokens >= v))[live].any()):
            raise ValueError(f"proposed draft_tokens must be in 0..{v - 1}")
    params = _params(warp, r, g1, dev)
    scores = _adjusted(target_logits.reshape(r * g1, v), params, history, ban).view(r, g1, v)  # [R, G+1, V]
    step = VerifyStep(scores, draft_tokens, num_proposed, draft_probs, params, key, sample_index, position)
    if coupled:
        if approximate:
            raise ValueError("coupled verification cannot be approximate")
        result, logprobs, _ = reference.verify_coupled(step)
        return result, logprobs
    if _use_triton(dev):  # the kernel modules import triton: only on this path
        if approximate:
            from specbatch_kernels import approximate as kernels
        else:
            from specbatch_kernels import verify as kernels
        return kernels.verify_triton(step)
    result, logprobs, _ = (reference.verify_approximate if approximate else reference.verify)(step)
    return result, logprobs


def verify_probs(
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
) -> VerifyResult:
    """Mirror of ``specbatch.sampling.speculative.verify`` (same signature, p given as probabilities) through
    :func:`verify`, so the exactness harness can run the kernels in the reference verifier's place.

    log p as logits at temperature 1 is an exact input: softmax(log p) = p, zeros stay zero.
    """
    r, g1, _ = target_probs.shape
    warp = WarpParams.neutral(r, target_probs.device)
    logits = target_probs.to(torch.float32).log().contiguous()  # [R, G+1, V]
    result, _ = verify(logits, draft_tokens.clamp(min=0), num_proposed, draft_probs, warp, key, sample_index, position)
    return result


# --------------------------------------------------------------------------- slot attention


def _attention_index(t: torch.Tensor, n: int, what: str, device: torch.device) -> torch.Tensor:
    """A [n] int32/int64 index or length vector on device, made contiguous (no value check: that
    would sync the host, and a captured step must not)."""
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        raise ValueError(f"{what} must be a tensor of shape [{n}], got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, q on {device}")
    return t.contiguous()


def _attention_pool(t: torch.Tensor, what: str, q: torch.Tensor, kvh: int | None) -> torch.Tensor:
    """A K/V pool [slots, kvh, L, hd] of q's dtype, device and head size, contiguous in hd."""
    if t.dim() != 4:
        raise ValueError(f"{what} must be [slots, kv_heads, len, head_dim], got shape {tuple(t.shape)}")
    if t.dtype != q.dtype or t.device != q.device:
        raise ValueError(f"{what} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if t.shape[3] != q.shape[3] or (kvh is not None and t.shape[1] != kvh):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, which does not fit q {tuple(q.shape)}")
    return t if t.stride(3) == 1 else t.contiguous()


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   own_start: torch.Tensor, num_tokens: torch.Tensor,
                   prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                   prefix_slot: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                   window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of one decode or verify step over the slot KV cache, read in place.

    q ``[B, W, nh, hd]`` (RoPE applied); k_cache, v_cache ``[S, kvh, Lmax, hd]`` (one layer's
    row-slot pool); slots ``[B]`` the row slot each row reads; own_start ``[B]`` own-region
    tokens before this call; num_tokens ``[B]`` in 0..W this call's real tokens (their K/V
    already written at own_start ..).  Shared prompt KV: prefix_k, prefix_v ``[P, kvh, Lp, hd]``
    (the prompt-slot pool), prefix_slot ``[B]`` into it, prefix_len ``[B]`` (0: none).
    window: sliding window (key visible iff query_pos - key_pos < window, logical positions);
    scale: default hd ** -0.5.  Index and length tensors int32 or int64 on q's device.
    Positions and visibility: ``specbatch_kernels.reference_attention``.
    -> ``[B, W, nh, hd]`` in q's dtype; scores and softmax in float32; a query that sees no
    key (a padding row: num_tokens 0, own_start 0, prefix_len 0) gets zeros.

    Only shapes, dtypes and devices are checked (no host sync): lengths must fit the pools
    (own_start + num_tokens <= Lmax, prefix_len <= Lp), which the cache guarantees.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be [B, W, heads, head_dim], got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    B, W, nh, hd = q.shape
    dev = q.device
    k_cache = _attention_pool(k_cache, "k_cache", q, None)
    kvh = k_cache.shape[1]
    if kvh < 1 or nh % kvh:
        raise ValueError(f"q's {nh} heads are not a multiple of the cache's {kvh} K/V heads")
    v_cache = _attention_pool(v_cache, "v_cache", q, kvh)
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} and k_cache {tuple(k_cache.shape)} differ")
    slots, own_start, num_tokens = (_attention_index(t, B, name, dev) for t, name in
                                    ((slots, "slots"), (own_start, "own_start"), (num_tokens, "num_tokens")))
    prefix = (prefix_k, prefix_v, prefix_slot, prefix_len)
    if any(t is not None for t in prefix):
        if any(t is None for t in prefix):
            raise ValueError("prefix_k, prefix_v, prefix_slot and prefix_len go together")
        prefix_k = _attention_pool(prefix_k, "prefix_k", q, kvh)
        prefix_v = _attention_pool(prefix_v, "prefix_v", q, kvh)
        if prefix_v.shape[:3] != prefix_k.shape[:3]:
            raise ValueError(f"prefix_v {tuple(prefix_v.shape)} and prefix_k {tuple(prefix_k.shape)} differ")
        prefix_slot = _attention_index(prefix_slot, B, "prefix_slot", dev)
        prefix_len = _attention_index(prefix_len, B, "prefix_len", dev)
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if _use_triton(dev):
        _check_device(q, "q")
        q = q if q.stride(3) == 1 else q.contiguous()
        from specbatch_kernels import attention as kernels  # imports triton: only on this path

        return kernels.slot_attention_triton(q, k_cache, v_cache, slots, own_start, num_tokens,
                                             prefix_k, prefix_v, prefix_slot, prefix_len, window, scale)
    return reference_attention.slot_attention(q, k_cache, v_cache, slots, own_start, num_tokens,
                                              prefix_k, prefix_v, prefix_slot, prefix_len, window, scale)
