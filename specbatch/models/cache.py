"""Slot KV cache: fixed slots, one length per slot, rollback = set the length.

A *slot* is one row's private region of the cache: per layer, K and V tensors of shape
``[num_slots, kv_heads, max_len, head_dim]``.  ``lengths[s]`` is how many tokens slot ``s``
holds (positions ``0 .. lengths[s]-1`` are valid; anything beyond is stale and never read as a
key).  The model's forward writes new K/V at ``lengths[s] ..`` and then advances the length.

- Rejected proposals are rolled back by lowering the length (``set_lengths``): nothing is erased.
- A finished row frees its slot (``reset``: length 0) and a new (prompt, sample) is prefilled
  into it (continuous batching).

*Shared prompt KV* (``prompt_slots > 0``): a second pool of *prompt slots*, ``[prompt_slots,
kv_heads, prompt_len, head_dim]`` per layer, holds each prompt's KV once. Slot indices are one
space: row slots ``0 .. num_slots-1``, prompt slots ``num_slots .. num_slots+prompt_slots-1``.
A prompt is prefilled into a prompt slot; ``copy_prefix`` from a prompt slot then *links* its N
samples' row slots to it (``prefix_of``, ``prefix_len``) instead of copying, so a row slot holds
only the row's own tokens: logical position ``p >= prefix_len[s]`` of row ``s`` lives at index
``p - prefix_len[s]`` of its own region. ``lengths`` stay logical (prefix + own) everywhere, so
rollback, drafters and the engine's bookkeeping read the same numbers in both layouts.
Attention reads the linked prompt slot once per prompt group and the row's own tokens
(``specbatch.models.attention``). A row is never rolled back into its prefix.

Without prompt slots (the *unshared* layout), N samples of one prompt are prefilled once into
one slot and ``copy_prefix`` copies the prefix into the N-1 others.

A *tail* of ``tail`` positions past ``max_len`` in every row slot (0 unless static steps ask for
one, ``specbatch.models.steps``) takes the writes of a static-shaped step's padding tokens: they
land there instead of in any row's tokens, and nothing ever reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# With no max_model_len, planning never shrinks a slot below this many tokens (or the model's
# max_position_embeddings, if smaller) to fit more slots; it fits fewer slots instead.
MIN_PLANNED_LEN = 256


@dataclass(frozen=True)
class CacheLayout:
    """How a KV cache is laid out: ``num_slots`` row slots of ``max_len`` tokens each, and
    ``prompt_slots`` prompt slots of ``prompt_len`` tokens (0: the unshared layout)."""

    num_slots: int
    max_len: int
    prompt_slots: int = 0
    prompt_len: int = 0

    @property
    def shared(self) -> bool:
        return self.prompt_slots > 0

    def tokens(self) -> int:
        """Token positions the layout holds (per layer, per K or V)."""
        return self.num_slots * self.max_len + self.prompt_slots * self.prompt_len


class KVCache:
    """Per-layer K/V tensors ``[num_slots, kv_heads, max_len + tail, head_dim]`` and per-slot lengths;
    with ``prompt_slots``, also per-layer prompt K/V ``[prompt_slots, kv_heads, prompt_len,
    head_dim]`` and each row slot's link into them (see the module docstring)."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 prompt_slots: int = 0, prompt_len: int = 0, tail: int = 0):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots} and {max_len}")
        if prompt_slots < 0 or (prompt_slots and prompt_len < 1):
            raise ValueError(f"KVCache needs prompt_len >= 1 with prompt slots, got {prompt_slots} x {prompt_len}")
        self.num_slots = num_slots
        self.max_len = max_len
        self.prompt_slots = prompt_slots
        self.prompt_len = prompt_len if prompt_slots else 0
        self.tail = tail
        shape = (num_slots, num_kv_heads, max_len + tail, head_dim)
        self.k: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        pshape = (prompt_slots, num_kv_heads, self.prompt_len, head_dim)
        self.pk: list[torch.Tensor] = [torch.zeros(pshape, dtype=dtype, device=device) for _ in range(num_layers)] if prompt_slots else []
        self.pv: list[torch.Tensor] = [torch.zeros(pshape, dtype=dtype, device=device) for _ in range(num_layers)] if prompt_slots else []
        self.lengths = torch.zeros(num_slots + prompt_slots, dtype=torch.int64, device=device)  # [S + P] logical
        # Per slot (prompt slots and unshared caches keep 0): the prompt slot a row reads, 0-based in
        # the pool, and how many tokens it reads there.
        self.prefix_of = torch.zeros(num_slots + prompt_slots, dtype=torch.int64, device=device)  # [S + P]
        self.prefix_len = torch.zeros(num_slots + prompt_slots, dtype=torch.int64, device=device)  # [S + P]

    @classmethod
    def for_model(cls, config, dtype: torch.dtype, device: torch.device | str, num_slots: int, max_len: int,
                  prompt_slots: int = 0, prompt_len: int = 0, tail: int = 0) -> "KVCache":
        """An empty cache shaped for a model's ``config`` (layers, K/V heads, head size)."""
        return cls(config.num_hidden_layers, num_slots, max_len, config.num_key_value_heads, config.head_dim,
                   dtype=dtype, device=device, prompt_slots=prompt_slots, prompt_len=prompt_len, tail=tail)

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout(self.num_slots, self.max_len, self.prompt_slots, self.prompt_len)

    @property
    def shared(self) -> bool:
        """Whether prompts are held once in prompt slots (the shared layout)."""
        return self.prompt_slots > 0

    def is_prompt_slot(self, slot: int) -> bool:
        return self.num_slots <= slot < self.num_slots + self.prompt_slots

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def _index(self, slots) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.int64, device=self.device).reshape(-1)

    def copy_prefix(self, src: int, dst: torch.Tensor | Sequence[int], length: int) -> None:
        """Give every row slot of ``dst`` slot ``src``'s first ``length`` positions; set their lengths.

        Used to fan one prefilled prompt out to its N samples. From a prompt slot (shared
        layout) the rows are linked to it, nothing is copied; from a row slot the positions are
        copied (``src`` may appear in ``dst``: it then keeps its data and gets length ``length``).
        """
        dst = self._index(dst)
        if self.is_prompt_slot(src):
            if not 0 <= length <= self.prompt_len:
                raise ValueError(f"copy_prefix length {length} is outside 0..{self.prompt_len}")
            self.prefix_of[dst] = src - self.num_slots
            self.prefix_len[dst] = length
            self.lengths[dst] = length
            return
        if not 0 <= length <= self.max_len:
            raise ValueError(f"copy_prefix length {length} is outside 0..{self.max_len}")
        dst_others = dst[dst != src]
        if length and dst_others.numel():
            for k, v in zip(self.k, self.v):
                k[dst_others, :, :length] = k[src, :, :length]  # [D, kv_heads, length, head_dim]
                v[dst_others, :, :length] = v[src, :, :length]
        self.lengths[dst] = length

    def set_lengths(self, slots, lengths) -> None:
        """Set the lengths of ``slots`` (rollback of rejected proposals, or bookkeeping)."""
        slots = self._index(slots)
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=self.device).expand(slots.shape)
        self.lengths[slots] = lengths

    def reset(self, slots) -> None:
        """Free ``slots``: their length becomes 0 (the stale K/V is overwritten by the next prefill);
        row slots lose their prompt link."""
        slots = self._index(slots)
        self.lengths[slots] = 0
        self.prefix_len[slots] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.pk + self.pv)


def plan_cache(config, budget_bytes: int, max_model_len: int | None, max_slots: int,
               dtype: torch.dtype) -> tuple[int, int]:
    """(num_slots, max_len) for a model's KV cache that fit within ``budget_bytes``.

    One token of one slot costs ``2 * layers * kv_heads * head_dim * itemsize`` bytes.
    - With ``max_model_len``: max_len is that, and as many slots as fit, at most ``max_slots``.
    - Without: max_len = min(max_position_embeddings, what fits when all ``max_slots`` slots are
      allocated), but never below min(max_position_embeddings, 256, what fits in one slot):
      rather than making slots uselessly short, fewer slots are planned.
    Raises ValueError (one line) when not even one slot fits.
    """
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
    fits_tokens = int(budget_bytes) // per_token  # tokens the whole budget holds, in one slot
    limit = config.max_position_embeddings
    if max_model_len is not None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}"
            )
        max_len = max_model_len
    else:
        max_len = min(limit, fits_tokens // max_slots)
        max_len = max(max_len, min(limit, MIN_PLANNED_LEN, fits_tokens))
    num_slots = min(max_slots, fits_tokens // max_len) if max_len > 0 else 0
    if num_slots < 1:
        want = max_len if max_len > 0 else min(limit, MIN_PLANNED_LEN)
        raise ValueError(
            f"KV cache budget of {int(budget_bytes)} bytes holds {fits_tokens} tokens at {per_token} bytes "
            f"per token; one slot of {want} tokens needs {want * per_token} bytes"
        )
    return num_slots, max_len


def prompt_slots_for(num_slots: int, samples_per_prompt: int) -> int:
    """Prompt slots the shared layout gives ``num_slots`` rows of prompts with N samples each.

    Rows of about ceil(S / N) prompts run at once when their samples start together; as a
    prompt's samples finish at different times its prompt slot lives on with fewer rows, so
    twice that many (never more than one per row) keep admission from waiting on a straggler,
    plus one for the prompt being prefilled.
    """
    return min(num_slots, 2 * math.ceil(num_slots / max(1, samples_per_prompt))) + 1


def plan_shared_cache(config, budget_bytes: int, max_len: int, max_rows: int, row_len: int,
                      samples_per_prompt: int, dtype: torch.dtype) -> CacheLayout:
    """The shared layout that fits ``budget_bytes``: prompt slots of ``max_len - 1`` tokens (the
    longest prefix a row of at most ``max_len`` tokens can have) and as many row slots of
    ``row_len`` tokens (a row's own completion) as fit, at most ``max_rows``.

    Raises ValueError (one line) when not even one row and its prompt fit.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
    fits_tokens = int(budget_bytes) // per_token
    prompt_len = max(1, max_len - 1)
    row_len = max(1, min(row_len, max_len))

    def layout(rows: int) -> CacheLayout:
        return CacheLayout(rows, row_len, prompt_slots_for(rows, samples_per_prompt), prompt_len)

    if layout(1).tokens() > fits_tokens:
        raise ValueError(
            f"KV cache budget of {int(budget_bytes)} bytes holds {fits_tokens} tokens at {per_token} bytes "
            f"per token; one row of {row_len} tokens and its prompts of {prompt_len} need {layout(1).tokens() * per_token} bytes"
        )
    lo, hi = 1, max(1, max_rows)  # the most rows that fit: tokens() grows with rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if layout(mid).tokens() <= fits_tokens else (lo, mid - 1)
    return layout(lo)
