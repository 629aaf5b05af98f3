"""Job data: reading the prompt dataset, planning shards, writing and committing output shards.

Terms (DESIGN section 6):

* **stable row order**: input files sorted by path, then their row groups, then rows. A prompt's
  *row index* is its position in that order; it is the prompt's id when the input has no id column.
* **shard**: a contiguous range ``[start, stop)`` of the stable row order, named ``part-NNNNN``.
  Shards follow row groups (small groups are packed together up to ``resources.shard_rows`` rows,
  large ones are cut into near-equal pieces) and are planned once into ``_plan.json`` in the output
  directory, so a rerun sees the same shards. A shard split to isolate failing rows has children
  ``part-NNNNN.1`` and ``part-NNNNN.2`` (:func:`split_shard`, halves).
* **commit**: a shard's file ``part-NNNNN.parquet`` is written completely under a temporary name and
  renamed (on object stores, written to its fixed key, which appears whole); only then is its
  manifest ``part-NNNNN.manifest.json`` written. A shard is *committed* when its manifest exists;
  readers see only committed shards.
* ``_spec.json`` records the fingerprint of the spec that writes the directory; ``resume``
  refuses a directory written by a different spec.

Every path goes through ``pyarrow.fs`` (``FileSystem.from_uri``), so local paths, ``file://``,
``s3://`` and ``gs://`` all work the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.request import FINISH_REASONS, SampleOutput

if TYPE_CHECKING:  # the job spec imports OUTPUT_COLUMNS from here: no import cycle at run time
    from specbatch.spec import JobSpec

PLAN_FILE = "_plan.json"
SPEC_FILE = "_spec.json"
SUCCESS_FILE = "_SUCCESS"
MANIFEST_SUFFIX = ".manifest.json"
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
PLAN_VERSION = 1
_GLOB_CHARS = "*?["
_OBJECT_STORES = ("s3", "gcs")


class InputError(ValueError):
    """A problem with the input dataset or the output directory. ``str(e)`` is one line naming the file, column or row."""


@dataclass(frozen=True)
class Shard:
    """A range [start, stop) of the stable row order; ``name`` is also its file's stem."""

    name: str
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group placed in the stable row order."""

    file_index: int
    index: int  # row group index inside its file
    start: int  # its first row's global row index
    num_rows: int


@dataclass(frozen=True)
class InputInfo:
    """What :func:`check_input` found. Paths are filesystem paths (without the scheme)."""

    uri: str
    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    row_groups: tuple[RowGroup, ...]
    num_rows: int
    prompt_kind: str  # "text" | "chat"
    id_column: str | None  # resolved: None means ids are row indices
    columns: tuple[str, ...]  # columns read from the input (prompt, id, keep_columns)
    schema: pa.Schema  # the input schema of those columns (from the first file)


# --------------------------------------------------------------------------------------------
# Filesystems


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


def _is_object_store(fs: pafs.FileSystem) -> bool:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in _OBJECT_STORES


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write data so that `path` is never seen partial: temp name + rename, or one object PUT."""
    if _is_object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = _temp_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


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


def output_uri(spec: JobSpec, name: str) -> str:
    """The path or URI of a file `name` in the job's output directory."""
    return _join(spec.output.path, name)


# --------------------------------------------------------------------------------------------
# Input


def _split_glob(uri: str) -> tuple[str, str] | None:
    """'dir/sub/*.parquet' -> ('dir/sub', '*.parquet'); None when uri has no glob characters."""
    if not any(c in uri for c in _GLOB_CHARS):
        return None
    cut = min(uri.index(c) for c in _GLOB_CHARS if c in uri)
    head = uri[:cut].rpartition("/")[0]
    return (head, uri[len(head) + 1 :]) if head else (".", uri)


def _input_fs(uri: str) -> pafs.FileSystem:
    split = _split_glob(uri)
    return resolve(split[0] if split else uri)[0]


def list_input_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The input's Parquet files in stable (sorted) order: a file, a directory or a glob."""
    split = _split_glob(uri)
    if split is not None:
        base_uri, pattern = split
        fs, base = resolve(base_uri)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputError(f"input.path: no such directory: {base_uri}")
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(
            i.path for i in found
            if i.type == pafs.FileType.File and _glob_match(i.path[len(base.rstrip("/")) + 1 :].split("/"), pattern.split("/"))
        )
        if not files:
            raise InputError(f"input.path: no files match {uri}")
        return fs, files
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path: no such file or directory: {uri}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path for i in found
        if i.type == pafs.FileType.File
        and i.base_name.lower().endswith(PARQUET_SUFFIXES)
        and not any(part.startswith((".", "_")) for part in i.path[len(path.rstrip("/")) + 1 :].split("/"))
    )
    if not files:
        raise InputError(f"input.path: no Parquet files (*.parquet) in directory {uri}")
    return fs, files


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Shell-style match segment by segment: '*' stays inside one path segment, '**' spans any number."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _display(uri: str, path: str) -> str:
    """A filesystem path shown the way the user named the input: with its scheme (s3://...)."""
    return uri.split("://", 1)[0] + "://" + path if "://" in uri else path


def _open_parquet(fs: pafs.FileSystem, path: str, shown: str | None = None) -> pq.ParquetFile:
    shown = shown or path
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        if "magic" in str(e).lower() or "parquet" in str(e).lower() or "size" in str(e).lower():
            raise InputError(f"{shown}: not a Parquet file") from None
        raise InputError(f"{shown}: cannot read: {_one_line(e)}") from None


def _prompt_kind(t: pa.DataType) -> str | None:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = t.value_type
        if pa.types.is_struct(item):
            names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
            if all(k in names and (pa.types.is_string(names[k]) or pa.types.is_large_string(names[k])) for k in ("role", "content")):
                return "chat"
    return None


def _missing_column(path: str, field: str, column: str, names: Sequence[str]) -> InputError:
    close = difflib.get_close_matches(column, list(names), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (columns: {', '.join(names)})"
    return InputError(f"{path}: {field} {column!r} not found{hint}")


def _scan(spec: JobSpec) -> InputInfo:
    """List the input files and read their footers: layout, schema and column checks (no data)."""
    inp = spec.input
    fs, files = list_input_files(inp.path)
    id_column: str | None = None
    prompt_kind: str | None = None
    schema: pa.Schema | None = None
    file_rows: list[int] = []
    groups: list[RowGroup] = []
    start = 0
    for fi, path in enumerate(files):
        shown = _display(inp.path, path)
        pf = _open_parquet(fs, path, shown)
        arrow_schema = pf.schema_arrow
        names = arrow_schema.names
        if fi == 0:
            if inp.id_column == "auto":
                id_column = "id" if "id" in names else None
            else:
                id_column = inp.id_column
        if inp.prompt_column not in names:
            raise _missing_column(shown, "input.prompt_column", inp.prompt_column, names)
        kind = _prompt_kind(arrow_schema.field(inp.prompt_column).type)
        if kind is None:
            raise InputError(
                f"{shown}: column {inp.prompt_column!r} has type {arrow_schema.field(inp.prompt_column).type}, "
                "expected string or list<struct<role: string, content: string>>"
            )
        if prompt_kind is not None and kind != prompt_kind:
            raise InputError(f"{shown}: column {inp.prompt_column!r} holds {kind} prompts, earlier files hold {prompt_kind}")
        prompt_kind = kind
        if id_column is not None:
            if id_column not in names:
                raise _missing_column(shown, "input.id_column", id_column, names)
            t = arrow_schema.field(id_column).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
                raise InputError(f"{shown}: id column {id_column!r} has type {t}, expected string or integer")
        for col in inp.keep_columns:
            if col not in names:
                raise _missing_column(shown, "input.keep_columns entry", col, names)
        columns = [inp.prompt_column] + ([id_column] if id_column else []) + [c for c in inp.keep_columns if c != id_column]
        this = pa.schema([arrow_schema.field(c) for c in columns])
        if schema is None:
            schema = this
        else:
            for col in inp.keep_columns:
                if not this.field(col).type.equals(schema.field(col).type):
                    raise InputError(f"{shown}: column {col!r} has type {this.field(col).type}, earlier files have {schema.field(col).type}")
        md = pf.metadata
        rows = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            groups.append(RowGroup(fi, g, start + rows, n))
            rows += n
        file_rows.append(rows)
        start += rows
    assert schema is not None and prompt_kind is not None
    return InputInfo(
        uri=inp.path,
        files=tuple(files),
        file_rows=tuple(file_rows),
        row_groups=tuple(groups),
        num_rows=start,
        prompt_kind=prompt_kind,
        id_column=id_column,
        columns=tuple(schema.names),
        schema=schema,
    )


def check_input(spec: JobSpec) -> InputInfo:
    """Check the input before anything starts: it exists, is Parquet, has the columns, has rows,
    and its ids are unique and non-null. Reads footers and the id column only; writes nothing."""
    _check_output_outside_input(spec)
    info = _scan(spec)
    if info.num_rows == 0:
        raise InputError(f"input.path: {spec.input.path} has no rows")
    if info.id_column is not None:
        _check_ids(spec, info)
    _LAYOUT_CACHE[_cache_key(spec)] = (_stamp(spec), info)
    return info


def _check_output_outside_input(spec: JobSpec) -> None:
    """An output directory inside an input directory would be read back as input on a rerun."""
    split = _split_glob(spec.input.path)
    in_fs, in_path = resolve(split[0] if split else spec.input.path)
    out_fs, out_path = resolve(spec.output.path)
    if in_fs.type_name != out_fs.type_name:
        return
    if split is None and in_fs.get_file_info(in_path).type != pafs.FileType.Directory:
        return
    base = in_path.rstrip("/")
    if out_path.rstrip("/") == base or out_path.startswith(base + "/"):
        raise InputError(f"output.path: {spec.output.path} is inside the input directory {spec.input.path}; write it elsewhere")


def _check_ids(spec: JobSpec, info: InputInfo) -> None:
    import pyarrow.compute as pc

    fs = _input_fs(spec.input.path)
    seen: dict[str, int] = {}  # id -> its global row index
    for fi, path in enumerate(info.files):
        shown = _display(spec.input.path, path)
        pf = _open_parquet(fs, path, shown)
        col = pf.read(columns=[info.id_column]).column(0)
        offset = sum(info.file_rows[:fi])
        nulls = col.null_count
        if nulls:
            row = pc.index(pc.is_null(col), True).as_py()
            raise InputError(f"{shown}: id column {info.id_column!r} is null at row {offset + row}")
        for i, value in enumerate(col.to_pylist()):
            key = str(value)
            if key in seen:
                raise InputError(
                    f"{shown}: duplicate id {key!r} in column {info.id_column!r} (rows {seen[key]} and {offset + i})"
                )
            seen[key] = offset + i


# read_rows runs once per shard in long-lived actors: keep each input's layout, keyed by the
# spec's input block and revalidated against the files' sizes and modification times.
_LAYOUT_CACHE: dict[tuple, tuple[tuple, InputInfo]] = {}


def _cache_key(spec: JobSpec) -> tuple:
    inp = spec.input
    return (inp.path, inp.prompt_column, inp.id_column, tuple(inp.keep_columns))


def _stamp(spec: JobSpec) -> tuple:
    """The input files' (path, size, mtime): a changed input invalidates the cached layout."""
    fs, files = list_input_files(spec.input.path)
    infos = fs.get_file_info(files)
    return tuple((i.path, i.size, i.mtime_ns) for i in infos)


def _layout(spec: JobSpec) -> InputInfo:
    key = _cache_key(spec)
    stamp = _stamp(spec)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    info = _scan(spec)
    _LAYOUT_CACHE[key] = (stamp, info)
    return info


def read_rows(spec: JobSpec, shard: Shard) -> list[dict[str, Any]]:
    """The shard's prompts in stable order: ``{"id": str, "prompt": str | [{"role", "content"}], <keep_columns>}``.

    A row whose prompt is unusable (null, empty, malformed chat messages) comes back as
    ``{"id", "prompt" (as read, or None), <keep_columns>, "error": "<one line>"}`` instead of raising.
    """
    info = _layout(spec)
    if not (0 <= shard.start <= shard.stop <= info.num_rows):
        raise InputError(f"{shard.name}: rows [{shard.start}, {shard.stop}) outside the input's {info.num_rows} rows")
    table = _read_range(spec, info, shard.start, shard.stop)
    prompts = table.column(spec.input.prompt_column).to_pylist()
    ids = table.column(info.id_column).to_pylist() if info.id_column else None
    keep = {c: table.column(c).to_pylist() for c in spec.input.keep_columns}
    rows = []
    for i, raw in enumerate(prompts):
        index = shard.start + i
        rid = str(ids[i]) if ids is not None else str(index)
        prompt, error = _normalize_prompt(raw, info.prompt_kind)
        row: dict[str, Any] = {"id": rid, "prompt": prompt}
        row.update({c: keep[c][i] for c in spec.input.keep_columns})
        if error is not None:
            row["error"] = f"row {index} (id {rid!r}): {error}"
        rows.append(row)
    return rows


def _read_range(spec: JobSpec, info: InputInfo, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the stable order, only the columns the job reads."""
    fs = _input_fs(spec.input.path)
    pieces = []
    by_file: dict[int, list[RowGroup]] = {}
    for g in info.row_groups:
        if g.start < stop and g.start + g.num_rows > start and g.num_rows:
            by_file.setdefault(g.file_index, []).append(g)
    for fi, groups in sorted(by_file.items()):
        pf = _open_parquet(fs, info.files[fi])
        t = pf.read_row_groups([g.index for g in groups], columns=list(info.columns))
        first = groups[0].start
        lo = max(start, first) - first
        hi = min(stop, groups[-1].start + groups[-1].num_rows) - first
        pieces.append(t.slice(lo, hi - lo).cast(info.schema))
    if not pieces:
        return info.schema.empty_table()
    return pa.concat_tables(pieces)


def _normalize_prompt(raw: Any, kind: str) -> tuple[Any, str | None]:
    """(prompt for the engine, None) or (prompt as read or None, error)."""
    if raw is None:
        return None, "prompt is null"
    if kind == "text":
        if not raw.strip():
            return raw, "prompt is empty"
        return raw, None
    if not raw:
        return [], "prompt has no chat messages"
    messages = []
    for j, m in enumerate(raw):
        if m is None:
            return None, f"chat message {j} is null"
        role, content = m.get("role"), m.get("content")
        if not role:
            return None, f"chat message {j} has no role"
        if content is None:
            return None, f"chat message {j} has no content"
        messages.append({"role": role, "content": content})
    return messages, None


# --------------------------------------------------------------------------------------------
# Planning


def plan_rows(row_groups: Iterable[RowGroup], shard_rows: int) -> list[Shard]:
    """Pack consecutive row groups into shards of at most shard_rows rows; cut larger groups
    into near-equal pieces. Depends only on the row-group sizes and shard_rows."""
    shards: list[tuple[int, int]] = []
    cur_start, cur_stop = None, None
    for g in row_groups:
        if g.num_rows == 0:
            continue
        if g.num_rows > shard_rows:
            if cur_start is not None:
                shards.append((cur_start, cur_stop))
                cur_start = None
            k = math.ceil(g.num_rows / shard_rows)
            base, extra = divmod(g.num_rows, k)
            s = g.start
            for i in range(k):
                size = base + (1 if i < extra else 0)
                shards.append((s, s + size))
                s += size
            continue
        if cur_start is not None and (g.start + g.num_rows - cur_start) > shard_rows:
            shards.append((cur_start, cur_stop))
            cur_start = None
        if cur_start is None:
            cur_start = g.start
        cur_stop = g.start + g.num_rows
    if cur_start is not None:
        shards.append((cur_start, cur_stop))
    return [Shard(f"part-{i:05d}", a, b) for i, (a, b) in enumerate(shards)]


def plan_shards(spec: JobSpec, info: InputInfo | None = None) -> list[Shard]:
    """The job's shards: those recorded in the output's _plan.json if present (checked against
    the input), else planned from the row groups and recorded there."""
    info = info or _layout(spec)
    fs, root = resolve(spec.output.path)
    plan_path = _join(root, PLAN_FILE)
    if _exists(fs, plan_path):
        plan = _read_json(fs, plan_path)
        if plan.get("version") != PLAN_VERSION:
            raise InputError(f"{output_uri(spec, PLAN_FILE)}: unknown plan version {plan.get('version')!r}")
        if plan.get("num_rows") != info.num_rows or plan.get("file_rows") != list(info.file_rows):
            raise InputError(
                f"{output_uri(spec, PLAN_FILE)}: planned for an input of {plan.get('num_rows')} rows in "
                f"{len(plan.get('file_rows', []))} files, the input now has {info.num_rows} rows in {len(info.files)} files; "
                "use output.if_exists: overwrite"
            )
        return [Shard(s["name"], int(s["start"]), int(s["stop"])) for s in plan["shards"]]
    shards = plan_rows(info.row_groups, spec.resources.shard_rows)
    plan = {
        "version": PLAN_VERSION,
        "input": spec.input.path,
        "files": list(info.files),
        "file_rows": list(info.file_rows),
        "num_rows": info.num_rows,
        "shard_rows": spec.resources.shard_rows,
        "shards": [s.to_dict() for s in shards],
    }
    fs.create_dir(root, recursive=True)
    _write_bytes_atomic(fs, plan_path, (json.dumps(plan, indent=1) + "\n").encode("utf-8"))
    return shards


def split_shard(shard: Shard) -> list[Shard]:
    """Halves of a shard, named ``<name>.1`` and ``<name>.2``; a one-row shard cannot be split."""
    if shard.num_rows < 2:
        raise ValueError(f"{shard.name}: a shard of {shard.num_rows} row cannot be split")
    mid = (shard.start + shard.stop) // 2
    return [Shard(f"{shard.name}.1", shard.start, mid), Shard(f"{shard.name}.2", mid, shard.stop)]


def pending_shards(spec: JobSpec, plan: Sequence[Shard] | None = None) -> list[Shard]:
    """Planned rows not yet committed, as shards: a planned shard with no committed rows comes
    back whole; one partly covered by committed split children comes back as the uncovered
    halves (named as :func:`split_shard` names them)."""
    plan = list(plan) if plan is not None else plan_shards(spec)
    done = sorted((m.start, m.stop) for m in committed(spec).values())

    def overlap(s: Shard) -> int:
        return sum(max(0, min(b, s.stop) - max(a, s.start)) for a, b in done)

    out: list[Shard] = []

    def cover(s: Shard) -> None:
        covered = overlap(s)
        if covered >= s.num_rows:
            return
        if covered == 0:
            out.append(s)
            return
        for half in split_shard(s):
            cover(half)

    for s in plan:
        cover(s)
    return out


# --------------------------------------------------------------------------------------------
# Output


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


# --------------------------------------------------------------------------------------------
# Records: the output row and the shard manifest


def _column(arrow_type: pa.DataType | None, nullable: bool = True) -> Any:
    """A fixed output column: its Arrow type (None: the prompt's, which follows the input) and nullability."""
    return dataclasses.field(metadata={"arrow": arrow_type, "nullable": nullable})


@dataclass
class OutputRecord:
    """One output row: one (prompt, sample) (DESIGN section 6). The field order is the column order.

    ``extra`` holds the row's other columns by name: the passed-through input columns
    (``input.keep_columns``), then the sweep keys of its sweep point.
    """

    id: str = _column(pa.string(), nullable=False)
    sample_index: int = _column(pa.int64(), nullable=False)
    prompt: Any = _column(None)  # text, or chat messages [{"role", "content"}]
    completion: str | None = _column(pa.string())
    completion_token_ids: list[int] | None = _column(pa.list_(pa.int32()))
    num_prompt_tokens: int = _column(pa.int64())
    num_tokens: int = _column(pa.int64())
    finish_reason: str = _column(pa.string(), nullable=False)  # eos | stop | length | error
    stop_reason: str | None = _column(pa.string())
    cumulative_logprob: float = _column(pa.float64())
    draft_proposed: int = _column(pa.int64())
    draft_tested: int = _column(pa.int64())
    draft_accepted: int = _column(pa.int64())
    target_passes: int = _column(pa.int64())
    error: str | None = _column(pa.string())  # one line; None when the sample is fine
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id is None or self.sample_index is None:
            raise ValueError("an output record needs an id and a sample_index")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")

    @classmethod
    def of_sample(cls, row_id: str, prompt: Any, out: SampleOutput, extra: dict[str, Any]) -> "OutputRecord":
        """The record of one generated sample."""
        return cls(
            id=row_id, sample_index=out.sample_index, prompt=prompt, completion=out.text,
            completion_token_ids=list(out.token_ids), num_prompt_tokens=out.num_prompt_tokens,
            num_tokens=out.num_tokens, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            cumulative_logprob=float(out.cumulative_logprob), draft_proposed=out.draft_proposed,
            draft_tested=out.draft_tested, draft_accepted=out.draft_accepted, target_passes=out.target_passes,
            error=None if out.error is None else _one_line(out.error), extra=extra,
        )

    @classmethod
    def of_error(cls, row_id: str, prompt: Any, sample_index: int, error: str, extra: dict[str, Any]) -> "OutputRecord":
        """The record of a (prompt, sample) that could not be generated."""
        return cls(
            id=row_id, sample_index=sample_index, prompt=prompt, completion="", completion_token_ids=[],
            num_prompt_tokens=0, num_tokens=0, finish_reason="error", stop_reason=None, cumulative_logprob=0.0,
            draft_proposed=0, draft_tested=0, draft_accepted=0, target_passes=0, error=_one_line(error), extra=extra,
        )


_FIXED = tuple(f for f in dataclasses.fields(OutputRecord) if "arrow" in f.metadata)
OUTPUT_COLUMNS = tuple(f.name for f in _FIXED)  # before pass-through and sweep columns
_SWEEP_TYPES = {float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
CHAT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def output_schema(spec: JobSpec, info: InputInfo | None = None) -> pa.Schema:
    """The explicit Arrow schema of every output shard (DESIGN section 6), in this column order:
    the fixed columns (:class:`OutputRecord`), then the passed-through input columns (their input
    types), then sweep keys."""
    info = info or _layout(spec)
    prompt_type = pa.string() if info.prompt_kind == "text" else CHAT_TYPE
    fields = [pa.field(f.name, f.metadata["arrow"] or prompt_type, nullable=f.metadata["nullable"]) for f in _FIXED]
    for col in spec.input.keep_columns:
        fields.append(info.schema.field(col).with_nullable(True))
    sampling_fields = type(spec.sampling).model_fields
    for key in spec.sweep or {}:
        fields.append(pa.field(key, _SWEEP_TYPES[sampling_fields[key].annotation], nullable=False))
    return pa.schema(fields, metadata={"specbatch.fingerprint": spec.fingerprint()})


def records_table(records: Sequence[OutputRecord], schema: pa.Schema, where: str) -> pa.Table:
    """The records as one Arrow table of `schema`; `where` names the shard in errors."""
    names = set(schema.names)
    columns: dict[str, list[Any]] = {f.name: [getattr(r, f.name) for r in records] for f in _FIXED}
    for name in schema.names[len(_FIXED):]:
        columns[name] = [r.extra.get(name) for r in records]
    for r in records:
        unknown = set(r.extra) - names
        if unknown:
            raise ValueError(f"{where}: record has unknown column(s) {sorted(unknown)}")
    return pa.table(columns, schema=schema)


MANIFEST_VERSION = 2


class ManifestError(ValueError):
    """A manifest that cannot be read: treated as uncommitted."""


@dataclass
class ShardManifest:
    """A committed shard: its rows, counts and statistics, and the file that holds them.

    The worker fills everything but the commit fields (``fingerprint``, ``committed_at``), which
    :func:`write_manifest` sets. ``rows`` counts prompts, ``samples`` output rows (records);
    ``failed`` marks a shard whose attempts kept failing (its rows carry the error; a rerun
    tries them again), ``errors`` counts records with an error either way.
    """

    shard: str
    start: int
    stop: int
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    draft_proposed: int = 0
    draft_tested: int = 0
    draft_accepted: int = 0
    target_passes: int = 0
    finish_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: int = 0
    error_ids: list[str] = dataclasses.field(default_factory=list)  # the first 20, sorted
    first_error: str | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # AcceptanceStats.to_dict(); {} when failed
    actor: str | None = None
    attempt: int = 1
    started_at: float = 0.0
    finished_at: float = 0.0
    elapsed_s: float = 0.0
    failed: bool = False
    error: str | None = None  # a failed shard's last error
    engine: dict[str, Any] | None = None  # {"cost_model", "gamma", "steps"} of the engine that ran it
    path: str | None = None  # the shard file's path or URI
    file: str | None = None  # the shard file's name in the output directory
    fingerprint: str | None = None
    committed_at: str | None = None
    version: int = MANIFEST_VERSION

    @classmethod
    def of_records(cls, shard: Any, rows: int, records: Sequence[OutputRecord], **fields: Any) -> "ShardManifest":
        """A shard's manifest with the counts of its records; `fields` sets the rest."""
        reasons: dict[str, int] = {}
        for r in records:
            reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
        errors = [r for r in records if r.error is not None]
        return cls(
            shard=shard.name, start=shard.start, stop=shard.stop, rows=rows, samples=len(records),
            tokens=sum(r.num_tokens for r in records), prompt_tokens=sum(r.num_prompt_tokens for r in records),
            draft_proposed=sum(r.draft_proposed for r in records), draft_tested=sum(r.draft_tested for r in records),
            draft_accepted=sum(r.draft_accepted for r in records), target_passes=sum(r.target_passes for r in records),
            finish_reasons=reasons, errors=len(errors), error_ids=sorted({str(r.id) for r in errors})[:20],
            first_error=errors[0].error if errors else None, **fields,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "ShardManifest":
        """Read a manifest's JSON (this version or the first, which had no version key)."""
        if not isinstance(d, dict):
            raise ManifestError("not a JSON object")
        if d.get("version", 1) > MANIFEST_VERSION:
            raise ManifestError(f"manifest version {d['version']} is newer than this specbatch reads ({MANIFEST_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            m = cls(**{k: v for k, v in d.items() if k in known})
            m.start, m.stop = int(m.start), int(m.stop)
        except (TypeError, ValueError) as e:
            raise ManifestError(_one_line(e)) from None
        m.file = m.file or m.shard + ".parquet"
        return m


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
