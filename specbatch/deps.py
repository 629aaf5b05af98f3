"""The environment check: every module a job imports, imported once in this process.

A dependency that is missing or broken (an incompatible release, a package shadowed by a folder
on ``sys.path``) would otherwise surface as a traceback from inside a Ray actor, after Ray has
started and the output directory has been touched. :func:`check` imports what the engine and
the job system import, in the driver, and turns the first failure into one line;
``python -m specbatch.deps`` runs it (the last step of ``scripts/venv.sh``).
"""

from __future__ import annotations

import importlib
import platform
import sys

# (module, what it is for). Order: the first failure is the one reported, so foundations first.
RUNTIME_MODULES: tuple[tuple[str, str], ...] = (
    ("numpy", "arrays"),
    ("torch", "the engine"),
    ("safetensors.torch", "checkpoint weights"),
    ("tokenizers", "tokenizers"),
    ("transformers", "tokenizers and chat templates"),
    ("transformers.activations", "transformers' model code"),
    ("transformers.models.auto.modeling_auto", "transformers' model classes"),
    ("pyarrow.parquet", "Parquet input and output"),
    ("pyarrow.fs", "object stores"),
    ("yaml", "job specs"),
    ("pydantic", "job specs"),
    ("ray", "actors"),
    ("specbatch_kernels.ops", "the verification kernels' host wrapper"),
    ("specbatch.engine.engine", "the engine"),
    ("specbatch.jobs.worker", "the actors"),
)


def _triton_expected() -> bool:
    """pyproject.toml requires triton on x86_64 Linux only."""
    return sys.platform == "linux" and platform.machine() == "x86_64"


class DependencyError(RuntimeError):
    """A module a job needs does not import; the message is one line."""


def check() -> None:
    """Import every runtime module; raise DependencyError naming the first that fails."""
    modules = list(RUNTIME_MODULES)
    if _triton_expected():
        modules.insert(2, ("triton", "the Triton kernels"))
    for name, purpose in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or whatever a broken package raises on import
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise DependencyError(
                f"the environment cannot run specbatch: `import {name}` ({purpose}) failed: {detail}; "
                "reinstall it from the lock with `make venv`") from exc


def main() -> int:
    try:
        check()
    except DependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
