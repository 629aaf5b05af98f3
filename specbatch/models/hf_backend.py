"""The transformers backend: any decoder-only transformers model, run over our slot KV cache.

The model is the checkpoint's own transformers class (loaded with
``attn_implementation="specbatch"``, safetensors only, never remote code): embeddings,
norms, rotary (partial or not), q/k norms, multipliers and logit soft-capping stay the model's
own code. Only attention is ours: :func:`specbatch_attention` is registered with
transformers' ``AttentionInterface`` and, called by every layer with that layer's queries,
keys and values, writes the keys and values into the slot cache and attends over it.

The forward takes the engine's call (``tokens [R, W]``, ``slots [R]``, ``num_tokens [R]``,
see ``specbatch.models.llama``) and *packs* it: the T real tokens of all rows, row after row,
become one sequence ``input_ids [1, T]`` with per-token logical positions ``position_ids
[1, T]``, so the model's projections and MLPs run on real tokens only. The call's metadata (a
:class:`ForwardContext`: the cache, the per-call ``_Plan`` of the native forward with its slot
indices and masks, and where the packed tokens sit in ``[R, W]``) travels through the model's
keyword arguments to the attention function (and, for the few models whose code drops
keyword arguments on the way to attention, through a context variable set for the call's
duration). Logits are computed only where the engine reads
them (``logits_to_keep``: every real token, or each row's last one).

Per layer, the attention function honours what the model passes: ``scaling`` (the score
multiplier), ``sliding_window`` (None on full-attention layers) and ``softcap`` (attention
logit soft-capping). Both cache layouts work: the unshared one, and the shared prompt KV
(prompt slots prefilled alone, row slots reading their linked prompt through
``shared_prefix_attention``).
"""

from __future__ import annotations

import contextvars
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specbatch.models.attention import shared_prefix_attention
from specbatch.models.cache import KVCache
from specbatch.models.config import ModelConfig, _token_ids, read_json
from specbatch.models.errors import CheckpointError
from specbatch.models.llama import _Plan

ATTENTION_NAME = "specbatch"

# The running forward's context, for attention calls that did not receive it as a keyword.
_CURRENT: contextvars.ContextVar["ForwardContext | None"] = contextvars.ContextVar("specbatch_forward", default=None)


@dataclass
class ForwardContext:
    """One forward's metadata, passed to every layer's attention call.

    ``valid`` indexes the real tokens, (row ``[T]``, column ``[T]``) in row-major order (None: all
    R x W are real); the packed sequence is ``tokens[valid]``, so packed index i is the i-th real
    token.
    ``window`` is the model's sliding window (the layers that slide say so per call).
    ``layers`` counts the attention calls of this forward (every layer must make one).
    """

    cache: KVCache
    plan: _Plan
    R: int
    W: int
    valid: tuple[torch.Tensor, torch.Tensor] | None
    window: int | None
    layers: int = 0


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scaling: float, softcap: float | None, float32: bool) -> torch.Tensor:
    """Attention of ``q [R, W, nh, hd]`` over ``keys/values [R, kvh, L, hd]`` under ``mask
    [R, W, L]`` (bool, True = attend, or additive 0 / -inf) -> ``[R, W, nh, hd]``.

    Query heads grouped under their K/V head (head i reads K/V head i // (nh / kvh)); scores
    ``q.k * scaling``, soft-capped to ``softcap * tanh(s / softcap)`` when given, then masked;
    softmax in float32. Without soft-capping, wide masks go through scaled_dot_product_attention.
    """
    R, W, nh, hd = q.shape
    kvh, L = keys.shape[1], keys.shape[2]
    if mask.dtype == torch.bool and softcap is None:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1), scale=scaling, enable_gqa=nh != kvh
        ).transpose(1, 2)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    dtype = q.dtype
    if float32:
        q, keys, values = q.float(), keys.float(), values.float()
    g = nh // kvh
    qg = q.reshape(R, W, kvh, g, hd).permute(0, 2, 3, 1, 4).reshape(R, kvh, g * W, hd)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).view(R, kvh, g, W, L).float()  # [R, kvh, g, W, L]
    if softcap is not None:
        scores = torch.tanh(scores * (scaling / softcap)) * softcap
    else:
        scores = scores * scaling
    probs = torch.softmax(scores + mask[:, None, None], dim=-1).to(values.dtype)
    out = torch.matmul(probs.view(R, kvh, g * W, L), values)  # [R, kvh, g W, hd]
    return out.view(R, kvh, g, W, hd).permute(0, 3, 1, 2, 4).to(dtype)  # [R, W, nh, hd]


def specbatch_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None,
                        specbatch_context: ForwardContext | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls per layer: ``query [1, nh, T, hd]``, ``key`` and
    ``value [1, kvh, T, hd]`` of the packed tokens, after the model's rotary and norms ->
    ``([1, T, nh, hd], None)``. Writes K/V at each token's slot and position, then attends over
    the slot (and the linked prompt slot) with the call's causal or sliding-window masks."""
    ctx = specbatch_context if specbatch_context is not None else _CURRENT.get()
    if ctx is None:
        raise RuntimeError("specbatch attention called without its forward context (only TransformersModel calls the model)")
    plan, cache = ctx.plan, ctx.cache
    layer = module.layer_idx
    ctx.layers += 1
    R, W = ctx.R, ctx.W
    nh, hd = query.shape[1], query.shape[3]
    kvh = key.shape[1]
    scaling = hd**-0.5 if scaling is None else float(scaling)
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, heads, hd]
    if ctx.valid is None:
        q, k, v = q.reshape(R, W, nh, hd), k.reshape(R, W, kvh, hd), v.reshape(R, W, kvh, hd)
    else:
        padded = q.new_zeros(R, W, nh, hd)
        padded[ctx.valid] = q
        q = padded  # [R, W, nh, hd]; k, v stay packed [T, kvh, hd] like plan.write_index
    k_caches, v_caches = (cache.pk, cache.pv) if plan.pool == "prompts" else (cache.k, cache.v)
    k_cache, v_cache = k_caches[layer], v_caches[layer]  # [S, kvh, max_len, hd]
    k_cache.transpose(1, 2).index_put_(plan.write_index, k)
    v_cache.transpose(1, 2).index_put_(plan.write_index, v)
    if plan.slot_range is not None:  # a contiguous run of slots: a view, no copy
        lo, hi = plan.slot_range
        keys, values = k_cache[lo:hi, :, : plan.kv_len], v_cache[lo:hi, :, : plan.kv_len]
        if plan.order is not None:
            q = q[plan.order]
    else:
        keys, values = k_cache[plan.slots, :, : plan.kv_len], v_cache[plan.slots, :, : plan.kv_len]
    sliding = sliding_window is not None
    if sliding and sliding_window != ctx.window:
        raise ValueError(f"layer {layer} slides over {sliding_window} tokens, the model's window is {ctx.window}")
    mask = plan.sliding_mask if sliding else plan.mask  # [R, W, L]
    if plan.prefix is not None:
        pre = plan.prefix
        prefix_k, prefix_v = pre.keys(layer), pre.values(layer)  # [G, kvh, Lp, hd]
        mask = pre.sliding_mask if sliding else pre.mask  # [R, W, Lp + Lo]
        if plan.float32_attention:
            q32, keys, values, prefix_k, prefix_v = (t.float() for t in (q, keys, values, prefix_k, prefix_v))
        else:
            q32 = q
        out = shared_prefix_attention(q32, keys, values, prefix_k, prefix_v, mask, pre.group, pre.rank,
                                      pre.rows_per_group, scaling=scaling, softcap=softcap).to(q.dtype)
    else:
        out = _attend(q, keys, values, mask, scaling, softcap, plan.float32_attention)
    if plan.order is not None:
        out = out[plan.unorder]  # back to the caller's row order
    out = out.reshape(R * W, nh, hd) if ctx.valid is None else out[ctx.valid]  # [T, nh, hd]
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, specbatch_attention)


def hf_model_config(directory: pathlib.Path, hf_config, dtype: torch.dtype) -> ModelConfig:
    """The engine's view of a transformers model (vocabulary, EOS ids, KV shape, context)."""
    directory = pathlib.Path(directory)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = text.num_hidden_layers
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == layers:
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
    else:
        sliding_layers = (window is not None,) * layers
    if window is None or not any(sliding_layers):
        window, sliding_layers = None, (False,) * layers
    eos = _token_ids(getattr(text, "eos_token_id", None), str(directory / "config.json"))
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        eos = _token_ids(read_json(gen_path).get("eos_token_id"), str(gen_path)) + eos
    bos = getattr(text, "bos_token_id", None)
    archs = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
    return ModelConfig(
        architecture=archs[0],
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 0) or 0,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(text, "max_position_embeddings", None) or 4096,
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 0.0) or 0.0),
        rope_theta=0.0,  # the model's own rotary code applies
        rope_scaling=None,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=False,
        sliding_window=window,
        sliding_layers=sliding_layers,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        eos_token_ids=list(dict.fromkeys(eos)),
        bos_token_id=bos if isinstance(bos, int) else None,
        dtype=dtype,
    )


class TransformersModel(nn.Module):
    """A transformers causal LM behind the engine's model interface (see the module docstring):
    ``model(tokens [R, W], cache, slots [R], num_tokens [R], last_only=False)`` -> float32
    logits ``[R, W, V]`` (``[R, 1, V]`` with last_only), ``new_cache``, ``config``."""

    inv_freq = None  # the model applies its own rotary (read by _Plan)

    def __init__(self, hf_model: nn.Module, config: ModelConfig):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def new_cache(self, num_slots: int, max_len: int, prompt_slots: int = 0, prompt_len: int = 0) -> KVCache:
        """An empty KV cache for this model, in its dtype and on its device."""
        return KVCache.for_model(self.config, self.dtype, self.device, num_slots, max_len, prompt_slots, prompt_len)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """Logits ``[R, W, V]`` float32, or ``[R, 1, V]`` at each row's last real token with last_only.

        Padding positions (beyond a row's num_tokens) get zero logits.
        """
        device = self.device
        R, W = tokens.shape
        V = self.config.vocab_size
        tokens = tokens.to(device)
        slots = slots.to(device=device, dtype=torch.int64)
        num_tokens = num_tokens.to(device=device, dtype=torch.int64)
        plan = _Plan(self, cache, slots, num_tokens, W)
        valid = plan.valid_index  # ([T], [T]) row and column of each real token, or None: all are real
        ids = tokens.reshape(-1) if valid is None else tokens[valid]  # [T]
        positions = plan.positions.reshape(-1) if valid is None else plan.positions[valid]  # [T]
        T = ids.shape[0]
        rows_out = 1 if last_only else W
        if T == 0:
            return torch.zeros(R, rows_out, V, dtype=torch.float32, device=device)
        ends = torch.cumsum(num_tokens, 0)  # [R] packed index after each row's last token
        keep = (ends - 1).clamp(min=0) if last_only else 0
        ctx = ForwardContext(cache, plan, R, W, valid, self.config.sliding_window)
        token = _CURRENT.set(ctx)
        try:
            out = self.hf(input_ids=ids[None], position_ids=positions[None], logits_to_keep=keep, use_cache=False,
                          specbatch_context=ctx)
        finally:
            _CURRENT.reset(token)
        if ctx.layers != self.config.num_hidden_layers:
            raise RuntimeError(
                f"{self.config.architecture}: {ctx.layers} of {self.config.num_hidden_layers} layers called the "
                f"specbatch attention; its transformers code does not route every layer through the attention interface"
            )
        logits = out.logits[0].float()  # [T or R, V]
        cache.lengths.index_add_(0, slots, num_tokens)
        if last_only:
            if valid is not None:
                logits = logits.masked_fill((num_tokens == 0)[:, None], 0.0)
            return logits.unsqueeze(1)  # [R, 1, V]
        if valid is None:
            return logits.view(R, W, V)
        full = logits.new_zeros(R, W, V)
        full[valid] = logits
        return full


def transformers_config(directory: pathlib.Path) -> ModelConfig:
    """The engine's view of a checkpoint the transformers backend would run, from its config
    files alone (no weights read); CheckpointError (one line) for what the backend refuses."""
    from specbatch.models.backends import check_transformers_support

    directory = pathlib.Path(directory)
    check_transformers_support(directory)
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{directory / 'config.json'}: transformers cannot read it ({reason})") from None
    return hf_model_config(directory, hf_config, torch.float32)


def load_transformers_model(directory: pathlib.Path, dtype: torch.dtype,
                            device: str | torch.device = "cpu") -> TransformersModel:
    """The checkpoint's transformers class with our attention, in eval mode on ``device``.

    Refuses (CheckpointError, one line) what the backend cannot run, and checkpoints without
    safetensors weights; never runs remote code.
    """
    from specbatch.models.backends import check_transformers_support
    from specbatch.models.checkpoint import weight_files

    directory = pathlib.Path(directory)
    arch = check_transformers_support(directory)
    weight_files(directory)  # safetensors present, else one line naming what was found
    import transformers

    _register()
    try:  # the class config.json names (AutoModelForCausalLM would go by model_type instead)
        hf = getattr(transformers, arch).from_pretrained(
            str(directory), attn_implementation=ATTENTION_NAME, dtype=dtype, trust_remote_code=False,
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{directory}: transformers cannot load this checkpoint ({reason})") from None
    hf = hf.to(device).eval()
    return TransformersModel(hf, hf_model_config(directory, hf.config, dtype))
