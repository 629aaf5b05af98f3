"""build_drafter: the drafter of a kind named in the spec (none | ngram | model | suffix)."""

from __future__ import annotations

from typing import Any

import torch

from specbatch.engine.drafting.base import Drafter
from specbatch.engine.drafting.model import ModelDrafter, check_same_tokenizer
from specbatch.engine.drafting.ngram import NgramDrafter
from specbatch.engine.drafting.none import NoDrafter
from specbatch.engine.drafting.suffix import SuffixDrafter


def build_drafter(
    kind: str,
    target_model: Any = None,
    tokenizer: Any = None,
    *,
    path: str | None = None,
    dtype: Any = None,
    min_n: int = 1,
    max_n: int = 3,
    draft_temperature: float | None = None,
    draft_top_k: int = 0,
    draft_top_p: float = 1.0,
    device: str | torch.device = "cpu",
    top_m: int = 8,
    max_entries: int = 65536,
    scope: str = "request",
    backend: str = "auto",
) -> Drafter:
    """A drafter of the given kind (none | ngram | model | suffix)."""
    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        return NgramDrafter(min_n=min_n, max_n=max_n)
    if kind == "suffix":
        if target_model is None:
            raise ValueError("models.draft.kind: a suffix drafter needs the target model (its vocabulary)")
        return SuffixDrafter(target_model.config.vocab_size, top_m=top_m, min_n=min_n, max_n=max_n,
                             max_entries=max_entries, scope=scope, device=device)
    if kind == "model":
        from specbatch.models import load_model, load_tokenizer

        if path is None:
            raise ValueError("models.draft.path: a model drafter needs a checkpoint path")
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(path), path)
        draft_dtype = dtype if dtype is not None else (target_model.config.dtype if target_model is not None else "float32")
        draft = load_model(path, dtype=draft_dtype, device=device, backend=backend)
        vocab = target_model.config.vocab_size if target_model is not None else draft.config.vocab_size
        return ModelDrafter(draft, vocab, draft_temperature, draft_top_k, draft_top_p)
    raise ValueError(f"models.draft.kind: unknown drafter {kind!r}; expected one of none, ngram, model, suffix")
