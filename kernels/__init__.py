"""Fused Triton kernels for warping, sampling and speculative verification (``specbatch_kernels``).

Each kernel module sits beside the torch reference it must match:

* :mod:`specbatch_kernels.rng`: Philox-4x32-10 uniforms in-kernel (= ``specbatch.rng.uniform``);
* :mod:`specbatch_kernels.warp`: warp-and-sample of plain rows and draft proposals, sorting-free
  top-k / top-p thresholds (= ``specbatch.sampling.warp`` + ``sample_from_probs``);
* :mod:`specbatch_kernels.verify`: fused verification from target logits
  (= ``specbatch.speculative.verify`` on warped probabilities);
* :mod:`specbatch_kernels.approximate`: the opt-in, inexact sigmoid variant and its TV measurement;
* :mod:`specbatch_kernels.ops`: the host wrapper the engine calls (validation, allocation, the
  backend chosen once; ``SPECBATCH_KERNELS=triton|torch`` forces it);
* :mod:`specbatch_kernels.parity`: how kernel and reference outputs are compared (float rounding
  at decision boundaries is the only allowed difference).

Nothing here imports the engine.
"""
