"""Where job data lives: a *location* (a local path or a URI) -> a pyarrow filesystem and a path on it.

Terms:

* a **location** is a plain path (``out/run1``, ``~/data``) or a URI with a scheme
  (``file:///mnt/shared/out``, ``s3://bucket/prefix``, ``gs://bucket/prefix``);
* a URI's **query options** are what follows its ``?``, in ``pyarrow.fs.FileSystem.from_uri``
  syntax, e.g. ``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1``.
  They configure the filesystem, not the path: a name joined under such a URI goes before the
  ``?`` and the options are kept (``s3://bucket/prefix/stats.json?endpoint_override=...``).
  On a plain path, ``?`` is an ordinary character (a glob character for inputs).

An S3 endpoint can also come from the environment: pyarrow's S3 filesystem honours
``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``), like the AWS SDKs and CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location whose filesystem cannot be opened (unknown scheme, bad query option). One line."""


class Busy(StorageError):
    """A directory another process holds (:func:`hold`)."""


def is_local(location: str) -> bool:
    """True for a plain path (no scheme): this machine's own disk as far as specbatch can tell.

    A ``file://`` URI is taken as a deliberate choice of a mounted, possibly shared, file system.
    """
    return "://" not in location


def scheme(location: str) -> str:
    """The location's URI scheme, ``file`` for a plain path; known without opening anything."""
    return "file" if is_local(location) else location.split("://", 1)[0].lower()


def split_query(location: str) -> tuple[str, str]:
    """A location -> (the location without its query options, the query with its ``?`` or "")."""
    if is_local(location):
        return location, ""
    base, mark, query = location.partition("?")
    return base, mark + query


def join(location: str, name: str) -> str:
    """The location of `name` (a file or relative path) under the directory `location`, with the
    directory's query options kept at the end."""
    base, query = split_query(location)
    return base.rstrip("/") + "/" + name.lstrip("/") + query


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A location -> (filesystem, path on it); query options configure the filesystem.

    Raises StorageError (one line naming the location) when no filesystem can be opened.
    """
    if is_local(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise StorageError(f"{location}: cannot open filesystem: {' '.join(str(e).split())}") from None


def hold(location: str, create: bool = True) -> contextlib.ExitStack | None:
    """Take the directory `location` for this process alone, creating it if missing; the
    returned context releases it. Raises Busy when another process (or another hold in this
    one) has it. create=False: a missing local directory is not made, and None is returned.

    On a local filesystem (plain paths, ``file://`` URIs) this is an advisory lock (flock) on
    the directory itself: no file is written, and the kernel releases it when the process ends,
    however it ends, so a killed run leaves no stale lock (the descriptor is not inherited by
    child processes). Object stores have no such lock: nothing is held there, and one run at a
    time per output prefix is up to the user.
    """
    held = contextlib.ExitStack()
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        return held
    if not create and not os.path.isdir(path):
        return None
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise StorageError(f"{location}: cannot create or open the directory: {e.strerror or e}") from None
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise Busy(f"{location} is being written by another run; wait for it to end or write elsewhere") from None
    return held
