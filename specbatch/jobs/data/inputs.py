"""The prompt dataset: finding its Parquet files, checking them, reading a shard's rows.

Terms (docs/design.md section 6): the **stable row order** is the input files sorted by path, then their
row groups, then rows. A prompt's *row index* is its position in that order; it is the prompt's
id when the input has no id column.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specbatch.jobs import storage
from specbatch.jobs.data.location import InputError, _one_line, resolve

if TYPE_CHECKING:
    from specbatch.jobs.data.planning import Shard
    from specbatch.jobs.spec import InputSpec, OutputSpec


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = "*?["


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


def _split_glob(uri: str) -> tuple[str, str] | None:
    """'dir/sub/*.parquet' -> ('dir/sub', '*.parquet'); None when uri has no glob characters.
    A URI's query options (after '?') are no glob: they stay with the directory."""
    uri, query = storage.split_query(uri)
    if not any(c in uri for c in _GLOB_CHARS):
        return None
    cut = min(uri.index(c) for c in _GLOB_CHARS if c in uri)
    head = uri[:cut].rpartition("/")[0]
    return (head + query, uri[len(head) + 1 :]) if head else (".", uri)


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
    if pa.types.is_dictionary(t):  # dictionary-encoded strings (pandas categoricals, some writers)
        t = t.value_type
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


def _scan(inp: InputSpec) -> InputInfo:
    """List the input files and read their footers: layout, schema and column checks (no data)."""
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


def check_input(inp: InputSpec, out: OutputSpec) -> InputInfo:
    """Check the input before anything starts: it exists, is Parquet, has the columns, has rows,
    and its ids are unique and non-null; the output directory `out` is not inside it. Reads
    footers and the id column only; writes nothing."""
    _check_output_outside_input(inp, out)
    info = _scan(inp)
    if info.num_rows == 0:
        raise InputError(f"input.path: {inp.path} has no rows")
    if info.id_column is not None:
        _check_ids(inp, info)
    _LAYOUT_CACHE[_cache_key(inp)] = (_stamp(inp), info)
    return info


def _check_output_outside_input(inp: InputSpec, out: OutputSpec) -> None:
    """An output directory inside an input directory would be read back as input on a rerun.

    For a glob, only an output directory that files matching the glob could lie in is refused
    (``data/*.parquet`` refuses ``data`` itself, ``data/**/*.parquet`` anything below it; neither
    refuses ``data/out`` or ``data_out``)."""
    if storage.scheme(inp.path) != storage.scheme(out.path):
        return  # different stores: the output's is not opened here (it may not be reachable from this machine)
    split = _split_glob(inp.path)
    in_fs, in_path = resolve(split[0] if split else inp.path)
    out_fs, out_path = resolve(out.path)
    if in_fs.type_name != out_fs.type_name:
        return
    if split is None and in_fs.get_file_info(in_path).type != pafs.FileType.Directory:
        return
    base, out_dir = in_path.rstrip("/"), out_path.rstrip("/")
    if out_dir != base and not out_dir.startswith(base + "/"):
        return
    if split is not None:
        below = [p for p in out_dir[len(base):].split("/") if p]
        if not _may_hold_matches(below, split[1].split("/")):
            return
    raise InputError(f"output.path: {out.path} is inside the input directory {inp.path}; write it elsewhere")


def _may_hold_matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether a file below the directory `parts` (segments under the glob's base) can match `pattern`."""
    if not pattern:
        return False  # the pattern ends above the directory: files below it are deeper than any match
    if pattern[0] == "**":
        return True
    if not parts:
        return True  # the directory itself: its files are matched by the rest of the pattern
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _may_hold_matches(parts[1:], pattern[1:])


def _check_ids(inp: InputSpec, info: InputInfo) -> None:
    fs = _input_fs(inp.path)
    seen: dict[str, int] = {}  # id -> its global row index
    for fi, path in enumerate(info.files):
        shown = _display(inp.path, path)
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
# input block and revalidated against the files' sizes and modification times.
_LAYOUT_CACHE: dict[tuple, tuple[tuple, InputInfo]] = {}


def _cache_key(inp: InputSpec) -> tuple:
    return (inp.path, inp.prompt_column, inp.id_column, tuple(inp.keep_columns))


def _stamp(inp: InputSpec) -> tuple:
    """The input files' (path, size, mtime): a changed input invalidates the cached layout."""
    fs, files = list_input_files(inp.path)
    infos = fs.get_file_info(files)
    return tuple((i.path, i.size, i.mtime_ns) for i in infos)


def _layout(inp: InputSpec) -> InputInfo:
    key = _cache_key(inp)
    stamp = _stamp(inp)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    info = _scan(inp)
    _LAYOUT_CACHE[key] = (stamp, info)
    return info


def read_rows(inp: InputSpec, shard: Shard) -> list[dict[str, Any]]:
    """The shard's prompts in stable order: ``{"id": str, "prompt": str | [{"role", "content"}], <keep_columns>}``.

    A row whose prompt is unusable (null, empty, malformed chat messages) comes back as
    ``{"id", "prompt" (as read, or None), <keep_columns>, "error": "<one line>"}`` instead of raising.
    """
    info = _layout(inp)
    if not (0 <= shard.start <= shard.stop <= info.num_rows):
        raise InputError(f"{shard.name}: rows [{shard.start}, {shard.stop}) outside the input's {info.num_rows} rows")
    table = _read_range(inp, info, shard.start, shard.stop)
    prompts = table.column(inp.prompt_column).to_pylist()
    ids = table.column(info.id_column).to_pylist() if info.id_column else None
    keep = {c: table.column(c).to_pylist() for c in inp.keep_columns}
    rows = []
    for i, raw in enumerate(prompts):
        index = shard.start + i
        rid = str(ids[i]) if ids is not None else str(index)
        prompt, error = _normalize_prompt(raw, info.prompt_kind)
        row: dict[str, Any] = {"id": rid, "prompt": prompt}
        row.update({c: keep[c][i] for c in inp.keep_columns})
        if error is not None:
            row["error"] = f"row {index} (id {rid!r}): {error}"
        rows.append(row)
    return rows


def _read_range(inp: InputSpec, info: InputInfo, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the stable order, only the columns the job reads."""
    fs = _input_fs(inp.path)
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
