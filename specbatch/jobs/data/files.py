"""Files in a job's directories: atomic writes, listings and JSON documents, on any ``pyarrow.fs``.

A file written here is never seen partial: on a file system it is written under a temporary
name (``.NAME.tmp-XXXX``) and renamed; on an object store it is one PUT of the whole object.

An **output I/O error** (:class:`OutputIOError`) is a write the output's store refused: a full
disk (ENOSPC, EDQUOT), a read-only file system (EROFS), no permission (EACCES, EPERM), a
directory that is gone (ENOENT), or an object store's refusal. It is never a property of the
rows being written, so it is never retried row by row: the run stops, naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from specbatch.jobs.data.location import resolve

_OBJECT_STORES = ("s3", "gcs")
_DIGEST_PIECE = 8 << 20


class OutputIOError(OSError):
    """A write to the output location failed. ``str(e)`` is one line: the path and the error
    (with its errno name, e.g. ``No space left on device (ENOSPC)``)."""

    def __init__(self, path: str, error: BaseException | str):
        code = getattr(error, "errno", None)
        if isinstance(code, int) and code in errno.errorcode:
            why = f"{os.strerror(code)} ({errno.errorcode[code]})"
        else:
            why = " ".join(str(error).split())[:300]
        super().__init__(code, f"{path}: {why}")
        self.path = path
        self.line = f"{path}: {why}"

    def __str__(self) -> str:
        return self.line

    def __reduce__(self):  # pickled across Ray with its line intact
        return (_rebuild_output_io_error, (self.path, self.line))


def _rebuild_output_io_error(path: str, line: str) -> "OutputIOError":
    e = OutputIOError(path, "")
    e.line = line
    return e


def _is_object_store(fs: pafs.FileSystem) -> bool:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in _OBJECT_STORES


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Write data so that `path` is never seen partial: temp name + rename, or one object PUT.
    A failed write raises OutputIOError naming `path`."""
    if _is_object_store(fs):
        try:
            _put(fs, path, data)
        except (OSError, pa.ArrowException) as e:
            raise OutputIOError(path, e) from None
        return
    tmp = _temp_name(path)
    try:
        _put(fs, tmp, data)
        fs.move(tmp, path)
    except BaseException as e:
        _delete_quietly(fs, tmp)
        if isinstance(e, (OSError, pa.ArrowException)) and not isinstance(e, OutputIOError):
            raise OutputIOError(path, e) from None
        raise


def _put(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def file_digest(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, streamed in 8 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while piece := f.read(_DIGEST_PIECE):
            digest.update(piece)
            size += len(piece)
    return size, digest.hexdigest()


def _temp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:12]}"


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def _list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return []
    return fs.get_file_info(pafs.FileSelector(path, recursive=False))


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    """Write a JSON document atomically to a path or URI (used for stats.json and the like)."""
    fs, path = resolve(uri)
    _write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))
