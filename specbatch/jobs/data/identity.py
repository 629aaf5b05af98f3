"""Input identity: what a plan records of each input file, so that a resume never mixes two datasets.

A file's **identity** is its size in bytes, its modification time (``mtime_ns``; on an object
store the time the object was last written, which a PUT of other bytes changes like an etag;
``pyarrow.fs`` exposes no etag) and the sha256 of its **Parquet footer** (the file's last
``8 + footer length`` bytes: the schema, the row groups with their column chunks' offsets, sizes
and statistics). The footer changes with any change of the rows' layout or encoded sizes, so a
file replaced by another of the same size and time is still told apart; reading it costs one
metadata call and two small ranged reads per file, whatever the file's size (see
:func:`file_identity`). A file is **changed** when any of the three differs, even the time
alone (a ``touch``): the output was written from the file as it was, and only
``output.if_exists: overwrite`` starts over from the file as it is.

The plan file records the identity of every input file (:mod:`~specbatch.jobs.data.planning`); the
preflight compares it before a resume starts, and each actor compares the files of a shard
before it reads the shard's rows.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs

from specbatch.jobs.data.location import InputError, _one_line

_TAIL = 8  # footer length (4 bytes, little endian) + magic "PAR1"


@dataclass(frozen=True)
class FileIdentity:
    """One input file as a plan records it (``path`` is the filesystem path, without the scheme)."""

    path: str
    size: int
    mtime_ns: int | None
    footer_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FileIdentity":
        return cls(str(d["path"]), int(d["size"]), None if d.get("mtime_ns") is None else int(d["mtime_ns"]),
                   str(d["footer_sha256"]))

    def difference(self, now: "FileIdentity") -> str | None:
        """What differs between this recorded identity and the file `now` (one phrase), or None."""
        if self.size != now.size:
            return f"its size changed from {self.size} to {now.size} bytes"
        if self.footer_sha256 != now.footer_sha256:
            return "its Parquet footer changed (other row groups, sizes or statistics)"
        if self.mtime_ns != now.mtime_ns:
            return "its modification time changed"
        return None


def file_identity(fs: pafs.FileSystem, path: str, shown: str | None = None) -> FileIdentity:
    """The identity of one Parquet file: one ``get_file_info`` and two ranged reads (the last 8
    bytes, then the footer). Raises InputError (one line naming `shown`) when it cannot be read."""
    shown = shown or path
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise InputError(f"{shown}: no such file")
        with fs.open_input_file(path) as f:
            size = f.size()
            if size < 2 * _TAIL - 4:
                raise InputError(f"{shown}: not a Parquet file")
            tail = f.read_at(_TAIL, size - _TAIL)
            (length,) = struct.unpack("<I", tail[:4])
            if length > size - _TAIL:
                raise InputError(f"{shown}: not a Parquet file (footer of {length} bytes in a file of {size})")
            footer = f.read_at(length + _TAIL, size - _TAIL - length)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{shown}: cannot read: {_one_line(e)}") from None
    mtime = info.mtime_ns
    return FileIdentity(path=path, size=size, mtime_ns=None if mtime is None else int(mtime),
                        footer_sha256=hashlib.sha256(footer).hexdigest())
