"""Where the job's files are: a local path or a URI, opened through ``pyarrow.fs``.

Every path goes through ``pyarrow.fs`` (``specbatch.jobs.storage``), so local paths, ``file://``,
``s3://`` and ``gs://`` (with query options such as ``?endpoint_override=...``) all work the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from specbatch.jobs import storage

if TYPE_CHECKING:
    from specbatch.jobs.spec import OutputSpec


class InputError(ValueError):
    """A problem with the input dataset or the output directory. ``str(e)`` is one line naming the file, column or row."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (file://, s3://, gs://, ..., with query options) -> (filesystem, path on it)."""
    try:
        return storage.resolve(uri)
    except storage.StorageError as e:
        raise InputError(str(e)) from None


is_local = storage.is_local


def _join(base: str, name: str) -> str:
    return storage.join(base, name)


def output_uri(out: OutputSpec, name: str) -> str:
    """The path or URI of a file `name` in the output directory `out`."""
    return _join(out.path, name)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())
