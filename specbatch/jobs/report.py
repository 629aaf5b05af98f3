"""stats.json: what a job produced and how well speculation worked; its summary and plots.

Built by the driver from the shard manifests (every committed shard, this run's and earlier
runs'), so a resumed job reports the whole output. Terms as in docs/design.md section 3:
acceptance rate alpha = accepted / tested, proposal efficiency = accepted / proposed, mean
accepted length = tokens emitted per target forward pass, acceptance per position i =
accepted at i / tested at i, expected speedup = E[tokens per step] / relative step cost from
the measured cost model.

``specbatch stats OUT`` prints :func:`summary_text` and renders :func:`render_plots`
(matplotlib, from the dev extra: without it the summary still prints).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow.fs as pafs

from specbatch.jobs import data
from specbatch.jobs.data import STATS_FILE, ShardManifest
from specbatch.jobs.data.layout import LEGACY_STATS_FILE
from specbatch.engine.stats import AcceptanceStats, CostModel, expected_speedup, expected_speedup_of_steps

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec

STATS = STATS_FILE  # in the output directory
GAMMA_CANDIDATES = range(0, 9)  # 0: plain sampling (speedup 1 by definition)


# ---------------------------------------------------------------------------------------------
# Files in the output directory (local or object store, through pyarrow.fs)


def read_stats(output: str) -> dict[str, Any]:
    """The stats.json of an output directory (local path or URI), in either layout."""
    fs, path = data.resolve(output.rstrip("/") + "/" + STATS)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        fs, path = data.resolve(output.rstrip("/") + "/" + LEGACY_STATS_FILE)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _clean(x: Any) -> Any:
    """NaN and infinities -> None, recursively (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# Building stats.json


def cost_model_from_dict(d: Mapping[str, Any] | None) -> CostModel | None:
    if not d:
        return None
    return CostModel(
        target={(int(e["batch"]), int(e["width"])): float(e["seconds"]) for e in d.get("target", [])},
        draft={int(e["batch"]): float(e["seconds"]) for e in d.get("draft", [])},
    )


def _speedup(alpha: float | None, gamma: int, cost: CostModel | None, batch: int) -> float | None:
    if gamma <= 0:
        return 1.0
    if alpha is None:
        return None
    try:
        return expected_speedup(alpha, gamma, cost, batch=batch)
    except KeyError:  # the cost model has no entry for this verification width
        return None


def expected_speedup_report(alpha: float | None, gamma: int, cost: CostModel | None, batch: int) -> dict[str, Any]:
    """Expected speedup at the chosen gamma, and at every candidate gamma the cost model covers."""
    if cost is not None and cost.target:
        basis = f"measured cost model at batch {batch}"
    else:
        cost = None
        basis = "no cost model measured: Leviathan's formula with free drafting and verification (an upper bound)"
    by_gamma = {g: _speedup(alpha, g, cost, batch) for g in GAMMA_CANDIDATES}
    by_gamma = {g: s for g, s in by_gamma.items() if s is not None}
    return {
        "value": _speedup(alpha, gamma, cost, batch),
        "alpha": alpha,
        "gamma": gamma,
        "batch": batch,
        "basis": basis,
        "by_gamma": {str(g): s for g, s in by_gamma.items()},
        "cost_model": cost.to_dict() if cost is not None else None,
    }


def _speedup_over_steps(alpha: float | None, manifests: Sequence[ShardManifest], cost: CostModel | None) -> float | None:
    """The expected speedup of the steps the engines actually ran (ragged proposals, real batch
    sizes), from the step shapes the manifests carry; None without them or a cost model."""
    rows: dict[tuple[int, int], int] = {}
    steps: dict[tuple[int, int], int] = {}
    for m in manifests:
        shapes = (m.engine or {}).get("steps") or {}
        for table, name in ((rows, "rows_by_proposals"), (steps, "steps_by_shape")):
            for b, g, n in shapes.get(name, []):
                table[(int(b), int(g))] = table.get((int(b), int(g)), 0) + int(n)
    if alpha is None or cost is None or not cost.target or not steps:
        return None
    try:
        return expected_speedup_of_steps(alpha, rows, steps, cost)
    except KeyError:  # a verification width the cost model did not measure
        return None


def gamma_report(spec: JobSpec, engine_gamma: Mapping[str, Any] | None, speedup: Mapping[str, Any]) -> dict[str, Any]:
    """The gamma the job ran with and why; the best gamma the measurements predict."""
    configured = spec.gamma
    value, why = configured, "speculative.num_draft_tokens in the job spec"
    if spec.models.draft.kind == "none":
        why = "models.draft.kind is none: plain sampling"
    elif configured == 0:
        why = "speculative.num_draft_tokens is 0: plain sampling"
    if engine_gamma and engine_gamma.get("value") is not None:
        value = int(engine_gamma["value"])
        why = engine_gamma.get("why") or why
    by_gamma = {int(g): s for g, s in speedup["by_gamma"].items()}
    best = max(by_gamma, key=by_gamma.get) if by_gamma and speedup["alpha"] is not None else None
    return {
        "chosen": value,
        "why": why,
        "best_predicted": best,
        "best_predicted_speedup": by_gamma.get(best) if best is not None else None,
    }


def _per_actor(manifests: Sequence[ShardManifest], descriptions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_label: dict[str, dict[str, Any]] = {}
    for desc in descriptions:
        by_label[desc.get("actor")] = {"actor": desc.get("actor"), **{k: v for k, v in desc.items() if k != "actor"}}
    stats: dict[str, AcceptanceStats] = {}
    for m in manifests:
        label = m.actor
        if label is None:
            continue
        row = by_label.setdefault(label, {"actor": label})
        for key in ("shards", "rows", "samples", "tokens"):
            row.setdefault(key, 0)
        row.setdefault("busy_s", 0.0)
        row["shards"] += 1
        row["rows"] += m.rows
        row["samples"] += m.samples
        row["tokens"] += m.tokens
        row["busy_s"] += m.elapsed_s
        if m.stats:
            stats.setdefault(label, AcceptanceStats()).merge(AcceptanceStats.from_dict(m.stats))
    out = []
    for label, row in by_label.items():
        busy = row.get("busy_s", 0.0)
        row["tokens_per_s"] = row.get("tokens", 0) / busy if busy else None
        row["acceptance_rate"] = stats[label].acceptance_rate if label in stats else None
        out.append(row)
    return out


def build_stats(
    spec: JobSpec,
    manifests: Mapping[str, ShardManifest],
    *,
    this_run: Sequence[ShardManifest] = (),
    run: Mapping[str, Any] | None = None,
    actors: Sequence[Mapping[str, Any]] = (),
    cost_model: Mapping[str, Any] | None = None,
    gamma: Mapping[str, Any] | None = None,
    failed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """stats.json's content (docs/design.md section 6) from every committed shard's manifest."""
    infos = [manifests[name] for name in sorted(manifests)]
    acceptance = AcceptanceStats()
    reasons: dict[str, int] = {}
    for m in infos:
        if m.stats:
            acceptance.merge(AcceptanceStats.from_dict(m.stats))
        for reason, count in m.finish_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    totals = {
        "shards": len(infos),
        "failed_shards": sum(1 for m in infos if m.failed),
        "prompts": sum(m.rows for m in infos),
        "samples": sum(m.samples for m in infos),
        "tokens": sum(m.tokens for m in infos),
        "prompt_tokens": sum(m.prompt_tokens for m in infos),
        "row_errors": sum(m.errors for m in infos),
        "finish_reasons": reasons,
    }
    run = dict(run or {})
    wall = run.get("wall_s")
    run_tokens = sum(m.tokens for m in this_run)
    run_samples = sum(m.samples for m in this_run)
    busy = sum(m.elapsed_s for m in this_run)
    throughput = {
        "tokens_this_run": run_tokens,
        "samples_this_run": run_samples,
        "wall_s": wall,
        "tokens_per_s": run_tokens / wall if wall else None,
        "samples_per_s": run_samples / wall if wall else None,
        "actor_busy_s": busy,
        "tokens_per_actor_s": run_tokens / busy if busy else None,
        "first_shard_s": run.get("first_shard_s"),
    }
    alpha = acceptance.acceptance_rate
    configured_gamma = spec.gamma
    if gamma and gamma.get("value") is not None:
        configured_gamma = int(gamma["value"])
    batch = max(1, min(spec.resources.max_batch_size, spec.sampling.n * spec.resources.shard_rows))
    cost = cost_model_from_dict(cost_model)
    speedup = expected_speedup_report(alpha, configured_gamma, cost, batch)
    speedup["over_steps_run"] = _speedup_over_steps(alpha, infos, cost)
    timeline = [
        {k: getattr(m, k) for k in ("shard", "actor", "started_at", "finished_at", "rows", "samples", "tokens")}
        for m in infos if not m.failed
    ]
    stats = {
        "job": spec.name,
        "output": spec.output.path,
        "fingerprint": spec.fingerprint(),
        "complete": not failed,
        "totals": totals,
        "acceptance_rate": alpha,
        "proposal_efficiency": acceptance.proposal_efficiency,
        "mean_accepted_length": acceptance.mean_accepted_length,
        "acceptance_per_position": acceptance.acceptance_per_position,
        "acceptance": acceptance.to_dict(),
        "throughput": throughput,
        "expected_speedup": speedup,
        "gamma": gamma_report(spec, gamma, speedup),
        "actors": _per_actor(this_run, actors),
        "run": run,
        "failed": list(failed),
        "timeline": timeline,
        "spec": spec.to_dict(),
    }
    return _clean(stats)


# ---------------------------------------------------------------------------------------------
# Reading it back


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def summary_text(stats: Mapping[str, Any]) -> str:
    """A readable multi-line summary of a stats.json."""
    t = stats["totals"]
    thr = stats["throughput"]
    sp = stats["expected_speedup"]
    g = stats["gamma"]
    lines = [
        f"job {stats['job']}: {'complete' if stats['complete'] else 'INCOMPLETE'} ({stats['output']})",
        f"  prompts {t['prompts']}, samples {t['samples']}, completion tokens {t['tokens']}, "
        f"shards {t['shards']} ({t['failed_shards']} failed), row errors {t['row_errors']}",
        "  finish reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(t["finish_reasons"].items())) or "-"),
        f"  acceptance rate {_fmt(stats['acceptance_rate'])}, proposal efficiency {_fmt(stats['proposal_efficiency'])}, "
        f"mean accepted length {_fmt(stats['mean_accepted_length'], 2)} tokens per target pass",
    ]
    per_pos = stats.get("acceptance_per_position") or []
    if per_pos:
        lines.append("  acceptance per position: " + " ".join(_fmt(a, 2) for a in per_pos))
    lines += [
        f"  gamma {g['chosen']} ({g['why']}); best predicted gamma {_fmt(g['best_predicted'])}"
        + (" (plain sampling)" if g.get("best_predicted") == 0 else "")
        + (f" at {_fmt(g['best_predicted_speedup'], 2)}x" if g.get("best_predicted_speedup") else ""),
        f"  expected speedup {_fmt(sp['value'], 2)}x ({sp['basis']})"
        + (f"; over the steps actually run {_fmt(sp['over_steps_run'], 2)}x" if sp.get("over_steps_run") else ""),
        f"  this run: {thr['tokens_this_run']} tokens in {_fmt(thr['wall_s'], 1)} s = {_fmt(thr['tokens_per_s'], 1)} tokens/s"
        f" (per busy actor-second {_fmt(thr['tokens_per_actor_s'], 1)}); first shard after {_fmt(thr['first_shard_s'], 1)} s",
    ]
    for a in stats.get("actors", []):
        lines.append(
            f"  {a.get('actor')}: {a.get('shards', 0)} shards, {a.get('samples', 0)} samples, {a.get('tokens', 0)} tokens, "
            f"{_fmt(a.get('tokens_per_s'), 1)} tokens/s, acceptance {_fmt(a.get('acceptance_rate'))}"
            + (f", {a['device']}" if a.get("device") else "")
            + (f" {a['dtype']}" if a.get("dtype") else "")
            + (f", {a['threads']} threads" if a.get("threads") else "")
        )
    for f in stats.get("failed", []):
        lines.append(f"  FAILED {f['shard']} (ids {', '.join(map(str, f['ids'][:5]))}): {f['error']}")
    return "\n".join(lines)


def render_plots(stats: Mapping[str, Any], directory: str | pathlib.Path) -> list[pathlib.Path]:
    """acceptance_per_position.png and throughput.png in `directory`. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    acc = stats["acceptance"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rates = [a if a is not None else 0.0 for a in stats.get("acceptance_per_position") or []]
    if rates:
        positions = list(range(len(rates)))
        ax.bar(positions, rates, color="tab:blue")
        for x, tested in zip(positions, acc["tested_at"]):
            ax.annotate(f"n={tested}", (x, 0.02), ha="center", fontsize=7, color="white" if rates[x] > 0.1 else "black")
        ax.set_xticks(positions)
    else:
        _empty(ax, "no proposals were tested")
    ax.set_ylim(0, 1)
    ax.set_xlabel("draft position i")
    ax.set_ylabel("accepted / tested at i")
    ax.set_title(f"{stats['job']}: acceptance per position (alpha {_fmt(stats['acceptance_rate'])})")
    written.append(_save(plt, fig, directory / "acceptance_per_position.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    timeline = [e for e in stats.get("timeline", []) if e.get("finished_at") is not None]
    if timeline:
        t0 = min(e["started_at"] for e in timeline)
        actors = sorted({str(e["actor"]) for e in timeline})
        for label in actors:
            events = sorted((e for e in timeline if str(e["actor"]) == label), key=lambda e: e["finished_at"])
            xs, ys, total = [0.0], [0], 0
            for e in events:
                total += e["tokens"]
                xs.append(e["finished_at"] - t0)
                ys.append(total)
            ax.step(xs, ys, where="post", label=label)
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no shards committed")
    ax.set_xlabel("seconds since the first shard started")
    ax.set_ylabel("completion tokens committed")
    ax.set_title(f"throughput: {_fmt(stats['throughput'].get('tokens_per_s'), 1)} tokens/s this run")
    written.append(_save(plt, fig, directory / "throughput.png"))
    return written


def _empty(ax: Any, message: str) -> None:
    """A plot with nothing to draw says why, in its middle."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def _save(plt: Any, fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
