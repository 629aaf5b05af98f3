"""Models loaded from Hugging Face checkpoints: the native Llama-family forward, and the
transformers backend for every other decoder (``specbatch.models.backends``).

Public API (imported lazily, so ``python -m specbatch.models.pull`` stays fast)::

    load_model(path_or_name, dtype="float32", device="cpu", backend="auto") -> LlamaModel | TransformersModel
    load_tokenizer(path_or_name) -> transformers tokenizer
    resolve_model_path(path_or_name) -> pathlib.Path
    pull_model(name) -> pathlib.Path
    ModelConfig, CheckpointError, SUPPORTED_ARCHITECTURES, LlamaModel, TransformersModel
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SUPPORTED_ARCHITECTURES": "specbatch.models.config",
    "CheckpointError": "specbatch.models.errors",
    "ModelConfig": "specbatch.models.config",
    "LlamaModel": "specbatch.models.llama",
    "TransformersModel": "specbatch.models.hf_backend",
    "load_model": "specbatch.models.loader",
    "load_tokenizer": "specbatch.models.loader",
    "pull_model": "specbatch.models.registry",
    "resolve_model_path": "specbatch.models.registry",
    "REGISTRY": "specbatch.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specbatch.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
