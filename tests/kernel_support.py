"""Test support for the Triton kernels: force the Triton path and count kernel launches."""

from __future__ import annotations

from typing import Any

from specbatch_kernels import ops


def keep_backend_choice(monkeypatch) -> None:
    """Restore the wrapper's backend choice (name and whether it was forced) after the test."""
    monkeypatch.setattr(ops, "_backend", ops._backend)
    monkeypatch.setattr(ops, "_forced", ops._forced)


def force_triton(monkeypatch, module: Any, launcher: str, counter: str) -> dict[str, int]:
    """Force the Triton backend for one test and count calls of ``module.launcher`` under
    ``calls[counter]``, so the test can assert the kernels really ran."""
    keep_backend_choice(monkeypatch)
    ops.force_backend("triton")
    calls = {counter: 0}
    real = getattr(module, launcher)

    def counted(*args, **kwargs):
        calls[counter] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, launcher, counted)
    return calls
