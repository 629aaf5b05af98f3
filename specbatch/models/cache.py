"""Slot KV cache: fixed slots, one length per slot, rollback = set the length.

A *slot* is one row's private region of the cache: per layer, K and V tensors of shape
``[num_slots, kv_heads, max_len, head_dim]``.  ``lengths[s]`` is how many tokens slot ``s``
holds (positions ``0 .. lengths[s]-1`` are valid; anything beyond is stale and never read as a
key).  The model's forward writes new K/V at ``lengths[s] ..`` and then advances the length.

- Rejected proposals are rolled back by lowering the length (``set_lengths``): nothing is erased.
- A finished row frees its slot (``reset``: length 0) and a new (prompt, sample) is prefilled
  into it (continuous batching).
- N samples of one prompt: prefill once into one slot, then ``copy_prefix`` into the N-1 others.
"""

from __future__ import annotations

from typing import Sequence

import torch

# With no max_model_len, planning never shrinks a slot below this many tokens (or the model's
# max_position_embeddings, if smaller) to fit more slots; it fits fewer slots instead.
MIN_PLANNED_LEN = 256


class KVCache:
    """Per-layer K/V tensors ``[num_slots, kv_heads, max_len, head_dim]`` and per-slot lengths."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots} and {max_len}")
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)  # [S]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def _index(self, slots) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.int64, device=self.device).reshape(-1)

    def copy_prefix(self, src: int, dst: torch.Tensor | Sequence[int], length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into every slot of ``dst``; set their lengths.

        Used to fan one prefilled prompt out to its N samples.  ``src`` may appear in ``dst``
        (it then keeps its data and gets length ``length``).
        """
        dst = self._index(dst)
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
        """Free ``slots``: their length becomes 0 (the stale K/V is overwritten by the next prefill)."""
        self.lengths[self._index(slots)] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


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
