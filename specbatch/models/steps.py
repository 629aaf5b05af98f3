"""Static steps and their CUDA graphs: decode and verify forwards whose shapes never depend on the data.

A *step* is a forward of a native model (:class:`~specbatch.models.llama.LlamaModel`) over row
slots that returns every position's logits: a plain decode (1 token per row), a speculative
verification (gamma + 1) or a model drafter's feed (1 or 2). The eager forward plans each call
from the cache's lengths with one host synchronization (``llama._Plan``: the longest row, the
slot order) and attends over exactly the keys it needs. A *static step* does neither: its
:class:`StaticPlan` is computed on the device from the lengths, the K/V of padding tokens are
written into the slots' *tail* (``KVCache.tail``, never read), and attention reads each row's
keys in place up to its own length (``specbatch_kernels.ops.slot_attention``: one Triton
kernel on CUDA, its torch reference elsewhere). The same tensors then serve every call of one
(batch, width), which is what a CUDA graph needs.

:class:`CudaGraphSteps` captures one graph per (cache, batch bucket, width) the first time a step
of that shape runs (lazily, so a job captures only the shapes it meets), and replays it: the
call's tokens, slots and token counts are copied into the graph's static inputs, the rows past
the call's (up to the bucket) are padding (slot 0, no tokens: nothing is written but slot 0's
tail, no length changes), and the logits are a view of the graph's static output, valid until the
model's next step. A step of a small model on a GPU is bound by kernel launches in eager mode
(hundreds per layer stack); a replay launches them all at once.

:class:`StaticSteps` runs the same static forward eagerly. It is what a graph records, so on the
CPU it is how tests prove a static step equal to the eager forward (logits within rounding, the
engine's exactness harness through it); it is not faster than the eager path on a CPU.

Which path a forward takes is fixed when the model is set up (:func:`use_static_steps`, called
by the job's engine builder): steps of at most ``max_width`` tokens per row go through the
model's ``steps``; prefill (``last_only``) and wider calls stay eager. The shared prompt KV
layout is read in place too (each row reads its linked prompt slot; on a GPU rows of one prompt
meet in the L2 cache rather than in one matrix product).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specbatch.models.cache import KVCache
from specbatch.models.rope import rope_cos_sin
from specbatch_kernels.ops import slot_attention

# Forwards are replayed at these batch sizes (the smallest one >= the call's rows): powers of
# two up to 8, then every multiple of 8, then the engine's largest batch.
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 8
# Warm-up runs before a capture (the first run compiles the Triton kernels and settles
# allocations; capture needs both done).
WARMUP_RUNS = 2


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for, up to and including ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {b for b in SMALL_BUCKETS if b < max_batch} | set(range(BUCKET_STEP * 2, max_batch, BUCKET_STEP))
    return sorted(sizes | {max_batch})


class StaticPlan:
    """The per-forward tensors of a static step: ``llama._Plan``'s counterpart, computed on the
    device with no host synchronization and no shape that depends on the lengths.

    For B rows of width W: ``positions [B, W]`` logical (RoPE); ``own_start [B]`` the row's own
    tokens before the call (logical length minus its prompt link's length); the write index
    ``([B, W], [B, W])`` sends token j of row b to own position ``own_start + j`` when it is
    real and to the tail position ``max_len + j`` when it is padding.
    """

    def __init__(self, model: Any, cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor, W: int):
        B = slots.shape[0]
        lengths = cache.lengths[slots]  # [B] logical
        self.prefix_len = cache.prefix_len[slots]  # [B] tokens read from a linked prompt slot (0: none)
        self.prefix_slot = cache.prefix_of[slots]  # [B] 0-based in the prompt pool
        self.own_start = lengths - self.prefix_len  # [B]
        offsets = torch.arange(W, device=slots.device)  # [W]
        positions = lengths[:, None] + offsets  # [B, W] logical
        real = offsets < num_tokens[:, None]  # [B, W]
        write_at = torch.where(real, self.own_start[:, None] + offsets, cache.max_len + offsets)  # [B, W]
        self.write_index = (slots[:, None].expand(B, W), write_at)
        self.cos, self.signed_sin = rope_cos_sin(positions, model.inv_freq, model.dtype)  # [B, W, hd]
        self.slots, self.num_tokens = slots, num_tokens
        self.cache = cache
        self.window = model.config.sliding_window

    def attend(self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Write k, v ``[B, W, kvh, hd]`` (padding into the tail), then attend in place:
        q ``[B, W, nh, hd]`` -> ``[B, W, nh, hd]``."""
        k_cache.transpose(1, 2).index_put_(self.write_index, k)  # [S, max_len + tail, kvh, hd] view
        v_cache.transpose(1, 2).index_put_(self.write_index, v)
        prefix_k = prefix_v = prefix_slot = prefix_len = None
        if self.cache.shared:
            prefix_k, prefix_v = self.cache.pk[layer.index], self.cache.pv[layer.index]  # [P, kvh, Lp, hd]
            prefix_slot, prefix_len = self.prefix_slot, self.prefix_len
        return slot_attention(q, k_cache, v_cache, self.slots, self.own_start, self.num_tokens,
                              prefix_k, prefix_v, prefix_slot, prefix_len,
                              window=self.window if layer.sliding else None)


class StaticSteps:
    """A model's steps as static forwards, run eagerly (see the module docstring)."""

    def __init__(self, model: Any, max_width: int):
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {max_width}")
        self.model = model
        self.max_width = max_width

    def forward(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, W]``, ``slots [B]``, ``num_tokens [B]`` on the model's device -> float32
        logits ``[B, W, V]``; the slots' lengths advance by ``num_tokens``."""
        W = tokens.shape[1]
        if cache.tail < W:
            raise ValueError(f"a static step of width {W} needs a cache tail of {W} positions, this cache has "
                             f"{cache.tail} (make the cache with the model's new_cache after use_static_steps)")
        model = self.model
        plan = StaticPlan(model, cache, slots, num_tokens, W)
        x = F.embedding(tokens, model.embed)  # [B, W, H]
        logits = model.body(x, cache.k, cache.v, plan, None)  # [B, W, V]
        cache.lengths.index_add_(0, slots, num_tokens)
        return logits

    __call__ = forward


@dataclass
class _Graph:
    """One captured step: its static inputs and output, and the graph that reads and writes them."""

    graph: Any  # torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [B, W]
    slots: torch.Tensor  # [B]
    num_tokens: torch.Tensor  # [B]
    logits: torch.Tensor  # [B, W, V]

    def replay(self, tokens: torch.Tensor, slots: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        R = tokens.shape[0]
        self.tokens[:R].copy_(tokens)
        self.slots[:R].copy_(slots)
        self.num_tokens[:R].copy_(num_tokens)
        self.slots[R:].zero_()  # padding rows: slot 0, no tokens
        self.num_tokens[R:].zero_()
        self.graph.replay()
        return self.logits[:R]


class CudaGraphSteps(StaticSteps):
    """Static steps captured as CUDA graphs, one per (cache, batch bucket, width), and replayed.

    Graphs of one model share one memory pool; a cache's graphs are dropped with the cache.
    Calls of more rows than the largest bucket run the static forward eagerly.
    """

    def __init__(self, model: Any, max_width: int, max_batch: int):
        super().__init__(model, max_width)
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {model.device}")
        self.buckets = batch_buckets(max_batch)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: weakref.WeakKeyDictionary[KVCache, dict[tuple[int, int], _Graph]] = weakref.WeakKeyDictionary()

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        R, W = tokens.shape
        B = self.bucket(R)
        if B is None:
            return self.forward(tokens, cache, slots, num_tokens)
        captured = self.graphs.setdefault(cache, {})
        graph = captured.get((B, W))
        if graph is None:
            graph = captured[(B, W)] = self._capture(cache, B, W)
        return graph.replay(tokens, slots, num_tokens)

    def _capture(self, cache: KVCache, B: int, W: int) -> _Graph:
        device = self.model.device
        tokens = torch.zeros(B, W, dtype=torch.int64, device=device)
        slots = torch.zeros(B, dtype=torch.int64, device=device)
        num_tokens = torch.zeros(B, dtype=torch.int64, device=device)  # no tokens: writes go to a tail only
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward(tokens, cache, slots, num_tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(tokens, cache, slots, num_tokens)
        return _Graph(graph, tokens, slots, num_tokens, logits)


def use_static_steps(model: Any, max_width: int, max_batch: int, graphs: bool) -> StaticSteps:
    """Make ``model``'s steps of at most ``max_width`` tokens per row static forwards, captured as
    CUDA graphs when ``graphs`` (batches up to ``max_batch`` replayed; needs a CUDA model). Caches
    made by ``model.new_cache`` from then on carry the tail the steps write padding into.
    Returns the steps object (also ``model.steps``)."""
    from specbatch.models.llama import LlamaModel

    if not isinstance(model, LlamaModel):
        raise ValueError(f"static steps run on the native backend only, not {type(model).__name__}")
    if model.compiled_body is not None:
        raise ValueError("a compiled model's steps are not static steps: choose compile or CUDA graphs")
    steps = CudaGraphSteps(model, max_width, max_batch) if graphs else StaticSteps(model, max_width)
    model.steps = steps
    return steps
