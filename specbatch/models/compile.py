"""compile_steps: an opt-in torch.compile of a model's decode and verify steps.

A *step* is a forward of at most a few new tokens per row (plain decoding: 1; speculative
verification: gamma + 1).  At small batch it is bound by reading the weights once, and in eager
mode the launch overhead of its ~20 small ops per layer adds as much again.  Compiling fuses
those ops (norms, RoPE, residual adds, SwiGLU) into a few generated kernels and, on CPU, runs
the whole step from generated C++ (``cpp_wrapper``) with the weights frozen as constants and
each projection's GEMM kernel chosen by timing (oneDNN or inductor's C++ templates).  Prefill
(calls that want the last position only) stays eager.

Shapes are dynamic: batch rows, step width and the attended cache length are symbolic, so one
compiled program serves every context length; no length buckets and no recompilation as rows
grow.  Dynamo still specializes sizes of 1 (batch 1, width 1) and the plan's paths (masks,
row order, float32 attention), so a job compiles once per *kind* of step, not per shape.

Costs and limits:

- compiling takes minutes on a small CPU (2-5 min per kind of step for the demo model on 2
  cores, ``bench/compiled_steps.py``); it pays off on long jobs only, and is off unless a job
  asks for it;
- a kind of step must trace as one graph: a graph break inside a layer makes dynamo compile
  every layer's frame separately (one variant per layer's weights), which multiplies compile
  time by the depth and, past the recompile limit, silently falls back to eager; the forward's
  plan therefore gives the layers no data-dependent shape (``tests/test_compile.py`` checks);
- compiled logits are not bit-identical to eager ones (fused kernels round differently, by
  about one unit in the last place of bfloat16); the sampling contract is unaffected, since it
  holds for whatever logits the model produces, but a compiled job's rows differ from an eager
  job's, which is why the setting belongs to the job spec's target model;
- autotuning picks GEMM kernels by timing them, so two processes may pick differently and round
  differently: a shard retried on another actor has the same distribution but is not promised
  bit-identical rows (an eager job's retries are);
- CUDA graphs are not used: with symbolic lengths every new length would record a new graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch._inductor.config as inductor_config

# Steps of up to this many new tokens per row run compiled (prefill runs eager).
DEFAULT_MAX_WIDTH = 16

# Kinds of step a job may meet (masks, index paths, last-token-only or not), with room to spare:
# past this many compiled variants of the step, dynamo would fall back to eager silently.
RECOMPILE_LIMIT = 64


def inductor_options(device: torch.device, autotune: bool = True) -> dict[str, Any]:
    """Inductor settings for a step on `device`: frozen weights; on CPU a C++ wrapper too, and
    (with `autotune`) GEMM kernels chosen by timing."""
    options: dict[str, Any] = {"freezing": True}
    if device.type == "cpu":
        options["cpp_wrapper"] = True
        if autotune:
            # Let inductor pick, per projection, between oneDNN and its own C++ GEMM templates by
            # timing them: for one-row projections the templates read weights at 30 GB/s where
            # oneDNN's packed GEMM reaches 19 (demo model's MLP projections, 2 cores).
            options["max_autotune"] = True
            options["max_autotune_gemm_backends"] = "CPP,ATEN"
    return options


def compile_steps(model: Any, max_width: int = DEFAULT_MAX_WIDTH, autotune: bool = True) -> Callable[..., torch.Tensor]:
    """Make `model` run its steps through torch.compile: calls of at most `max_width` new tokens
    per row that return every position's logits (calls with ``last_only``, prefill, stay eager).

    `model` is a LlamaModel; its oneDNN pre-packed weight copies are dropped first, since the
    compiled program packs frozen weights itself (and dynamo cannot trace the packed ones).
    Compilation happens lazily, at the first step of each kind.  `autotune` (CPU) times
    candidate GEMM kernels while compiling: slower to compile, faster steps.  Returns the
    compiled body.
    """
    if max_width < 1:
        raise ValueError(f"max_width must be >= 1, got {max_width}")
    model.unpack()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(model.body, dynamic=True)
    options = inductor_options(model.device, autotune)

    def body(*args: Any) -> torch.Tensor:
        # Inductor reads these settings when it compiles, which happens inside a call; set
        # around each call (not passed to torch.compile, where freezing was measured to be
        # ignored: no pre-packed weights, no speed-up).
        with inductor_config.patch(options):
            return compiled(*args)

    model.compiled_body = body
    model.compiled_max_width = max_width
    return body
