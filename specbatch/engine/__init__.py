"""The engine: continuous batching of rows, drafting, verification and the step's bookkeeping.

Knows nothing of job specs, data files or Ray (``specbatch.jobs`` builds and drives it).
"""
