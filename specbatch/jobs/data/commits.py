"""Commits: a shard's manifest, written once its file is complete, verified on resume.

A **commit**: a shard's file ``part-NNNNN.parquet`` is written completely (under a temporary name,
then renamed; on object stores, to its fixed key, which appears whole); only then is its manifest
``__specbatch__/manifests/part-NNNNN.json`` written. A shard is *committed* when its manifest exists and reads;
readers see only committed shards. A manifest records its file's size and sha256: a committed
shard whose file is missing, of another size, unreadable or different is *uncommitted* again
(:func:`uncommit_unverified`), and so is a manifest that does not read; a rerun then runs it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Iterable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.jobs.data.files import (
    OutputIOError,
    _delete_quietly,
    _list_dir,
    _read_json,
    _write_bytes_atomic,
    file_digest,
)
from specbatch.jobs.data.layout import LEGACY_MANIFEST_SUFFIX, MANIFEST_DIR, MANIFEST_SUFFIX, META_DIR, manifest_name
from specbatch.jobs.data.location import InputError, _join, _one_line, output_uri, resolve
from specbatch.jobs.data.planning import Shard, split_shard
from specbatch.jobs.data.records import ShardManifest

if TYPE_CHECKING:
    from specbatch.jobs.spec import OutputSpec


def write_manifest(out: OutputSpec, manifest: ShardManifest, fingerprint: str) -> ShardManifest:
    """Commit a shard: write its manifest in the output directory `out` once its Parquet file is complete.

    Refuses a file that is missing or not of the size the manifest records. Sets the commit
    fields (file name, the spec's `fingerprint`, time) and returns the committed manifest.
    """
    fs, root = resolve(out.path)
    file_name = f"{manifest.shard}.parquet"
    info = fs.get_file_info(_join(root, file_name))
    if info.type != pafs.FileType.File:
        raise OutputIOError(output_uri(out, file_name), "the shard file is missing (written, then removed?)")
    if manifest.file_bytes is not None and info.size != manifest.file_bytes:
        raise OutputIOError(output_uri(out, file_name), f"{info.size} bytes, {manifest.file_bytes} were written")
    manifest = dataclasses.replace(
        manifest, file=file_name, fingerprint=fingerprint,
        committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    data = (json.dumps(manifest.to_json(), indent=1) + "\n").encode("utf-8")
    _write_bytes_atomic(fs, _join(root, manifest_name(manifest.shard)), data)
    return manifest


def _read_manifests(fs: pafs.FileSystem, root: str) -> tuple[dict[str, ShardManifest], dict[str, tuple[str, str]]]:
    """(shard name -> manifest, in row order; shard name -> (manifest path, why it does not read)).

    Reads the first layout's manifests (beside the shards) where the directory has no manifest folder.
    """
    good: dict[str, ShardManifest] = {}
    bad: dict[str, tuple[str, str]] = {}
    folder = _join(root, MANIFEST_DIR)
    suffix = MANIFEST_SUFFIX
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        folder, suffix = root, LEGACY_MANIFEST_SUFFIX
    for e in _list_dir(fs, folder):
        if e.type == pafs.FileType.File and e.base_name.endswith(suffix) and not e.base_name.startswith("."):
            name = e.base_name[: -len(suffix)]
            try:
                good[name] = ShardManifest.from_json(_read_json(fs, e.path))
            except InputError as err:
                raise InputError(f"{e.path}: {err}") from None
            except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                bad[name] = (e.path, f"its manifest does not read ({_one_line(err)[:120]})")
    return dict(sorted(good.items(), key=lambda kv: (kv[1].start, kv[1].stop, kv[0]))), bad


def committed(out: OutputSpec | str) -> dict[str, ShardManifest]:
    """Committed shards of an output directory (an OutputSpec or a path/URI): shard name -> manifest,
    in row order. A manifest that does not read commits nothing."""
    fs, root = resolve(out if isinstance(out, str) else out.path)
    return _read_manifests(fs, root)[0]


def verify_shard(fs: pafs.FileSystem, root: str, manifest: ShardManifest) -> str | None:
    """None when the shard's file is the one its manifest committed, else what differs (one line).

    With a recorded size and sha256 the file's bytes are compared; a manifest of the first
    version records neither, so its file must read as Parquet with the manifest's row count.
    """
    path = _join(root, manifest.file)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return f"{manifest.file} is missing"
    if manifest.file_bytes is not None:
        if info.size != manifest.file_bytes:
            return f"{manifest.file} has {info.size} bytes, its manifest says {manifest.file_bytes}"
        if file_digest(fs, path)[1] != manifest.file_sha256:
            return f"{manifest.file} is not the file its manifest committed (sha256 differs)"
        return None
    try:
        rows = pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        return f"{manifest.file} does not read as Parquet ({_one_line(e)[:120]})"
    if rows != manifest.samples:
        return f"{manifest.file} has {rows} rows, its manifest says {manifest.samples}"
    return None


def uncommit_unverified(out: OutputSpec) -> tuple[dict[str, ShardManifest], dict[str, str]]:
    """Verify every committed shard of the output directory `out`; delete the manifests that do not read or whose file is not
    the one committed (the shard is then pending again). Returns (the manifests that verify,
    shard name -> why each other one was uncommitted). Reads every committed file once."""
    fs, root = resolve(out.path)
    manifests, unreadable = _read_manifests(fs, root)
    dropped = {name: why for name, (_, why) in unreadable.items()}
    for name, (path, _) in unreadable.items():
        _delete_quietly(fs, path)
    for name, m in list(manifests.items()):
        why = verify_shard(fs, root, m)
        if why is not None:
            _delete_quietly(fs, _join(root, manifest_name(name)))
            del manifests[name]
            dropped[name] = why
    return manifests, dict(sorted(dropped.items()))


def remove_uncommitted(out: OutputSpec) -> list[str]:
    """Delete shard files of the output directory `out` that no manifest commits (and stray temporary files); return their names.

    Such files are left by an attempt that wrote its file but was never committed (its actor
    died, the driver stopped, or the shard was later split). Call only while no actor writes:
    before dispatch (prepare_output does, on resume) and after the last commit, so that a
    finished directory's ``part-*.parquet`` files are exactly its committed shards and tools
    that glob them read every row once.
    """
    fs, root = resolve(out.path)
    files = {m.file for m in committed(out).values()}
    removed = []
    for folder in (root, _join(root, META_DIR), _join(root, MANIFEST_DIR)):
        for e in _list_dir(fs, folder):
            if e.type != pafs.FileType.File:
                continue
            stray_shard = folder == root and e.base_name.startswith("part-") and e.base_name.endswith(".parquet")
            if (stray_shard and e.base_name not in files) or ".tmp-" in e.base_name:
                _delete_quietly(fs, e.path)
                removed.append(e.base_name)
    return sorted(removed)


def pending_shards(planned: Iterable[Shard], manifests: Mapping[str, ShardManifest]) -> list[Shard]:
    """The shards still to run, in plan order: the one rule of resume.

    A shard is *done* when a manifest commits it under its own name and row range and its rows
    did not fail (``failed``: its attempts kept failing; a rerun tries them again). Pass only
    manifests that verify. A shard split in an earlier run is not committed under its own name
    but some of its halves are: recurse into them, since :func:`split_shard` names and cuts
    them the same way every time.
    """
    names = list(manifests)

    def todo(shard: Shard) -> list[Shard]:
        m = manifests.get(shard.name)
        if m is not None and (m.start, m.stop) == (shard.start, shard.stop):
            return [shard] if m.failed else []
        prefix = shard.name + "."
        if shard.num_rows > 1 and any(n.startswith(prefix) for n in names):
            left, right = split_shard(shard)
            return todo(left) + todo(right)
        return [shard]

    return [s for shard in planned for s in todo(shard)]
