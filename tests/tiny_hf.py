"""Tiny random checkpoints of non-Llama architectures, for the transformers backend's tests.

``make_tiny_hf_checkpoint(path, arch)`` writes a checkpoint directory like
``tests.tiny.make_tiny_checkpoint`` (same word-level tokenizer, same re-randomisation so every
parameter matters), built with the architecture's own transformers classes. Each config turns
on what makes its architecture differ from Llama, so that parity tests exercise it:

- gemma3: per-layer sliding windows (sliding, full, sliding), q/k norms, query_pre_attn_scalar
  scaling, final logit soft-capping, embedding scaling.
- gemma2: attention logit soft-capping, final logit soft-capping, alternating sliding windows.
- phi3: fused qkv and gate/up, partial rotary, a sliding window on every layer.
- olmo2: q/k norms over the whole projection, post-norms.
- granite: embedding, residual, attention and logit multipliers.
- gpt_neox: partial rotary, parallel residual, LayerNorm with biases.
- stablelm: partial rotary, per-head q/k LayerNorm, qkv bias.
"""

from __future__ import annotations

import pathlib

import torch

from tests.tiny import BOS_ID, EOS_ID, _randomize, _write_tokenizer

WINDOW = 4  # small enough that the tests' sequences cross it

_CLASSES = {  # arch -> (config class, model class)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
}
ARCHS = tuple(_CLASSES)


def _overrides(arch: str, num_layers: int) -> dict:
    if arch == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return dict(head_dim=16, sliding_window=WINDOW, layer_types=types, query_pre_attn_scalar=24,
                    final_logit_softcapping=5.0)
    if arch == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return dict(head_dim=16, sliding_window=WINDOW, layer_types=types, query_pre_attn_scalar=16,
                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
    if arch == "phi3":
        return dict(sliding_window=WINDOW, partial_rotary_factor=0.5, pad_token_id=0)
    if arch == "olmo2":
        return dict(pad_token_id=0)
    if arch == "granite":
        return dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                    logits_scaling=2.0, pad_token_id=0)
    if arch == "gpt_neox":
        return dict(rotary_pct=0.5, use_parallel_residual=True, attention_bias=True)
    if arch == "stablelm":
        return dict(partial_rotary_factor=0.5, qk_layernorm=True, use_qkv_bias=True)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def make_tiny_hf_checkpoint(path, arch: str, vocab_size: int = 48, hidden_size: int = 32, num_layers: int = 3,
                            num_heads: int = 4, num_kv_heads: int = 2, logit_scale: float = 8.0, seed: int = 0,
                            **config_overrides) -> pathlib.Path:
    """Write a random tiny ``arch`` checkpoint directory at ``path`` and return it (deterministic per seed)."""
    import transformers

    if arch not in _CLASSES:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    config_name, model_name = _CLASSES[arch]
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  tie_word_embeddings=False, architectures=[model_name])
    if arch == "gpt_neox":
        kwargs.pop("num_key_value_heads")  # GPT-NeoX has no GQA
    kwargs.update(_overrides(arch, num_layers))
    kwargs.update(config_overrides)
    config = getattr(transformers, config_name)(**kwargs)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    _randomize(model, logit_scale, False)
    with torch.no_grad():  # LayerNorm biases and Gemma's (1 + w) norms: visibly non-default
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif arch.startswith("gemma") and name.endswith("norm.weight"):
                param.copy_(0.1 * torch.randn_like(param))
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(str(path))
    _write_tokenizer(path, vocab_size)
    return path
