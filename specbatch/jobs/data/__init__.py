"""Job data: the prompt dataset, shard plans, the output's records, and the output directory.

One module per concept:

* :mod:`~specbatch.jobs.data.location`: paths and URIs through ``pyarrow.fs`` (``resolve``, ``output_uri``);
* :mod:`~specbatch.jobs.data.layout`: where things live in an output directory;
* :mod:`~specbatch.jobs.data.files`: atomic writes, listings and JSON documents;
* :mod:`~specbatch.jobs.data.inputs`: finding, checking and reading the prompt dataset (stable row order);
* :mod:`~specbatch.jobs.data.identity`: an input file's identity (size, time, footer hash), recorded in the plan;
* :mod:`~specbatch.jobs.data.planning`: shards, planned once into the output directory, and their halves;
* :mod:`~specbatch.jobs.data.records`: the output row (:class:`OutputRecord`, the output schema) and the
  shard manifest (:class:`ShardManifest`);
* :mod:`~specbatch.jobs.data.commits`: manifests (the commit markers), their verification, and the
  rule of resume (:func:`pending_shards`);
* :mod:`~specbatch.jobs.data.output`: whether a spec may write the output directory, preparing it,
  writing shard files, reading the output back.

Functions take the parts of the job spec they use: the input block (``InputSpec``), the output block
(``OutputSpec``), ``resources.shard_rows``, the spec's fingerprint and sweep (and, for the spec file,
the spec as plain JSON); never a ``JobSpec``.

Everything is importable from ``specbatch.jobs.data`` itself.
"""

from __future__ import annotations

from specbatch.jobs.data.commits import (
    committed,
    pending_shards,
    remove_uncommitted,
    uncommit_unverified,
    verify_shard,
    write_manifest,
)
from specbatch.jobs.data.files import OutputIOError, _is_object_store, write_json
from specbatch.jobs.data.inputs import InputInfo, RowGroup, check_input, list_input_files, read_rows
from specbatch.jobs.data.location import InputError, is_local, output_uri, resolve
from specbatch.jobs.data.layout import (
    MANIFEST_DIR,
    META_DIR,
    PLAN_FILE,
    SPEC_FILE,
    STATS_FILE,
    SUCCESS_FILE,
    manifest_name,
)
from specbatch.jobs.data.output import check_existing_output, prepare_output, read_output, write_shard
from specbatch.jobs.data.identity import FileIdentity, file_identity
from specbatch.jobs.data.planning import (
    Shard,
    check_plan,
    check_shard_input,
    plan_rows,
    plan_shards,
    read_plan,
    split_shard,
)
from specbatch.jobs.data.records import (
    CHAT_TYPE,
    OUTPUT_COLUMNS,
    ManifestError,
    OutputRecord,
    ShardFile,
    ShardManifest,
    output_schema,
)

__all__ = [
    "CHAT_TYPE", "MANIFEST_DIR", "META_DIR", "OUTPUT_COLUMNS", "PLAN_FILE", "SPEC_FILE", "STATS_FILE", "SUCCESS_FILE",
    "InputError", "OutputIOError",
    "InputInfo", "ManifestError", "OutputRecord", "RowGroup", "Shard", "ShardFile", "ShardManifest",
    "FileIdentity", "check_existing_output", "check_input", "check_plan", "check_shard_input", "file_identity",
    "read_plan",
    "committed", "is_local", "list_input_files", "output_schema", "output_uri", "pending_shards", "plan_rows",
    "plan_shards", "prepare_output", "read_output", "read_rows", "remove_uncommitted", "resolve", "split_shard",
    "manifest_name", "uncommit_unverified", "verify_shard", "write_json", "write_manifest", "write_shard",
]
