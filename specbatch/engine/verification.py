"""One verification step from raw target logits: warp every position, then verify.

This is the seam between the engine and the math: the engine hands over logits and per-row
settings, and gets back what each row emits plus the log-probability of each emitted token
under the warped target distribution p (for cumulative_logprob).

:func:`warp_and_verify` is the kernels' host wrapper ``specbatch_kernels.ops.verify``:
rejection sampling runs on the backend chosen once (the fused Triton kernels on CUDA tensors or
when forced, the torch reference elsewhere); coupled verification (``coupled=True``) runs the
torch reference on either backend.  Arguments: target logits [R, G+1, V], draft tokens [R, G],
num_proposed [R], draft probs q [R, G, V] or None, per-row WarpParams, key, sample index and
first completion position [R]; keywords history, ban, coupled.  Returns (VerifyResult,
log p of the emitted tokens [R, G+1]).
"""

from __future__ import annotations

from specbatch_kernels import ops

warp_and_verify = ops.verify
