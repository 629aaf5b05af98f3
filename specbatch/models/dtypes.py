"""Model dtypes: the names a spec may use and what ``auto`` means on a device.

``auto`` is the fastest dtype the device computes natively, decided once when a model is loaded:

* CUDA: bfloat16 where the GPU supports it (Ampere and later), float16 on older GPUs;
* CPU: bfloat16 where oneDNN has a bfloat16 path (AVX-512, AVX-NE-CONVERT or AMX), float32
  otherwise.  Without one, a bfloat16 matmul falls back to scalar code: on an AVX2-only CPU a
  decode-sized bfloat16 linear of the demo model took 91 ms against 1.1 ms in float32.

A dtype is part of the model, not of the sampling contract: samples follow the distribution of
the model at the dtype it runs in, whichever that is.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name (float32 / bfloat16 / float16) or a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or {AUTO}, got {dtype!r}")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 matmuls through oneDNN's bfloat16 kernels."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: assume the slow path
        return False


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> str:
    """The dtype name a model loads in: ``dtype`` itself, or what ``auto`` means on ``device``."""
    if isinstance(dtype, torch.dtype) or dtype != AUTO:
        wanted = as_dtype(dtype)
        return next(name for name, value in DTYPES.items() if value == wanted)
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"
