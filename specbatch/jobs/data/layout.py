"""Where things live in an output directory.

The directory itself holds only the shard files, ``part-NNNNN.parquet``, so that it reads as one
Parquet dataset. Everything else is in :data:`META_DIR`, a folder that dataset readers skip
(pyarrow and pandas skip names starting with ``_`` or ``.``, Hugging Face ``datasets`` only
names starting with ``__`` or ``.``)::

    part-00000.parquet ...
    __specbatch__/manifests/part-00000.json   a shard's manifest, its commit marker
    __specbatch__/plan.json                   the shard plan
    __specbatch__/spec.json                   the spec that writes the directory, its fingerprint
    __specbatch__/stats.json                  the run's statistics
    __specbatch__/_SUCCESS                    written last, when every commit verified and every row succeeded

Outputs of the first layout kept these beside the shards (:data:`LEGACY`); they are still read,
and a resume moves them here.
"""

from __future__ import annotations

META_DIR = "__specbatch__"
MANIFEST_DIR = f"{META_DIR}/manifests"
MANIFEST_SUFFIX = ".json"
PLAN_FILE = f"{META_DIR}/plan.json"
SPEC_FILE = f"{META_DIR}/spec.json"
STATS_FILE = f"{META_DIR}/stats.json"
SUCCESS_FILE = f"{META_DIR}/_SUCCESS"

# The first layout: file name beside the shards -> its place now (None: rewritten by the next run).
LEGACY_MANIFEST_SUFFIX = ".manifest.json"
LEGACY_SPEC_FILE = "_spec.json"
LEGACY_STATS_FILE = "stats.json"
LEGACY_PLAN_FILE = "_plan.json"
LEGACY = {LEGACY_PLAN_FILE: PLAN_FILE, LEGACY_SPEC_FILE: SPEC_FILE, LEGACY_STATS_FILE: None, "_SUCCESS": None}


def manifest_name(shard: str) -> str:
    """A shard's manifest, relative to the output directory."""
    return f"{MANIFEST_DIR}/{shard}{MANIFEST_SUFFIX}"
