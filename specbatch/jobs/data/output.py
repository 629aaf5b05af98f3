"""The output directory: whether a spec may write it, preparing it for a run, writing shard
files, reading the output back.

The spec file records the fingerprint of the spec that writes the directory; ``resume`` refuses
a directory written by a different spec (:func:`check_existing_output`, run by the preflight). Shards are committed by their manifests
(:mod:`specbatch.jobs.data.commits`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.jobs.data.commits import _read_manifests, remove_uncommitted, uncommit_unverified
from specbatch.jobs.data.files import (
    OutputIOError,
    _delete_quietly,
    _exists,
    _list_dir,
    _read_json,
    _write_bytes_atomic,
)
from specbatch.jobs.data.layout import (
    LEGACY,
    LEGACY_MANIFEST_SUFFIX,
    LEGACY_SPEC_FILE,
    MANIFEST_DIR,
    SPEC_FILE,
    SUCCESS_FILE,
    manifest_name,
)
from specbatch.jobs.data.location import InputError, _join, output_uri, resolve
from specbatch.jobs.data.inputs import InputInfo, _layout
from specbatch.jobs.data.planning import Shard, check_plan, read_plan
from specbatch.jobs.data.records import OutputRecord, ShardFile, records_table

if TYPE_CHECKING:
    from specbatch.jobs.spec import InputSpec, OutputSpec


def check_existing_output(inp: InputSpec, out: OutputSpec, fingerprint: str, info: InputInfo | None = None) -> bool:
    """Read the state of the output directory `out` and decide whether the spec of `fingerprint`,
    reading the input `inp`, may write it under ``output.if_exists``; True when the directory holds
    something (resume keeps it, overwrite clears it), False when it is missing or empty.

    Raises InputError (one line naming output.path and the rule) for a file in its place, a
    non-empty directory under ``fail``, a non-empty directory without a spec file (not a
    specbatch output: never resumed into or cleared), and under ``resume`` a spec file that does
    not read or records another spec's fingerprint, a plan that is stale (the input's files are not
    those it was planned from, :func:`~specbatch.jobs.data.planning.check_plan`; `info` is the input's
    layout, scanned when not given) and a manifest written by a newer specbatch. Reads the
    listing, the spec file, the plan, the manifests and the input files' footers; writes nothing,
    so a refused resume leaves the directory exactly as it was.
    The preflight calls it before Ray starts; :func:`prepare_output` calls it again under the
    run's hold on the directory, since another run may have written it in between.
    """
    fs, root = resolve(out.path)
    where, mode = out.path, out.if_exists
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise InputError(f"output.path: {where} is a file, expected a directory")
    if not _list_dir(fs, root):
        return False
    if mode == "fail":
        raise InputError(f"output.path: {where} is not empty (if_exists: fail)")
    spec_path = next((p for p in (_join(root, SPEC_FILE), _join(root, LEGACY_SPEC_FILE)) if _exists(fs, p)), None)
    if spec_path is None:
        verb = "clear" if mode == "overwrite" else "resume into"
        raise InputError(f"output.path: {where} is not empty and has no {SPEC_FILE} (not a specbatch output); refusing to {verb} it")
    if mode == "resume":
        try:
            recorded = _read_json(fs, spec_path).get("fingerprint")
        except (ValueError, AttributeError):
            raise InputError(f"output.path: {where}: {SPEC_FILE} does not read; use output.if_exists: overwrite") from None
        if recorded != fingerprint:
            raise InputError(
                f"output.path: {where} was written by a different spec (fingerprint {str(recorded)[:12]} != "
                f"{fingerprint[:12]}); use output.if_exists: overwrite or another output.path"
            )
        plan = read_plan(out)
        if plan is not None:
            check_plan(inp, plan, info or _layout(inp))
        _read_manifests(fs, root)  # raises for a manifest of a newer version
    return True


def prepare_output(inp: InputSpec, out: OutputSpec, fingerprint: str, spec_json: Mapping[str, Any]) -> list[str]:
    """Apply ``output.if_exists`` to the output directory `out` and record the spec (`spec_json`, the
    spec as plain JSON) and its `fingerprint` in the spec file; `inp` is the input the spec reads.

    Whether the spec may write the directory is :func:`check_existing_output`'s decision, made
    again here before any write. Then resume keeps committed shards that verify, uncommits the
    others and removes leftovers of an interrupted run (uncommitted shard files, temporary
    files, _SUCCESS), and moves an output of the first layout into the current one
    (:mod:`~specbatch.jobs.data.layout`); overwrite clears the directory.
    Returns one line per shard uncommitted because its manifest or file was damaged.
    """
    notes: list[str] = []
    fs, root = resolve(out.path)
    if check_existing_output(inp, out, fingerprint):
        if out.if_exists == "resume":
            _move_first_layout(fs, root)
            _delete_quietly(fs, _join(root, SUCCESS_FILE))
            notes = [f"{name}: {why}" for name, why in uncommit_unverified(out)[1].items()]
            remove_uncommitted(out)
        else:
            fs.delete_dir_contents(root)
    fs.create_dir(_join(root, MANIFEST_DIR), recursive=True)
    record = {"fingerprint": fingerprint, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": dict(spec_json)}
    _write_bytes_atomic(fs, _join(root, SPEC_FILE), (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return notes


def _move_first_layout(fs: pafs.FileSystem, root: str) -> None:
    """Move the files of a first-layout output (beside the shards) to their places now.

    The spec file moves last: a resume interrupted in between finds it and moves the rest.
    """
    entries = [e for e in _list_dir(fs, root) if e.type == pafs.FileType.File and not e.base_name.startswith(".")]
    manifests = [e for e in entries if e.base_name.endswith(LEGACY_MANIFEST_SUFFIX)]
    others = sorted((e for e in entries if e.base_name in LEGACY), key=lambda e: e.base_name == LEGACY_SPEC_FILE)
    if not manifests and not others:
        return
    fs.create_dir(_join(root, MANIFEST_DIR), recursive=True)
    for e in manifests:
        fs.move(e.path, _join(root, manifest_name(e.base_name[: -len(LEGACY_MANIFEST_SUFFIX)])))
    for e in others:
        target = LEGACY[e.base_name]
        if target is None:
            _delete_quietly(fs, e.path)
        else:
            fs.move(e.path, _join(root, target))


def write_shard(out: OutputSpec, shard: Shard, records: Sequence[OutputRecord], schema: pa.Schema) -> ShardFile:
    """Write a shard's records to ``part-NNNNN.parquet`` in the output directory `out`, in the output
    schema (:func:`~specbatch.jobs.data.records.output_schema`).

    The file is built in memory, so its size and sha256 come from the very bytes written; then
    written under a temporary name and renamed (no partial file under the final name), or on
    object stores to the fixed key (an object appears whole). A retried shard rewrites the same name.
    """
    table = records_table(records, schema, shard.name)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    buffer = sink.getvalue()
    fs, root = resolve(out.path)
    # The directory is made by prepare_output; one that is gone since is an output error, never
    # made again here (a fresh directory would hold shards without their spec file and plan).
    if isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(root).type != pafs.FileType.Directory:
        raise OutputIOError(root, OSError(errno.ENOENT, "gone"))
    _write_bytes_atomic(fs, _join(root, f"{shard.name}.parquet"), buffer)
    return ShardFile(output_uri(out, f"{shard.name}.parquet"), buffer.size, hashlib.sha256(buffer).hexdigest())


def read_output(path: str) -> pa.Table:
    """All committed shards of an output directory, in row order (uncommitted files are ignored).

    Raises ValueError if a manifest does not read or two committed shards overlap (either would
    lose or duplicate rows).
    """
    fs, root = resolve(path)
    manifests, unreadable = _read_manifests(fs, root)
    if unreadable:
        raise ValueError(f"{_join(path, next(iter(unreadable)))}: {next(iter(unreadable.values()))[1]}")
    tables = []
    last_stop, last_name = None, None
    for name, m in manifests.items():
        if last_stop is not None and m.start < last_stop:
            raise ValueError(f"{_join(path, name)}: rows [{m.start}, {m.stop}) overlap committed shard {last_name}")
        last_stop, last_name = m.stop, name
        tables.append(pq.read_table(_join(root, m.file), filesystem=fs))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)
