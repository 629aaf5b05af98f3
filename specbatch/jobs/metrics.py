"""Live generation metrics, exported through Ray's Prometheus endpoint (``ray.util.metrics``).

Each actor publishes counters after every shard it finishes, tagged with the job name and the
actor's label:

* ``specbatch_tokens``: completion tokens emitted;
* ``specbatch_samples``: finished (prompt, sample) rows, ``specbatch_sample_errors`` of which
  carry an error;
* ``specbatch_draft_proposed`` / ``specbatch_draft_tested`` / ``specbatch_draft_accepted``:
  draft tokens offered, reaching the acceptance test, and kept (docs/design.md section 3), so that
  acceptance rate = rate(accepted) / rate(tested) in a dashboard;
* ``specbatch_target_passes``: target forward passes summed over rows.

Ray names the exported series ``ray_specbatch_tokens`` and so on.
"""

from __future__ import annotations

from typing import Any, Callable

TAG_KEYS = ("job", "actor")

COUNTERS: dict[str, str] = {
    "specbatch_tokens": "completion tokens emitted",
    "specbatch_samples": "finished (prompt, sample) rows",
    "specbatch_sample_errors": "finished rows that carry an error",
    "specbatch_draft_proposed": "draft tokens proposed",
    "specbatch_draft_tested": "draft tokens that reached the acceptance test",
    "specbatch_draft_accepted": "draft tokens accepted",
    "specbatch_target_passes": "target forward passes, summed over rows",
}

# Which field of a shard's manifest (specbatch.jobs.data.ShardManifest) feeds which counter.
_SOURCES: dict[str, str] = {
    "specbatch_tokens": "tokens",
    "specbatch_samples": "samples",
    "specbatch_sample_errors": "errors",
    "specbatch_draft_proposed": "draft_proposed",
    "specbatch_draft_tested": "draft_tested",
    "specbatch_draft_accepted": "draft_accepted",
    "specbatch_target_passes": "target_passes",
}


def _ray_counter(name: str, description: str) -> Any:
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=TAG_KEYS)


class ShardMetrics:
    """Publishes one actor's per-shard counts.

    ``make_counter(name, description)`` builds a counter with an ``inc(value, tags=...)``
    method; the default is a Ray counter (only valid inside a Ray worker or driver).
    """

    def __init__(self, job: str, actor: str, make_counter: Callable[[str, str], Any] = _ray_counter):
        self.tags = {"job": job, "actor": actor}
        self.counters = {name: make_counter(name, desc) for name, desc in COUNTERS.items()}

    def record_shard(self, manifest: Any) -> None:
        """Add a finished shard's counts (its manifest, as returned by the worker's run_shard)."""
        for name, field in _SOURCES.items():
            value = int(getattr(manifest, field))
            if value > 0:  # Ray counters reject non-positive increments
                self.counters[name].inc(value, tags=self.tags)
