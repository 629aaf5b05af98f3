"""Where the job's files are: a local path or a URI, opened through ``pyarrow.fs``.

Every path goes through ``pyarrow.fs`` (``FileSystem.from_uri``), so local paths, ``file://``,
``s3://`` and ``gs://`` all work the same way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    from specbatch.spec import JobSpec


class InputError(ValueError):
    """A problem with the input dataset or the output directory. ``str(e)`` is one line naming the file, column or row."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (file://, s3://, gs://, ...) -> (filesystem, path on it)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
            raise InputError(f"{uri}: cannot open filesystem: {_one_line(e)}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def is_local(uri: str) -> bool:
    """True for a plain path (no scheme): this machine's own disk as far as specbatch can tell.

    A ``file://`` URI is taken as a deliberate choice of a mounted, possibly shared, file system.
    """
    return "://" not in uri


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def output_uri(spec: JobSpec, name: str) -> str:
    """The path or URI of a file `name` in the job's output directory."""
    return _join(spec.output.path, name)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())
