"""Which backend runs a checkpoint: the native Llama-family forward or the transformers backend.

A *backend* is the code that computes a model's forward over the slot KV cache:

- ``native`` (``specbatch.models.llama``): our own fused forward, for the architectures in
  ``SUPPORTED_ARCHITECTURES`` (Llama, Mistral, Qwen2, Qwen3). Faster.
- ``transformers`` (``specbatch.models.hf_backend``): the model's own transformers code, with
  attention routed through our attention function. Any decoder-only architecture whose
  transformers class supports the attention interface.
- ``auto``: native for the Llama family, transformers otherwise.

``check_transformers_support`` refuses, in one line naming the architecture and why, what the
transformers backend cannot run: encoder-decoder models, checkpoints that need remote code (an
``auto_map`` in config.json for an architecture transformers does not ship; one it ships runs
its own code, the ``auto_map`` ignored), architectures transformers does not know as a causal
LM, and those whose code does not route attention through the attention interface.
"""

from __future__ import annotations

import pathlib

from specbatch.models.config import SUPPORTED_ARCHITECTURES, read_json
from specbatch.models.errors import CheckpointError

BACKENDS = ("auto", "native", "transformers")

# Classes whose code calls the attention interface on every layer's K/V although transformers
# does not flag them as ``_supports_attention_backend`` (StableLM drops the forward's keyword
# arguments on the way: its calls find their context through the context variable); each is
# covered by the parity tests.
ROUTED_WITHOUT_FLAG = ("StableLmForCausalLM",)


def architecture_of(raw: dict, path: pathlib.Path) -> str:
    """The first entry of config.json's ``architectures``."""
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"{path}: missing field 'architectures' (expected the model class name)")
    return archs[0]


def choose_backend(directory: pathlib.Path, requested: str = "auto") -> str:
    """'native' or 'transformers' for a checkpoint directory and a requested backend."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested != "auto":
        return requested
    path = pathlib.Path(directory) / "config.json"
    arch = architecture_of(read_json(path), path)
    return "native" if arch in SUPPORTED_ARCHITECTURES else "transformers"


def check_transformers_support(directory: pathlib.Path) -> str:
    """The transformers class name of a checkpoint the backend can run; CheckpointError otherwise."""
    path = pathlib.Path(directory) / "config.json"
    raw = read_json(path)
    arch = architecture_of(raw, path)
    if raw.get("is_encoder_decoder"):
        raise CheckpointError(f"{path}: architecture {arch} is an encoder-decoder model; only decoder-only models run")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, arch, None)
    if cls is None and "auto_map" in raw:
        raise CheckpointError(
            f"{path}: architecture {arch} needs remote code (config.json's auto_map), which is never run"
        )
    if cls is None:
        raise CheckpointError(f"{path}: architecture {arch} is unknown to transformers {transformers.__version__}")
    if getattr(cls, "_is_stateful", False) or arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise CheckpointError(f"{path}: architecture {arch} is not a decoder-only causal language model")
    if not (cls._supports_attention_backend or arch in ROUTED_WITHOUT_FLAG):
        raise CheckpointError(
            f"{path}: architecture {arch}: its transformers code does not support the attention interface, "
            f"so it cannot read the slot KV cache"
        )
    return arch
