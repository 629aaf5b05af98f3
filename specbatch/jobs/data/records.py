"""The output's records: one row per (prompt, sample), and one manifest per committed shard.

:class:`OutputRecord` is the single source of the output's fixed columns, their order and their
Arrow types (:func:`output_schema`); :class:`ShardManifest` is what a committed shard records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow as pa

from specbatch.jobs.data.inputs import InputInfo, _layout
from specbatch.jobs.data.location import InputError, _one_line
from specbatch.engine.request import DRAFT_COUNTERS, FINISH_REASONS, DraftCounts, SampleOutput
from specbatch.jobs.spec import OUTPUT_COLUMNS, SamplingSpec

if TYPE_CHECKING:
    from specbatch.jobs.spec import InputSpec


def _column(arrow_type: pa.DataType | None, nullable: bool = True) -> Any:
    """A fixed output column: its Arrow type (None: the prompt's, which follows the input) and nullability."""
    return dataclasses.field(metadata={"arrow": arrow_type, "nullable": nullable})


@dataclass
class OutputRecord:
    """One output row: one (prompt, sample) (docs/design.md section 6). The field order is the column order.

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
            cumulative_logprob=float(out.cumulative_logprob), **out.counts.columns(),
            error=None if out.error is None else _one_line(out.error), extra=extra,
        )

    @classmethod
    def of_error(cls, row_id: str, prompt: Any, sample_index: int, error: str, extra: dict[str, Any]) -> "OutputRecord":
        """The record of a (prompt, sample) that could not be generated."""
        return cls(
            id=row_id, sample_index=sample_index, prompt=prompt, completion="", completion_token_ids=[],
            num_prompt_tokens=0, num_tokens=0, finish_reason="error", stop_reason=None, cumulative_logprob=0.0,
            **DraftCounts().columns(), error=_one_line(error), extra=extra,
        )


_FIXED = tuple(f for f in dataclasses.fields(OutputRecord) if "arrow" in f.metadata)
if tuple(f.name for f in _FIXED) != OUTPUT_COLUMNS:  # before pass-through and sweep columns
    raise AssertionError(f"OutputRecord's columns {[f.name for f in _FIXED]} differ from spec.OUTPUT_COLUMNS {OUTPUT_COLUMNS}")
if not set(DRAFT_COUNTERS) <= set(OUTPUT_COLUMNS):  # the counters are flat columns of the file
    raise AssertionError(f"OutputRecord lacks the draft counters {DRAFT_COUNTERS}")
_SWEEP_TYPES = {float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
CHAT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def output_schema(
    inp: InputSpec, fingerprint: str, sweep: Mapping[str, Sequence[Any]] | None = None, info: InputInfo | None = None
) -> pa.Schema:
    """The explicit Arrow schema of every output shard (docs/design.md section 6), in this column order:
    the fixed columns (:class:`OutputRecord`), then the passed-through input columns of `inp` (their
    input types), then the keys of `sweep` (the spec's). The spec's `fingerprint` is the schema's metadata."""
    info = info or _layout(inp)
    prompt_type = pa.string() if info.prompt_kind == "text" else CHAT_TYPE
    fields = [pa.field(f.name, f.metadata["arrow"] or prompt_type, nullable=f.metadata["nullable"]) for f in _FIXED]
    for col in inp.keep_columns:
        fields.append(info.schema.field(col).with_nullable(True))
    sampling_fields = SamplingSpec.model_fields
    for key in sweep or {}:
        fields.append(pa.field(key, _SWEEP_TYPES[sampling_fields[key].annotation], nullable=False))
    return pa.schema(fields, metadata={"specbatch.fingerprint": fingerprint})


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


@dataclass(frozen=True)
class ShardFile:
    """A shard file as written: its path or URI, its size in bytes and the sha256 of its bytes."""

    path: str
    size: int
    sha256: str


class ManifestError(ValueError):
    """A manifest that cannot be read: treated as uncommitted. (One of a newer version raises
    InputError instead: it is never uncommitted, which would delete it.)"""


@dataclass
class ShardManifest:
    """A committed shard: its rows, counts and statistics, and the file that holds them.

    The worker fills everything but the commit fields (``fingerprint``, ``committed_at``), which
    :func:`write_manifest` sets. ``rows`` counts prompts, ``samples`` output rows (records: the
    file's row count); ``failed`` marks a shard whose attempts kept failing (its rows carry the
    error; a rerun tries them again), ``errors`` counts records with an error either way.
    ``file_bytes`` and ``file_sha256`` identify the file's bytes, so a resume can tell a file that
    changed after its commit (truncated, rewritten, lost) from the one committed; manifests of
    the first version have neither.
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
    file_bytes: int | None = None
    file_sha256: str | None = None
    fingerprint: str | None = None
    committed_at: str | None = None
    version: int = MANIFEST_VERSION

    @classmethod
    def of_records(cls, shard: Any, rows: int, records: Sequence[OutputRecord], written: ShardFile,
                   **fields: Any) -> "ShardManifest":
        """The manifest of a shard's records, written as `written`; `fields` sets the rest."""
        reasons: dict[str, int] = {}
        for r in records:
            reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
        errors = [r for r in records if r.error is not None]
        return cls(
            shard=shard.name, start=shard.start, stop=shard.stop, rows=rows, samples=len(records),
            tokens=sum(r.num_tokens for r in records), prompt_tokens=sum(r.num_prompt_tokens for r in records),
            **DraftCounts.total(DraftCounts.of(r) for r in records).columns(),
            finish_reasons=reasons, errors=len(errors), error_ids=sorted({str(r.id) for r in errors})[:20],
            first_error=errors[0].error if errors else None, path=written.path, file_bytes=written.size,
            file_sha256=written.sha256, **fields,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "ShardManifest":
        """Read a manifest's JSON (this version or the first, which had no version key)."""
        if not isinstance(d, dict):
            raise ManifestError("not a JSON object")
        if isinstance(d.get("version"), int) and d["version"] > MANIFEST_VERSION:
            raise InputError(f"manifest version {d['version']} was written by a newer specbatch (this one reads {MANIFEST_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            m = cls(**{k: v for k, v in d.items() if k in known})
            m.start, m.stop = int(m.start), int(m.stop)
        except (TypeError, ValueError) as e:
            raise ManifestError(_one_line(e)) from None
        m.file = m.file or m.shard + ".parquet"
        return m


if not set(DRAFT_COUNTERS) <= {f.name for f in dataclasses.fields(ShardManifest)}:  # flat keys of the manifest
    raise AssertionError(f"ShardManifest lacks the draft counters {DRAFT_COUNTERS}")
