"""Shard planning: the input's rows cut into shards, once, recorded in the output directory.

A **shard** is a contiguous range ``[start, stop)`` of the stable row order, named ``part-NNNNN``.
Shards follow row groups (small groups are packed together up to ``resources.shard_rows`` rows,
large ones are cut into near-equal pieces) and are planned once into the output directory's plan
file (:data:`~specbatch.jobs.data.layout.PLAN_FILE`), so a rerun sees the same shards. A shard split to
isolate failing rows has children ``part-NNNNN.1`` and ``part-NNNNN.2`` (:func:`split_shard`, halves).

The plan also records the identity of every input file (:mod:`~specbatch.jobs.data.identity`): a plan
is **stale** when the input's files, row counts or identities are not those it was planned from
(:func:`check_plan`, which the preflight runs before a resume; :func:`check_shard_input`, which
an actor runs before it reads a shard). A plan of an earlier version, without identities, is
checked on its files' row counts only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from specbatch.jobs.data.files import _exists, _read_json, _write_bytes_atomic
from specbatch.jobs.data.identity import FileIdentity, file_identity
from specbatch.jobs.data.inputs import InputInfo, RowGroup, _display, _input_fs, _layout
from specbatch.jobs.data.layout import LEGACY_PLAN_FILE, META_DIR, PLAN_FILE
from specbatch.jobs.data.location import InputError, _join, output_uri, resolve

if TYPE_CHECKING:
    from specbatch.jobs.spec import InputSpec, OutputSpec


PLAN_VERSION = 1


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


def input_identity(inp: InputSpec, info: InputInfo, files: Iterable[int] | None = None) -> list[FileIdentity]:
    """The identity of the input's files (those of the indices `files`, default all), in order."""
    fs = _input_fs(inp.path)
    chosen = range(len(info.files)) if files is None else files
    return [file_identity(fs, info.files[i], _display(inp.path, info.files[i])) for i in chosen]


def read_plan(out: OutputSpec) -> dict[str, Any] | None:
    """The plan file of the output directory `out` as recorded (this layout's or the first one's), None
    when there is none. Raises InputError (one line naming the file) when it does not read or is of an
    unknown version."""
    fs, root = resolve(out.path)
    for name in (PLAN_FILE, LEGACY_PLAN_FILE):
        path = _join(root, name)
        if not _exists(fs, path):
            continue
        try:
            plan = _read_json(fs, path)
            version = plan.get("version")
        except (ValueError, OSError, AttributeError) as e:
            raise InputError(f"{output_uri(out, name)}: does not read ({' '.join(str(e).split())[:120]}); "
                             "use output.if_exists: overwrite") from None
        if version != PLAN_VERSION:
            raise InputError(f"{output_uri(out, name)}: unknown plan version {version!r}")
        plan["_where"] = output_uri(out, name)
        return plan
    return None


def check_plan(inp: InputSpec, plan: dict[str, Any], info: InputInfo) -> None:
    """Refuse a stale plan: the input's files, their row counts and (where recorded) their
    identities must be those the plan was made from. InputError names the first file that differs."""
    where = plan["_where"]
    if plan.get("num_rows") != info.num_rows or plan.get("file_rows") != list(info.file_rows):
        raise InputError(
            f"{where}: planned for an input of {plan.get('num_rows')} rows in "
            f"{len(plan.get('file_rows', []))} files, the input now has {info.num_rows} rows in {len(info.files)} files; "
            "use output.if_exists: overwrite"
        )
    recorded = plan.get("file_identity")
    if recorded is None:
        return  # a plan of the first version records no identity
    if [r.get("path") for r in recorded] != list(info.files):
        gone = next((r["path"] for r in recorded if r.get("path") not in info.files), None)
        new = next((f for f in info.files if f not in [r.get("path") for r in recorded]), None)
        what = f"{_display(inp.path, gone)} is no longer an input file" if gone else \
            f"{_display(inp.path, new)} was not an input file"
        raise InputError(f"input.path: {what} when {where} was planned; use output.if_exists: overwrite to start over")
    _compare(inp, [FileIdentity.from_dict(r) for r in recorded], input_identity(inp, info), where)


def _compare(inp: InputSpec, recorded: list[FileIdentity], now: list[FileIdentity], where: str) -> None:
    for before, after in zip(recorded, now):
        why = before.difference(after)
        if why is not None:
            raise InputError(
                f"input.path: {_display(inp.path, after.path)} changed since {where} was planned ({why}); "
                "the output holds rows of the file as it was: use output.if_exists: overwrite to start over"
            )


def check_shard_input(inp: InputSpec, shard: Shard, plan: dict[str, Any] | None, info: InputInfo | None = None) -> None:
    """Before a shard's rows are read: the input files it reads are those of the plan (InputError if not).
    `plan` is :func:`read_plan`'s (None: nothing recorded, nothing to compare)."""
    if plan is None:
        return
    try:
        info = info or _layout(inp)
    except InputError as e:
        raise _unreadable(inp, plan, e) from None
    recorded = plan.get("file_identity")
    same_files = recorded is not None and [r.get("path") for r in recorded] == list(info.files)
    if not same_files or plan.get("file_rows") != list(info.file_rows):
        check_plan(inp, plan, info)  # raises where the plan is stale (a plan without identities: rows only)
        return
    touched = sorted({g.file_index for g in info.row_groups if g.start < shard.stop and g.start + g.num_rows > shard.start})
    try:
        now = input_identity(inp, info, touched)
    except InputError as e:
        raise _unreadable(inp, plan, e) from None
    _compare(inp, [FileIdentity.from_dict(recorded[i]) for i in touched], now, plan["_where"])


def _unreadable(inp: InputSpec, plan: dict[str, Any], error: InputError) -> InputError:
    """A planned input that no longer reads mid-run (deleted, or caught half rewritten) has changed
    since the plan: the same refusal as any other change, with the reader's words in brackets."""
    return InputError(
        f"input.path: {inp.path} changed since {plan['_where']} was planned (it no longer reads: {error}); "
        "the output holds rows of the file as it was: use output.if_exists: overwrite to start over"
    )


def plan_shards(inp: InputSpec, out: OutputSpec, shard_rows: int, info: InputInfo | None = None) -> list[Shard]:
    """The job's shards: those recorded in the plan file of the output directory `out` if present
    (checked against the input `inp`: :func:`check_plan`), else planned from the row groups in
    shards of at most `shard_rows` rows (``resources.shard_rows``) and recorded there with the
    input files' identities."""
    info = info or _layout(inp)
    fs, root = resolve(out.path)
    plan = read_plan(out)
    if plan is not None:
        check_plan(inp, plan, info)
        return [Shard(s["name"], int(s["start"]), int(s["stop"])) for s in plan["shards"]]
    shards = plan_rows(info.row_groups, shard_rows)
    plan = {
        "version": PLAN_VERSION,
        "input": inp.path,
        "files": list(info.files),
        "file_rows": list(info.file_rows),
        "file_identity": [i.to_dict() for i in input_identity(inp, info)],
        "num_rows": info.num_rows,
        "shard_rows": shard_rows,
        "shards": [s.to_dict() for s in shards],
    }
    fs.create_dir(_join(root, META_DIR), recursive=True)
    _write_bytes_atomic(fs, _join(root, PLAN_FILE), (json.dumps(plan, indent=1) + "\n").encode("utf-8"))
    return shards


def split_shard(shard: Shard) -> list[Shard]:
    """Halves of a shard, named ``<name>.1`` and ``<name>.2``; a one-row shard cannot be split."""
    if shard.num_rows < 2:
        raise ValueError(f"{shard.name}: a shard of {shard.num_rows} row cannot be split")
    mid = (shard.start + shard.stop) // 2
    return [Shard(f"{shard.name}.1", shard.start, mid), Shard(f"{shard.name}.2", mid, shard.stop)]
