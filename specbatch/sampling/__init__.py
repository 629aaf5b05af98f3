"""The sampling contract's building blocks: warping, the verifier reference, random numbers, bounds.

Depends on nothing else of specbatch; the kernels (``specbatch_kernels``) and the engine build on it.
"""
