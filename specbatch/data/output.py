"""The output directory: preparing it, writing shard files, committing them, reading them back.

A **commit**: a shard's file ``part-NNNNN.parquet`` is written completely under a temporary name
and renamed (on object stores, written to its fixed key, which appears whole); only then is its
manifest ``part-NNNNN.manifest.json`` written. A shard is *committed* when its manifest exists;
readers see only committed shards. ``_spec.json`` records the fingerprint of the spec that
writes the directory; ``resume`` refuses a directory written by a different spec.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.data.files import _delete_quietly, _exists, _is_object_store, _list_dir, _read_json, _temp_name, _write_bytes_atomic
from specbatch.data.location import InputError, _join, output_uri, resolve
from specbatch.data.planning import Shard, split_shard
from specbatch.data.records import OutputRecord, ShardManifest, output_schema, records_table

if TYPE_CHECKING:
    from specbatch.spec import JobSpec


SPEC_FILE = "_spec.json"
SUCCESS_FILE = "_SUCCESS"
MANIFEST_SUFFIX = ".manifest.json"


def prepare_output(spec: JobSpec) -> None:
    """Apply ``output.if_exists`` and record the spec's fingerprint in ``_spec.json``.

    resume: keeps committed shards (refuses a directory written by a different spec) and removes
    leftovers of an interrupted run (temporary files, _SUCCESS); overwrite: clears the directory;
    fail: refuses a non-empty directory. A non-empty directory without ``_spec.json`` was not
    written by specbatch and is never resumed into or cleared. Checks come before any write.
    """
    fs, root = resolve(spec.output.path)
    where = spec.output.path
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise InputError(f"output.path: {where} is a file, expected a directory")
    entries = _list_dir(fs, root)
    mode = spec.output.if_exists
    fingerprint = spec.fingerprint()
    if entries:
        if mode == "fail":
            raise InputError(f"output.path: {where} is not empty (if_exists: fail)")
        spec_path = _join(root, SPEC_FILE)
        if not _exists(fs, spec_path):
            verb = "clear" if mode == "overwrite" else "resume into"
            raise InputError(f"output.path: {where} is not empty and has no {SPEC_FILE} (not a specbatch output); refusing to {verb} it")
        if mode == "resume":
            recorded = _read_json(fs, spec_path).get("fingerprint")
            if recorded != fingerprint:
                raise InputError(
                    f"output.path: {where} was written by a different spec (fingerprint {str(recorded)[:12]} != "
                    f"{fingerprint[:12]}); use output.if_exists: overwrite or another output.path"
                )
            for e in entries:
                if e.type == pafs.FileType.File and (e.base_name == SUCCESS_FILE or ".tmp-" in e.base_name):
                    _delete_quietly(fs, e.path)
            remove_uncommitted(spec)
        else:
            fs.delete_dir_contents(root)
    fs.create_dir(root, recursive=True)
    record = {"fingerprint": fingerprint, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": spec.to_dict()}
    _write_bytes_atomic(fs, _join(root, SPEC_FILE), (json.dumps(record, indent=1) + "\n").encode("utf-8"))


def write_shard(spec: JobSpec, shard: Shard, records: Sequence[OutputRecord], schema: pa.Schema | None = None) -> str:
    """Write a shard's records to ``part-NNNNN.parquet`` in the output directory; return its path.

    Local: written under a temporary name, then renamed (no partial file under the final name).
    Object stores: written to the fixed key (an object appears whole). A retried shard rewrites
    the same name.
    """
    schema = schema or output_schema(spec)
    table = records_table(records, schema, shard.name)
    fs, root = resolve(spec.output.path)
    fs.create_dir(root, recursive=True)
    final = _join(root, f"{shard.name}.parquet")
    if _is_object_store(fs):
        pq.write_table(table, final, filesystem=fs)
    else:
        tmp = _temp_name(final)
        try:
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, final)
        except BaseException:
            _delete_quietly(fs, tmp)
            raise
    return output_uri(spec, f"{shard.name}.parquet")


def write_manifest(spec: JobSpec, manifest: ShardManifest) -> ShardManifest:
    """Commit a shard: write ``part-NNNNN.manifest.json`` once its Parquet file is complete.

    Sets the commit fields (file name, spec fingerprint, time) and returns the committed manifest.
    """
    fs, root = resolve(spec.output.path)
    file_name = f"{manifest.shard}.parquet"
    if fs.get_file_info(_join(root, file_name)).type != pafs.FileType.File:
        raise FileNotFoundError(f"{output_uri(spec, file_name)}: shard file missing; write it before its manifest")
    manifest = dataclasses.replace(
        manifest, file=file_name, fingerprint=spec.fingerprint(),
        committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    data = (json.dumps(manifest.to_json(), indent=1) + "\n").encode("utf-8")
    _write_bytes_atomic(fs, _join(root, manifest.shard + MANIFEST_SUFFIX), data)
    return manifest


def remove_uncommitted(spec: JobSpec) -> list[str]:
    """Delete shard files that no manifest commits (and stray temporary files); return their names.

    Such files are left by an attempt that wrote its file but was never committed (its actor
    died, the driver stopped, or the shard was later split). Call only while no actor writes:
    before dispatch (prepare_output does, on resume) and after the last commit, so that a
    finished directory's ``part-*.parquet`` files are exactly its committed shards and tools
    that glob them read every row once.
    """
    fs, root = resolve(spec.output.path)
    files = {m.file for m in committed(spec).values()}
    removed = []
    for e in _list_dir(fs, root):
        if e.type != pafs.FileType.File:
            continue
        stray_shard = e.base_name.startswith("part-") and e.base_name.endswith(".parquet") and e.base_name not in files
        if stray_shard or ".tmp-" in e.base_name:
            _delete_quietly(fs, e.path)
            removed.append(e.base_name)
    return sorted(removed)


def committed(spec: JobSpec | str) -> dict[str, ShardManifest]:
    """Committed shards of an output directory (a spec or a path/URI): shard name -> manifest."""
    uri = spec if isinstance(spec, str) else spec.output.path
    fs, root = resolve(uri)
    out = {}
    for e in _list_dir(fs, root):
        if e.type == pafs.FileType.File and e.base_name.endswith(MANIFEST_SUFFIX) and not e.base_name.startswith("."):
            name = e.base_name[: -len(MANIFEST_SUFFIX)]
            out[name] = ShardManifest.from_json(_read_json(fs, e.path))
    return dict(sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].stop, kv[0])))


def read_output(path: str) -> pa.Table:
    """All committed shards of an output directory, in row order (uncommitted files are ignored).

    Raises ValueError if two committed shards overlap (which would duplicate rows).
    """
    fs, root = resolve(path)
    manifests = committed(path)
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
