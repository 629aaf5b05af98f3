"""Read a checkpoint's weights from safetensors files, checking every tensor against the config.

Weights come only from safetensors (``model.safetensors``, or the shards listed in
``model.safetensors.index.json``): pickled ``.bin`` / ``.pt`` files are never opened.  Every
problem is a CheckpointError whose message is one line naming the file (and tensor) and what
was expected.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors import SafetensorError, safe_open

from specbatch.models.config import CheckpointError, ModelConfig, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every tensor the native model needs."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> shard file, from the index when sharded; empty when there is one model.safetensors."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if index.is_file():
        raw = read_json(index)
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map' (expected tensor name -> shard file)")
        return {name: directory / str(shard) for name, shard in weight_map.items()}
    if single.is_file():
        return {}  # every tensor lives in the single file
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (expected safetensors weights){hint}")


def _expected_size(path: pathlib.Path) -> int | None:
    """The byte size a safetensors file's own header implies, or None if the header is unreadable.

    Layout: 8-byte little-endian header length n, n bytes of JSON header, then the data, each
    tensor at ``data_offsets`` [begin, end) relative to the data start.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _open(path: pathlib.Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a safetensors weights file)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size, expected = path.stat().st_size, _expected_size(path)
        if expected is not None and size < expected:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, its header describes {expected})"
            ) from None
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason})") from None


def load_weights(directory: pathlib.Path, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor the model needs, checked for presence and shape, cast to ``dtype`` on ``device``."""
    directory = pathlib.Path(directory)
    shapes = expected_shapes(config)
    files = weight_files(directory)
    index = directory / INDEX_FILE
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in shapes:
        if files and name not in files:
            raise CheckpointError(f"{index}: tensor '{name}' missing from weight_map (expected shape {list(shapes[name])})")
        by_file.setdefault(files.get(name, directory / SINGLE_FILE), []).append(name)

    weights: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        handle = _open(path)
        with handle as f:
            present = set(f.keys())
            for name in names:
                want = shapes[name]
                if name not in present:
                    raise CheckpointError(f"{path}: missing tensor '{name}' (expected shape {list(want)})")
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    reason = " ".join(str(e).split())
                    raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({reason})") from None
                if tuple(tensor.shape) != want:
                    raise CheckpointError(
                        f"{path}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(want)} from config.json"
                    )
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, expected a floating dtype")
                weights[name] = tensor.to(device=device, dtype=dtype)
    return weights

