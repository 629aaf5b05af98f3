"""load_model / load_tokenizer: a checkpoint directory (or registered name) -> model (native or
transformers backend, see ``specbatch.models.backends``), tokenizer."""

from __future__ import annotations

import pathlib

import torch

from specbatch.models.backends import choose_backend
from specbatch.models.checkpoint import load_weights
from specbatch.models.config import parse_config
from specbatch.models.dtypes import as_dtype, resolve_dtype
from specbatch.models.errors import CheckpointError
from specbatch.models.llama import LlamaModel
from specbatch.models.registry import resolve_model_path

def load_model(path_or_name: str | pathlib.Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", backend: str = "auto"):
    """The model of a checkpoint directory, registered name or hub id, in eval mode: a native
    LlamaModel or a TransformersModel, as ``backend`` (auto | native | transformers) chooses;
    dtype ``auto`` is the device's native one (``specbatch.models.dtypes``)."""
    directory = resolve_model_path(path_or_name)
    dtype = as_dtype(resolve_dtype(dtype, device))
    if choose_backend(directory, backend) == "transformers":
        from specbatch.models.hf_backend import load_transformers_model

        return load_transformers_model(directory, dtype, device)
    config = parse_config(directory).with_dtype(dtype)
    weights = load_weights(directory, config, dtype, device)
    return LlamaModel(config, weights)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path_or_name: str | pathlib.Path):
    """The checkpoint's own tokenizer (transformers AutoTokenizer; never remote code)."""
    from transformers import AutoTokenizer

    directory = resolve_model_path(path_or_name)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{directory}: the tokenizer files cannot be loaded ({reason})") from None
