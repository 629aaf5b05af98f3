"""Shard planning: the input's rows cut into shards, once, recorded in the output directory.

A **shard** is a contiguous range ``[start, stop)`` of the stable row order, named ``part-NNNNN``.
Shards follow row groups (small groups are packed together up to ``resources.shard_rows`` rows,
large ones are cut into near-equal pieces) and are planned once into the output directory's plan
file (:data:`~specbatch.jobs.data.layout.PLAN_FILE`), so a rerun sees the same shards. A shard split to
isolate failing rows has children ``part-NNNNN.1`` and ``part-NNNNN.2`` (:func:`split_shard`, halves).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from specbatch.jobs.data.files import _exists, _read_json, _write_bytes_atomic
from specbatch.jobs.data.inputs import InputInfo, RowGroup, _layout
from specbatch.jobs.data.layout import META_DIR, PLAN_FILE
from specbatch.jobs.data.location import InputError, _join, output_uri, resolve

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec


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


def plan_shards(spec: JobSpec, info: InputInfo | None = None) -> list[Shard]:
    """The job's shards: those recorded in the output's plan file if present (checked against
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
    fs.create_dir(_join(root, META_DIR), recursive=True)
    _write_bytes_atomic(fs, plan_path, (json.dumps(plan, indent=1) + "\n").encode("utf-8"))
    return shards


def split_shard(shard: Shard) -> list[Shard]:
    """Halves of a shard, named ``<name>.1`` and ``<name>.2``; a one-row shard cannot be split."""
    if shard.num_rows < 2:
        raise ValueError(f"{shard.name}: a shard of {shard.num_rows} row cannot be split")
    mid = (shard.start + shard.stop) // 2
    return [Shard(f"{shard.name}.1", shard.start, mid), Shard(f"{shard.name}.2", mid, shard.stop)]
