"""The native Llama-family decoder: a ragged, slot-cached forward in plain torch.

One forward serves prefill, plain decoding and speculative verification alike.  Inputs:

- ``tokens [R, W]``: row r's real tokens are ``tokens[r, :num_tokens[r]]``; the rest is
  padding, which affects nothing and is never written to the cache.
- ``slots [R]``: the distinct cache slot each row reads and writes.
- ``num_tokens [R]`` in ``0..W``.

Row r's positions are ``cache.lengths[slots[r]] + 0 .. num_tokens[r]-1``: RoPE uses these
per-row positions.  The forward writes K/V for exactly those positions into the row's slot,
attends causally over the slot (and only within the sliding window on layers that have one),
then advances ``cache.lengths[slots]`` by ``num_tokens``.  Attention reads the cache only up
to the longest live row of the batch.

With the shared prompt KV layout (``specbatch.models.cache``), a call writes either one prompt slot
(prefill of a prompt) or row slots only; a row slot holds its own tokens and attends over its
linked prompt slot too (``specbatch.models.attention``). Positions stay logical: RoPE and the
causal and sliding-window masks see the same positions in both layouts.

Weights are stored fused where that saves kernel launches: q/k/v in one matrix, gate/up in
one matrix.  In float32 the logits match transformers' to rounding; in half precision the
fused RMSNorm rounds once where transformers rounds twice, so logits differ slightly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specbatch.models.cache import KVCache
from specbatch.models.attention import shared_prefix_attention
from specbatch.models.config import ModelConfig
from specbatch.models.rope import apply_rope, inverse_frequencies, rope_cos_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight`` (one fused op)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


def _onednn_packing_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bfloat16 linears on this CPU can run through oneDNN with pre-packed weights.

    Packed weights make decode-sized bfloat16 matmuls about 1.5x faster on CPUs with AMX /
    AVX512-BF16 and give the same result as F.linear (checked here once, on a small case).
    """
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
        x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.equal(got, F.linear(x, w))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Linear:
    """``y = x W^T + b`` through F.linear, or through oneDNN with W pre-packed (see above).

    The path is chosen once, when the model is built; the plain weight stays the model's
    parameter, the packed copy is an extra (opaque) tensor.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.weight, self.bias = weight, bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


# Up to this many new tokens per row, attention is two grouped matmuls over the cache (cheapest
# for decode and verify steps, and no K/V repeat for GQA); wider calls (prefill) use
# scaled_dot_product_attention, whose memory does not grow with width x cache length.
MATMUL_ATTENTION_MAX_WIDTH = 16

# On CPU, half-precision batched matmuls this small cost more in fixed overhead than their data:
# below this many attended K elements per layer (rows x kv heads x cache length x head dim),
# narrow attention runs in float32 (demo model, batch-1 step: 25.1 vs 27.2 ms; no gain by batch 16).
CPU_FLOAT32_ATTENTION_MAX_ELEMENTS = 1 << 17


class DecoderLayer(nn.Module):
    """Pre-norm attention (fused qkv, GQA, optional q/k norm) then a SwiGLU MLP (fused gate/up)."""

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], prefix: str, sliding: bool, pack: bool,
                 index: int = 0):
        super().__init__()
        self.config = config
        self.sliding = sliding
        self.index = index  # this layer's place in the cache's per-layer lists
        a, m = prefix + "self_attn.", prefix + "mlp."
        nh, kvh = config.num_attention_heads, config.num_key_value_heads
        self.attn_norm = _param(w[prefix + "input_layernorm.weight"])  # [H]
        self.mlp_norm = _param(w[prefix + "post_attention_layernorm.weight"])  # [H]
        self.qkv = _param(torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]))  # [(nh + 2 kvh) hd, H]
        self.qkv_bias = _param(
            torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]]) if config.qkv_bias else None
        )
        self.o = _param(w[a + "o_proj.weight"])  # [H, nh hd]
        self.o_bias = _param(w.get(a + "o_proj.bias"))
        # Qwen3's q_norm and k_norm, stacked per head so that one norm serves q and k: [nh + kvh, hd]
        self.qk_norm = _param(
            torch.cat([w[a + "q_norm.weight"].expand(nh, -1), w[a + "k_norm.weight"].expand(kvh, -1)])
            if config.qk_norm else None
        )
        self.gate_up = _param(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]))  # [2 I, H]
        self.gate_up_bias = _param(
            torch.cat([w[m + "gate_proj.bias"], w[m + "up_proj.bias"]]) if config.mlp_bias else None
        )
        self.down = _param(w[m + "down_proj.weight"])  # [H, I]
        self.down_bias = _param(w.get(m + "down_proj.bias"))
        self.qkv_linear = Linear(self.qkv, self.qkv_bias, pack)
        self.o_linear = Linear(self.o, self.o_bias, pack)
        self.gate_up_linear = Linear(self.gate_up, self.gate_up_bias, pack)
        self.down_linear = Linear(self.down, self.down_bias, pack)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """x ``[R, W, H]`` -> ``[R, W, H]``; writes this layer's K/V ``[S, kvh, max_len, hd]``.
        ``plan`` is the forward's :class:`_Plan`, or a static one (``specbatch.models.steps``):
        it writes the K/V and attends."""
        c = self.config
        R, W, _ = x.shape
        nh, kvh, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        h = rms_norm(x, self.attn_norm, c.rms_norm_eps)
        qkv = self.qkv_linear(h).view(R, W, nh + 2 * kvh, hd)
        qk, v = qkv[:, :, : nh + kvh], qkv[:, :, nh + kvh :]  # [R, W, nh + kvh, hd], [R, W, kvh, hd]
        if self.qk_norm is not None:
            qk = F.rms_norm(qk, (hd,), eps=c.rms_norm_eps) * self.qk_norm
        q, k = apply_rope(qk, plan.cos.unsqueeze(2), plan.signed_sin.unsqueeze(2)).split((nh, kvh), dim=2)

        out = plan.attend(self, q, k, v, k_cache, v_cache)  # [R, W, nh, hd]
        x = x + self.o_linear(out.reshape(R, W, nh * hd))

        h = rms_norm(x, self.mlp_norm, c.rms_norm_eps)
        gate, up = self.gate_up_linear(h).chunk(2, dim=-1)  # [R, W, I] each
        return x + self.down_linear(F.silu(gate) * up)


def _matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention for narrow calls: q ``[R, W, nh, hd]``, keys/values ``[R, kvh, L, hd]``,
    bias ``[R, 1, 1, W, L]`` (0 or -inf) -> ``[R, W, nh, hd]``.

    Query heads are grouped under their K/V head (head i reads K/V head i // (nh / kvh)), so
    GQA needs no K/V copy; scores and softmax are in float32.
    """
    R, W, nh, hd = q.shape
    kvh, L = keys.shape[1], keys.shape[2]
    g = nh // kvh
    qg = q.reshape(R, W, kvh, g, hd).permute(0, 2, 3, 1, 4).reshape(R, kvh, g * W, hd)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).view(R, kvh, g, W, L)  # [R, kvh, g, W, L]
    scores = torch.add(bias, scores, alpha=hd**-0.5)  # float32: bias + scores / sqrt(hd)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(R, kvh, g * W, L), values)  # [R, kvh, g W, hd]
    return out.view(R, kvh, g, W, hd).permute(0, 3, 1, 2, 4)  # [R, W, kvh, g, hd] = [R, W, nh, hd]


class _Plan:
    """Per-forward index and mask tensors shared by all layers (computed once per call).

    Masks ``[R, W, L]``: for wide calls boolean (True = attend), for
    scaled_dot_product_attention; for narrow calls, and every call reading a shared prompt,
    additive float32 (0 or -inf).

    ``pool`` is the cache pool the call reads and writes: "rows" (row slots) or "prompts" (one
    prompt slot being prefilled, shared layout only); ``slots`` are indices into that pool. In
    row calls with linked prompts, positions in the row's own region are the logical positions
    minus the row's ``prefix_len``, and ``prefix`` (a :class:`_PrefixPlan`) says how to read the
    prompt slots; otherwise ``prefix`` is None and the call is the unshared forward.
    """

    def __init__(self, model: "LlamaModel", cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor, W: int):
        device = slots.device
        R = slots.shape[0]
        starts = cache.lengths[slots]  # [R] logical
        prefix_len = cache.prefix_len[slots]  # [R] tokens read from a linked prompt slot (0: none)
        own = starts - prefix_len  # [R] tokens before this call in the region the call writes
        offsets = torch.arange(W, device=device)
        positions = starts[:, None] + offsets  # [R, W] logical (RoPE)
        valid = offsets < num_tokens[:, None]  # [R, W]
        # One host sync for everything the shapes depend on.
        zero = slots.new_zeros(())
        sorted_slots, order = slots.sort()
        first = sorted_slots[0] if R else zero
        arange = torch.arange(R, device=device)
        facts = torch.stack([
            (num_tokens == W).all().long(),
            (sorted_slots == first + arange).all().long(),  # the slots are a contiguous run
            (order == arange).all().long(),                 # ... already in slot order
            first,
            sorted_slots[-1] if R else zero,
            starts.min() if R else zero,
            num_tokens.min() if R else zero,
            (own + num_tokens).max() if R else zero,
            own.min() if R else zero,
            prefix_len.max() if R else zero,
            valid.sum(),
        ]).tolist()
        all_valid, contiguous, in_order, lo, hi, min_start, min_tokens, kv_len, min_own, longest_prefix, real = facts
        if min_tokens < 0 or min_start < 0:
            raise ValueError("num_tokens and cache lengths must be >= 0")
        if cache.shared and R and lo >= cache.num_slots:  # a prompt slot being prefilled
            if R != 1:
                raise ValueError("a prompt slot is prefilled alone")
            self.pool, base, capacity = "prompts", cache.num_slots, cache.prompt_len
        elif hi >= cache.num_slots:
            raise ValueError(f"slot {hi} is not a row slot of a cache with {cache.num_slots}")
        else:
            self.pool, base, capacity = "rows", 0, cache.max_len
        global_slots = slots
        slots = slots - base if base else slots
        lo -= base
        own_positions = own[:, None] + offsets  # [R, W] indices into the written region
        if min_own < 0:
            raise ValueError("a row was rolled back into its shared prompt")
        if kv_len > capacity:
            raise ValueError(f"a row would hold {kv_len} tokens but the cache's max_len is {capacity}")
        self.kv_len = max(kv_len, 1)
        c = model.config
        self.float32_attention = (
            device.type == "cpu" and model.dtype != torch.float32
            and R * c.num_key_value_heads * (self.kv_len + longest_prefix) * c.head_dim <= CPU_FLOAT32_ATTENTION_MAX_ELEMENTS
        )
        self.slots = slots
        self.slot_range = (lo, lo + R) if contiguous else None
        # Row permutation into slot order (attention over the contiguous view), and back.
        self.order = order if contiguous and not in_order else None  # [R]
        self.unorder = torch.argsort(order) if self.order is not None else None  # [R]
        # Tensors the layers read are kept free of size-1 broadcast dims (added where used), so
        # that a compiled step with symbolic sizes sees no dim that is 1 by construction.
        self.positions = positions  # [R, W] logical
        # RoPE tables for the native layers; a model that applies its own rotary (the
        # transformers backend) has no inv_freq.
        if getattr(model, "inv_freq", None) is not None:
            self.cos, self.signed_sin = rope_cos_sin(positions, model.inv_freq, model.dtype)  # [R, W, hd]

        # The real tokens of a ragged call as (row, column) indices: integer indexing with a
        # size known from the one sync above, so neither the plan nor a layer meets a
        # data-dependent shape (a boolean mask would sync per use on a GPU and break a
        # compiled step's graph at every layer).
        if all_valid:
            self.valid_index = None
            self.write_index = (slots[:, None].expand(R, W), own_positions)  # ([R, W], [R, W])
        else:
            rows, cols = torch.nonzero_static(valid, size=real).unbind(1)  # [N], [N] row-major
            self.valid_index = (rows, cols)
            self.write_index = (slots[rows], own_positions[rows, cols])  # ([N], [N])

        additive = longest_prefix > 0 or W <= MATMUL_ATTENTION_MAX_WIDTH
        key_pos = torch.arange(self.kv_len, device=device)  # [L] own-region index
        causal = key_pos <= own_positions[:, :, None]  # [R, W, L]
        padding = None if all_valid else ~valid[:, :, None]  # padded queries attend anywhere (finite, unused)
        self.mask = self._mask(causal, padding, additive)
        self.sliding_mask = None
        window = model.config.sliding_window
        if window is not None:  # own-region distances are logical distances
            self.sliding_mask = self._mask(causal & (key_pos > own_positions[:, :, None] - window), padding, additive)
        self.prefix = None
        if longest_prefix > 0:
            self.prefix = _PrefixPlan(cache, global_slots, prefix_len, positions, padding, longest_prefix, window,
                                      self._mask, self.order, self.mask, self.sliding_mask)

    def attend(self, layer: DecoderLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Write the call's K/V ``[R, W, kvh, hd]`` into the layer's cache ``[S, kvh, max_len, hd]``,
        then attend: q ``[R, W, nh, hd]`` -> ``[R, W, nh, hd]`` in the caller's row order."""
        nh, kvh = layer.config.num_attention_heads, layer.config.num_key_value_heads
        W = q.shape[1]
        if self.valid_index is not None:  # only real tokens are written
            k, v = k[self.valid_index], v[self.valid_index]  # [N, kvh, hd]
        # Position-major views [S, max_len, kvh, hd] so (slot, position) index the first two dims.
        k_cache.transpose(1, 2).index_put_(self.write_index, k)
        v_cache.transpose(1, 2).index_put_(self.write_index, v)
        if self.slot_range is not None:  # the slots are a contiguous run: a view, no copy
            lo, hi = self.slot_range
            keys, values = k_cache[lo:hi, :, : self.kv_len], v_cache[lo:hi, :, : self.kv_len]
            if self.order is not None:  # rows are not in slot order: permute the queries instead
                q = q[self.order]
        else:
            keys, values = k_cache[self.slots, :, : self.kv_len], v_cache[self.slots, :, : self.kv_len]
        # keys, values: [R, kvh, L, hd], in the same row order as q and the masks
        mask = self.sliding_mask if layer.sliding else self.mask  # [R, W, L]
        if self.prefix is not None:  # shared prompt KV: the linked prompt slots, then the own tokens
            pre = self.prefix
            prefix_k, prefix_v = pre.keys(layer.index), pre.values(layer.index)  # [G, kvh, Lp, hd]
            mask = pre.sliding_mask if layer.sliding else pre.mask  # [R, W, Lp + Lo]
            dtype = q.dtype
            if self.float32_attention:
                q, keys, values, prefix_k, prefix_v = (t.float() for t in (q, keys, values, prefix_k, prefix_v))
            out = shared_prefix_attention(q, keys, values, prefix_k, prefix_v, mask,
                                          pre.group, pre.rank, pre.rows_per_group).to(dtype)
        elif W <= MATMUL_ATTENTION_MAX_WIDTH:
            if self.float32_attention:
                out = _matmul_attention(q.float(), keys.float(), values.float(), mask[:, None, None]).to(q.dtype)
            else:
                out = _matmul_attention(q, keys, values, mask[:, None, None])
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1), enable_gqa=nh != kvh
            ).transpose(1, 2)  # [R, W, nh, hd]
        if self.order is not None:
            out = out[self.unorder]  # back to the caller's row order
        return out

    def _mask(self, allowed: torch.Tensor, padding: torch.Tensor | None, additive: bool) -> torch.Tensor:
        """The attention mask in the row order attention runs in (slot order when permuted)."""
        if padding is not None:
            allowed = allowed | padding
        if self.order is not None:
            allowed = allowed[self.order]
        if not additive:
            return allowed  # [R, W, L] bool
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill_(~allowed, float("-inf"))  # [R, W, L]


class _PrefixPlan:
    """How a row call reads its rows' linked prompt slots (shared prompt KV layout).

    Rows linked to one prompt slot form a *group*; ``group [R]`` is each row's group (in the
    row order attention runs in), ``rank [R]`` its place within the group (both None when the
    rows are dense), ``rows_per_group`` the largest group. The prompt part of the masks allows key j of row r where j <
    prefix_len[r] (every prompt position precedes the row's queries) and, on sliding-window
    layers, only the keys within the window of each query's logical position; ``mask`` and
    ``sliding_mask`` ``[R, W, Lp + Lo]`` are that part followed by the call's own-token mask,
    joined once per forward for every layer's attention.
    """

    def __init__(self, cache: KVCache, slots: torch.Tensor, prefix_len: torch.Tensor, positions: torch.Tensor,
                 padding: torch.Tensor | None, longest_prefix: int, window: int | None, mask,
                 order: torch.Tensor | None, own_mask: torch.Tensor, own_sliding_mask: torch.Tensor | None) -> None:
        groups, group = torch.unique(cache.prefix_of[slots], return_inverse=True)  # [G], [R]
        counts = torch.bincount(group)  # [G]
        by_group = torch.argsort(group, stable=True)  # [R]
        starts = torch.cumsum(counts, 0) - counts  # [G] first place of each group in by_group
        rank = torch.empty_like(group)
        rank[by_group] = torch.arange(group.shape[0], device=group.device) - starts[group[by_group]]
        ordered = group if order is None else group[order]  # [R] in the row order attention runs in
        rows_per_group, dense, packed, first = torch.stack([  # one host sync
            counts.max(),
            ((counts == counts[0]).all() & (ordered[1:] >= ordered[:-1]).all()).long(),  # equal runs, in order
            (groups[-1] - groups[0] + 1 == groups.shape[0]).long(),  # the prompt slots are a contiguous run
            groups[0],
        ]).tolist()
        self.rows_per_group = rows_per_group
        self.cache, self.groups, self.length = cache, groups, longest_prefix
        # Contiguous prompt slots are read as a view of the pool, not gathered (a copy per layer).
        self.group_range = (first, first + groups.shape[0]) if packed else None
        key_pos = torch.arange(longest_prefix, device=slots.device)  # [Lp]
        allowed = (key_pos < prefix_len[:, None]).unsqueeze(1).expand(-1, positions.shape[1], -1)  # [R, W, Lp]
        self.mask = torch.cat([mask(allowed, padding, True), own_mask], dim=-1)  # [R, W, Lp + Lo]
        self.sliding_mask = None
        if window is not None:
            sliding = mask(allowed & (key_pos > positions[:, :, None] - window), padding, True)
            self.sliding_mask = torch.cat([sliding, own_sliding_mask], dim=-1)  # [R, W, Lp + Lo]
        # In the row order attention runs in (the masks were permuted by `mask` already); None for
        # dense rows (G runs of rows_per_group rows, group by group: see attention.py).
        self.group, self.rank = (None, None) if dense else (ordered, rank if order is None else rank[order])

    def keys(self, layer: int) -> torch.Tensor:
        return self._read(self.cache.pk[layer])  # [G, kvh, Lp, hd]

    def values(self, layer: int) -> torch.Tensor:
        return self._read(self.cache.pv[layer])  # [G, kvh, Lp, hd]

    def _read(self, pool: torch.Tensor) -> torch.Tensor:
        if self.group_range is not None:
            lo, hi = self.group_range
            return pool[lo:hi, :, : self.length]
        return pool[self.groups, :, : self.length]


class LlamaModel(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 decoder with a slot KV cache (see the module docstring).

    Built by ``load_model`` on its final device and dtype: do not ``.to()`` it afterwards
    (fused and pre-packed weights are derived at construction).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.embed = _param(weights["model.embed_tokens.weight"])  # [V, H]
        pack = _onednn_packing_works(self.embed.device, self.embed.dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, weights, f"model.layers.{i}.", config.sliding_layers[i], pack, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = _param(weights["model.norm.weight"])  # [H]
        self.lm_head = self.embed if config.tie_word_embeddings else _param(weights["lm_head.weight"])  # [V, H]
        self.lm_head_linear = Linear(self.lm_head, None, pack)
        self.packed = pack
        # Set by specbatch.models.compile.compile_steps: the compiled `body`, used for steps of
        # at most compiled_max_width new tokens per row.
        self.compiled_body = None
        self.compiled_max_width = 0
        # Set by specbatch.models.steps.use_static_steps: steps of at most steps.max_width new tokens
        # per row (without last_only) run as static forwards (CUDA graphs on a GPU).
        self.steps = None
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(self.embed.device), persistent=False)  # [hd / 2] float32
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, num_slots: int, max_len: int, prompt_slots: int = 0, prompt_len: int = 0) -> KVCache:
        """An empty KV cache for this model, in its dtype and on its device (with prompt slots:
        the shared prompt KV layout; with static steps, a tail for their padding)."""
        tail = self.steps.max_width if self.steps is not None else 0
        return KVCache.for_model(self.config, self.dtype, self.device, num_slots, max_len, prompt_slots, prompt_len,
                                 tail=tail)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """Logits ``[R, W, V]`` float32, or ``[R, 1, V]`` at each row's last real token with last_only.

        With static steps (``self.steps``), a call of at most ``steps.max_width`` tokens per row
        without last_only is a step over row slots: it runs as a static forward, unchecked (the
        engine keeps rows within their slots), and its logits are valid until the next step."""
        R, W = tokens.shape
        slots = slots.to(device=self.device, dtype=torch.int64)
        num_tokens = num_tokens.to(device=self.device, dtype=torch.int64)
        if self.steps is not None and not last_only and W <= self.steps.max_width:
            return self.steps(tokens.to(self.device), cache, slots, num_tokens)
        plan = _Plan(self, cache, slots, num_tokens, W)
        x = F.embedding(tokens.to(self.device), self.embed)  # [R, W, H]
        last = (num_tokens - 1).clamp(min=0) if last_only else None  # [R]
        # Steps (narrow calls wanting every position's logits) run compiled when compile_steps
        # was applied; prefill (last position only) always runs eager.
        compiled = self.compiled_body is not None and W <= self.compiled_max_width and not last_only
        k, v = (cache.pk, cache.pv) if plan.pool == "prompts" else (cache.k, cache.v)
        logits = (self.compiled_body if compiled else self.body)(x, k, v, plan, last)
        cache.lengths.index_add_(0, slots, num_tokens)
        return logits

    def body(self, x: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], plan: "_Plan",
             last: torch.Tensor | None) -> torch.Tensor:
        """Embedded tokens ``[R, W, H]`` -> float32 logits ``[R, W, V]`` (``[R, 1, V]`` at ``last [R]``).

        Everything between the embedding and the logits: the part ``compile_steps`` compiles.
        """
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            x = layer(x, k_cache, v_cache, plan)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)  # [R, 1, H]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return self.lm_head_linear(x).float()  # [R, W or 1, V]

    def linears(self) -> list[Linear]:
        """Every projection of the model (the packed ones among them, if any)."""
        per_layer = [(l.qkv_linear, l.o_linear, l.gate_up_linear, l.down_linear) for l in self.layers]
        return [lin for group in per_layer for lin in group] + [self.lm_head_linear]

    def unpack(self) -> None:
        """Drop the oneDNN pre-packed weight copies: projections go through F.linear again."""
        for lin in self.linears():
            lin.packed = None
        self.packed = False
