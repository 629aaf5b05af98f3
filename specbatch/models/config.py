"""ModelConfig: the architecture facts the native forward needs, read from a checkpoint's config.json.

A *checkpoint directory* is a Hugging Face model directory: config.json, model.safetensors (or
shards listed in model.safetensors.index.json), optionally generation_config.json and the
tokenizer files.  Only Llama-family decoders are supported; config.json decides the details
(GQA, RoPE scaling, tied embeddings, qkv bias, q/k norm, sliding window).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from specbatch.models.errors import CheckpointError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Llama-family decoder, plus the dtype it was loaded in.

    The transformers backend describes its models with it too (``hf_backend.hf_model_config``):
    there the engine's fields (vocabulary, EOS ids, KV shape, context, sliding window) are real
    and those only the native forward reads (RoPE, biases, q/k norm) are left at neutral values.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None            # None or {"rope_type": "linear" | "llama3", ...}
    qkv_bias: bool                       # q/k/v projections carry a bias (Qwen2; attention_bias)
    o_bias: bool                         # the output projection carries a bias (attention_bias)
    mlp_bias: bool                       # gate/up/down carry biases (Llama's mlp_bias)
    qk_norm: bool                        # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None           # keys further back than this are not attended to
    sliding_layers: tuple[bool, ...]     # per layer: does the sliding window apply
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    bos_token_id: int | None
    dtype: torch.dtype = torch.float32

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies in one slot, over all layers, at this dtype."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def with_dtype(self, dtype: torch.dtype) -> "ModelConfig":
        return replace(self, dtype=dtype)


def read_json(path: pathlib.Path) -> dict:
    """Parse a json file, raising CheckpointError (one line) when it is missing or invalid."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a Hugging Face checkpoint file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(raw: dict, key: str, path: pathlib.Path, kind: type, default: Any = ..., positive: bool = False):
    value = raw.get(key, default)
    if value is ...:
        raise CheckpointError(f"{path}: missing field '{key}' (expected {kind.__name__})")
    if value is None and default is None:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (positive and value <= 0):
        want = f"a positive {kind.__name__}" if positive else kind.__name__
        raise CheckpointError(f"{path}: field '{key}' must be {want}, got {value!r}")
    return value


def _token_ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{where}: field 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return list(values)


def _rope(raw: dict, path: pathlib.Path) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either the transformers >= 5 or the older config layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = dict(params)
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if isinstance(raw.get("rope_scaling"), dict) else None
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{path}: field 'rope_theta' must be a positive number, got {theta!r}")
    if scaling is not None:
        scaling.pop("rope_theta", None)
        legacy = scaling.pop("type", None)  # the oldest spelling of rope_type
        rope_type = scaling.pop("rope_type", legacy or "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"{path}: field 'rope_scaling' has rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return float(theta), scaling


def _sliding(raw: dict, arch: str, num_layers: int, path: pathlib.Path) -> tuple[int | None, tuple[bool, ...]]:
    """The window and the layers it applies to (Mistral: all; Qwen2/3: per use_sliding_window)."""
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        window = None
    if arch == "LlamaForCausalLM":
        window = None
    if window is None:
        return None, (False,) * num_layers
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise CheckpointError(f"{path}: field 'sliding_window' must be a positive int or null, got {window!r}")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        layers = tuple(t == "sliding_attention" for t in layer_types)
    elif arch == "MistralForCausalLM":
        layers = (True,) * num_layers
    else:
        first = raw.get("max_window_layers", num_layers)
        layers = tuple(i >= first for i in range(num_layers))
    return (window if any(layers) else None), layers


def parse_config(directory: pathlib.Path) -> ModelConfig:
    """Read config.json (and generation_config.json when present) of a checkpoint directory."""
    directory = pathlib.Path(directory)
    path = directory / "config.json"
    raw = read_json(path)
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise CheckpointError(f"{path}: missing field 'architectures' (expected one of {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: field 'hidden_act' must be 'silu', got {act!r}")

    hidden = _field(raw, "hidden_size", path, int, positive=True)
    heads = _field(raw, "num_attention_heads", path, int, positive=True)
    kv_heads = _field(raw, "num_key_value_heads", path, int, default=heads, positive=True)
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: field 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{path}: field 'hidden_size' ({hidden}) must be divisible by num_attention_heads ({heads})")
        head_dim = hidden // heads
    head_dim = _field({"head_dim": head_dim}, "head_dim", path, int, positive=True)
    if head_dim % 2:
        raise CheckpointError(f"{path}: field 'head_dim' must be even for RoPE, got {head_dim}")
    layers = _field(raw, "num_hidden_layers", path, int, positive=True)
    theta, scaling = _rope(raw, path)
    window, sliding_layers = _sliding(raw, arch, layers, path)

    gen_path = directory / "generation_config.json"
    eos = _token_ids(raw.get("eos_token_id"), str(path))
    if gen_path.is_file():
        gen = read_json(gen_path)
        eos = _token_ids(gen.get("eos_token_id"), str(gen_path)) + eos
    eos = list(dict.fromkeys(eos))
    bos = raw.get("bos_token_id")
    attention_bias = bool(raw.get("attention_bias", False))

    return ModelConfig(
        architecture=arch,
        vocab_size=_field(raw, "vocab_size", path, int, positive=True),
        hidden_size=hidden,
        intermediate_size=_field(raw, "intermediate_size", path, int, positive=True),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_field(raw, "max_position_embeddings", path, int, default=4096, positive=True),
        rms_norm_eps=_field(raw, "rms_norm_eps", path, float, default=1e-6, positive=True),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "Qwen2ForCausalLM" or (arch != "MistralForCausalLM" and attention_bias),
        o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and attention_bias,
        mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=window,
        sliding_layers=sliding_layers,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=eos,
        bos_token_id=bos if isinstance(bos, int) else None,
    )
