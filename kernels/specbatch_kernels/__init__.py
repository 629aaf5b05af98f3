"""Fused Triton kernels for warping, sampling and speculative verification (``specbatch_kernels``).

Each Triton launcher has a torch mirror in :mod:`specbatch_kernels.reference` (pure torch, no
Triton import) that it must match:

* :mod:`specbatch_kernels.rng`: Philox-4x32-10 uniforms in-kernel (= ``specbatch.sampling.rng.uniform``);
* :mod:`specbatch_kernels.warp`: warp-and-sample of plain rows and draft proposals, sorting-free
  top-k / top-p thresholds (= ``reference.warp_and_sample``);
* :mod:`specbatch_kernels.verify`: fused verification from target logits (= ``reference.verify``);
* :mod:`specbatch_kernels.approximate`: the opt-in, inexact sigmoid variant and its TV measurement
  (= ``reference.verify_approximate``);
* :mod:`specbatch_kernels.attention`: slot attention for decode/verify steps, reading the KV
  cache in place with lengths from device tensors (= ``reference_attention.slot_attention``;
  the wrapper is ``ops.slot_attention``);
* :mod:`specbatch_kernels.reference`: the torch references, and the records both backends take;
* :mod:`specbatch_kernels.ops`: the host wrapper the engine calls (validation, allocation, the
  backend chosen once; ``SPECBATCH_KERNELS=triton|torch`` forces it).  Only ``ops``,
  ``reference``, ``reference_attention`` and ``parity`` load without Triton; ``ops`` imports a kernel module only on the
  Triton path;
* :mod:`specbatch_kernels.parity`: how kernel and reference outputs are compared (float rounding
  at decision boundaries is the only allowed difference).

Nothing here imports the engine.
"""
