
import os as _os
import pathlib as _pathlib

# The PYTHONPATH of the tests' subprocesses and Ray workers: this checkout's specbatch and its
# kernels (kernels/specbatch_kernels), whatever an editable install elsewhere points at.
PYTHONPATH = _os.pathsep.join(str(_pathlib.Path(__file__).resolve().parents[1] / d) for d in ("", "kernels"))
