"""The ``specbatch`` command (also ``python -m specbatch``).

    specbatch run JOB.yaml [--set key.path=value ...]   run a job (resumes by default)
    specbatch validate JOB.yaml [--set ...]             the preflight: spec, input, output, models; write nothing
    specbatch stats OUT [--plots DIR]                   summarize stats.json, render PNG plots
    specbatch submit JOB.yaml --address http://HEAD:8265 [--runtime-env FILE] [--wait]
    specbatch demo                                      pull the demo model, run jobs/demo.yaml
    specbatch models pull NAME                          fetch and convert a registered model
    specbatch audit JOB.yaml [--samples N ...]          test the job's sampling path against exact p
    specbatch reference                                 the job spec reference (Markdown)

Exit codes: 0 success; 2 a spec, input, output-location or model error (one line naming the
field or file, found by the preflight before Ray starts, nothing written); 1 a failed run (it
names the failed shards), an output write refused (a full disk, a read-only or vanished
directory) or a failed audit; 130 Ctrl-C; 143 SIGTERM (a clean stop, like Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_JOB = "jobs/demo.yaml"

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _input_errors() -> tuple[type[BaseException], ...]:
    from specbatch.jobs.data import InputError
    from specbatch.jobs.spec import SpecError

    return (SpecError, InputError)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_validate(args: argparse.Namespace) -> int:
    from specbatch.jobs.preflight import preflight
    from specbatch.jobs.spec import load_spec

    try:
        spec = load_spec(args.job, args.set)
        checked = preflight(spec, offline=True)  # an output store out of reach here is a warning
    except _input_errors() as e:
        return _fail(str(e), EXIT_INPUT)
    for line in checked.warnings:
        print(f"warning: {line}", file=sys.stderr)
    info = checked.input
    points = len(spec.sweep_points())
    samples = info.num_rows * points * spec.sampling.n
    print(
        f"ok: {spec.name}: {info.num_rows} prompts ({info.prompt_kind}) in {len(info.files)} file(s), "
        f"{points} sweep point(s) x {spec.sampling.n} samples = {samples} output rows -> {spec.output.path}"
    )
    return EXIT_OK


def _run_spec(spec: JobSpec, args: argparse.Namespace) -> int:
    from specbatch.jobs import report
    from specbatch.jobs.data import OutputIOError
    from specbatch.jobs.driver import ClusterError, RunError, run_job

    try:
        result = run_job(spec, engine_factory=args.engine_factory, progress=not args.quiet)  # preflight first
    except (*_input_errors(), ClusterError) as e:
        return _fail(str(e), EXIT_INPUT)
    except RunError as e:
        return _fail(str(e), EXIT_FAILED)
    except OutputIOError as e:  # a full disk, a read-only or vanished output: stopped, not retried
        return _fail(f"cannot write the output: {e}; committed shards are kept, run again once this is fixed", EXIT_FAILED)
    print(report.summary_text(result.stats))
    if result.failed:
        return _fail(result.failure_line(), EXIT_FAILED)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from specbatch.jobs.spec import load_spec

    try:
        spec = load_spec(args.job, args.set)
    except _input_errors() as e:
        return _fail(str(e), EXIT_INPUT)
    return _run_spec(spec, args)


def cmd_stats(args: argparse.Namespace) -> int:
    from specbatch.jobs import report

    try:
        stats = report.read_stats(args.output)
    except (FileNotFoundError, OSError, ValueError) as e:
        return _fail(f"{args.output}: no readable stats.json ({' '.join(str(e).split())[:200]})", EXIT_INPUT)
    try:
        text = report.summary_text(stats)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        what = f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]
        return _fail(f"{args.output}: stats.json is not a specbatch statistics file ({what})", EXIT_INPUT)
    print(text)
    if args.no_plots:
        return EXIT_OK
    # Beside stats.json by default, where readers of the output directory skip them.
    directory = args.plots or (f"{args.output.rstrip('/')}/{report.STATS.rpartition('/')[0]}" if "://" not in args.output else ".")
    try:
        paths = report.render_plots(stats, directory)
    except ImportError:
        print("(plots skipped: matplotlib is not installed; pip install 'specbatch[dev]')", file=sys.stderr)
        return EXIT_OK
    for path in paths:
        print(f"wrote {path}")
    return EXIT_OK


def submission(job: str, overrides: Sequence[str], runtime_env: dict | None, cwd: str | os.PathLike = ".") -> tuple[str, dict]:
    """(entrypoint, runtime_env) for the Ray Jobs API.

    The working directory (cwd) is uploaded unless the runtime env names its own working_dir;
    the job file must lie inside it, and the entrypoint refers to it relative to it.
    """
    from specbatch.jobs.spec import SpecError

    env = dict(runtime_env or {})
    root = pathlib.Path(env.get("working_dir") or cwd).resolve()
    env.setdefault("working_dir", str(root))
    job_path = pathlib.Path(job).resolve()
    try:
        relative = job_path.relative_to(root)
    except ValueError:
        raise SpecError(f"{job}: the job file must be inside the uploaded working directory {root}") from None
    # `python -m specbatch`: the package is importable from the uploaded working directory even
    # where it is not installed (the stock Ray images).
    parts = ["python", "-m", "specbatch", "run", relative.as_posix(), "--quiet"]
    for item in overrides:
        parts += ["--set", item]
    return " ".join(shlex.quote(p) for p in parts), env


def _read_runtime_env(path: str | None) -> dict | None:
    from specbatch.jobs.spec import SpecError, read_bounded

    if path is None:
        return None
    import yaml

    try:
        env = yaml.safe_load(read_bounded(pathlib.Path(path)))
    except ValueError as e:  # an integer literal beyond Python's conversion limit
        raise SpecError(f"{path}: {' '.join(str(e).split())[:200]}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: YAML syntax error: {' '.join(str(e).split())}") from None
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise SpecError(f"{path}: a runtime env must be a mapping, got {type(env).__name__}")
    return env


def dashboard_address(text: str) -> str:
    """A Ray Jobs API address, ``http(s)://HOST[:PORT]`` (the dashboard, port 8265 by default);
    SpecError (one line) for anything else: a ray:// (Ray Client) address, a bare word, a bad port."""
    from urllib.parse import urlsplit

    from specbatch.jobs.spec import SpecError

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise SpecError(f"--address {text}: {e}; expected http://HEAD:8265") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"--address {text}: expected the Ray dashboard's http://HEAD:8265 (a Jobs API address)")
    return text


def cmd_submit(args: argparse.Namespace) -> int:
    from specbatch.jobs.preflight import preflight
    from specbatch.jobs.spec import SpecError, load_spec

    try:
        spec = load_spec(args.job, args.set)
        preflight(spec, here=False)  # input, output and absent models are checked by the job on the cluster
        entrypoint, runtime_env = submission(args.job, args.set, _read_runtime_env(args.runtime_env))
    except _input_errors() as e:
        return _fail(str(e), EXIT_INPUT)
    try:
        address = dashboard_address(args.address)
    except SpecError as e:
        return _fail(str(e), EXIT_INPUT)
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"specbatch_job": spec.name})
    except Exception as e:  # noqa: BLE001 - whatever the Jobs API raises (connection, HTTP, version): one line
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        return _fail(f"--address {args.address}: the Ray Jobs API did not take the job ({why})", EXIT_INPUT)
    print(f"submitted {spec.name} as {job_id}: {entrypoint}")
    print(f"follow it with: ray job logs -f {job_id} --address {args.address}")
    if not args.wait:
        return EXIT_OK
    import time

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(args.poll)
    print(client.get_job_logs(job_id), end="")
    print(f"{job_id}: {status}")
    return EXIT_OK if status == JobStatus.SUCCEEDED else EXIT_FAILED


def demo_job_path() -> pathlib.Path:
    """jobs/demo.yaml of the source checkout (the package is installed editable), else of cwd."""
    here = pathlib.Path(__file__).resolve().parent.parent / DEMO_JOB
    return here if here.is_file() else pathlib.Path(DEMO_JOB).resolve()


def cmd_demo(args: argparse.Namespace) -> int:
    from specbatch.models import pull_model
    from specbatch.jobs.spec import load_spec

    job = demo_job_path()
    if not job.is_file():
        return _fail(f"{DEMO_JOB}: not found (run the demo from the specbatch checkout)", EXIT_INPUT)
    try:
        print(f"demo model: {pull_model(DEMO_MODEL)}", file=sys.stderr)
    except (RuntimeError, OSError, ValueError) as e:
        return _fail(f"could not pull {DEMO_MODEL}: {e}", EXIT_FAILED)
    # The demo's relative paths (prompts, output) are relative to the checkout.
    os.chdir(job.parent.parent)
    try:
        spec = load_spec(job, args.set)
    except _input_errors() as e:
        return _fail(str(e), EXIT_INPUT)
    code = _run_spec(spec, args)  # the preflight runs there
    if code == EXIT_OK:
        _show_examples(spec)
        _show_speedup(spec, args.engine_factory)
    return code


def _show_speedup(spec: JobSpec, engine_factory: str, count: int = 4) -> None:
    """Print the job's drafter against plain sampling, measured on `count` of its prompts."""
    from specbatch.jobs.data import read_output
    from specbatch.jobs.speedup import measure_speedup
    from specbatch.jobs.build import import_factory

    table = read_output(spec.output.path)
    prompts = list(dict.fromkeys(table.column("id").to_pylist()))[:count]
    first = {}
    for row in table.select(["id", "prompt"]).to_pylist():
        first.setdefault(row["id"], row["prompt"])
    speedup = measure_speedup(spec, [first[i] for i in prompts], import_factory(engine_factory))
    print(f"\nspeedup over plain sampling, {speedup.line()}")


def _show_examples(spec: JobSpec, count: int = 3) -> None:
    """Print a few samples of the demo's output."""
    from specbatch.jobs.data import read_output

    table = read_output(spec.output.path)
    rows = table.slice(0, count).to_pylist()
    print(f"\noutput: {os.path.abspath(spec.output.path)} ({table.num_rows} rows); first {len(rows)}:")
    for row in rows:
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        print(f"- [{row['id']} #{row['sample_index']}] {prompt}\n  -> {' '.join(row['completion'].split())[:300]}")


def cmd_models_pull(args: argparse.Namespace) -> int:
    from specbatch.models import pull_model

    try:
        print(pull_model(args.name))
    except ValueError as e:
        return _fail(str(e), EXIT_INPUT)
    except (RuntimeError, OSError) as e:
        return _fail(str(e), EXIT_FAILED)
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    from specbatch.jobs.spec import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from specbatch.jobs.audit import AuditConfig, AuditError, report_lines, run_audit
    from specbatch.jobs.preflight import preflight
    from specbatch.jobs.spec import load_spec
    from specbatch.jobs.build import build_engine

    try:
        given = {"prompts": args.prompts, "prefix_lengths": args.prefix_lengths, "samples": args.samples,
                 "seed": args.seed, "alpha": args.alpha}
        config = AuditConfig(**{k: v for k, v in given.items() if v is not None})
        # Adaptive gamma only picks a smaller gamma; the audit drafts the job's full gamma.
        spec = load_spec(args.job, [*args.set, "speculative.adaptive_gamma=false"])
        preflight(spec)
        loaded = build_engine(spec, measure_cost=False)
        result = run_audit(spec, loaded, config)
    except (*_input_errors(), AuditError) as e:
        return _fail(str(e), EXIT_INPUT)
    print("\n".join(report_lines(result)))
    return EXIT_OK if result.passed else EXIT_FAILED


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# Parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field, value parsed as YAML (repeatable), e.g. sampling.n=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:FUNCTION",
                   help="advanced: build engines with this factory instead of specbatch's own (tests, custom engines)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specbatch", description="Batch generation with exact speculative sampling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a job spec (resumes an interrupted run by default)")
    p.add_argument("job", help="job spec YAML")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="the preflight: check the spec, input, output location and models; write nothing")
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("stats", help="summarize an output's stats.json and render plots")
    p.add_argument("output", help="output directory (local, s3://, gs://)")
    p.add_argument("--plots", default=None, metavar="DIR", help="where to write the PNGs (default: the output directory)")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster through the Ray Jobs API")
    p.add_argument("job", help="job spec YAML (inside the working directory, which is uploaded)")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--runtime-env", default=None, metavar="FILE", help="runtime env YAML, e.g. cluster/runtime_env.yaml")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and print its logs")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help=f"pull {DEMO_MODEL} and run {DEMO_JOB}")
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="manage models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = models.add_parser("pull", help="fetch and convert a registered model")
    pull.add_argument("name", help=f"registered model name, e.g. {DEMO_MODEL}")
    pull.set_defaults(func=cmd_models_pull)

    p = sub.add_parser("audit", help="test the job's sampling path (its models and settings) against the exact target distribution")
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--prompts", type=int, help="first usable prompts of the input to audit (default 2)")
    p.add_argument("--prefix-lengths", type=_int_list, metavar="L,L,...",
                   help="lengths of the forced completion prefixes (default 0,4)")
    p.add_argument("--samples", type=int, help="samples per (prompt, prefix) (default 200)")
    p.add_argument("--seed", type=int, help="random-number seed of the audited samples (default 0)")
    p.add_argument("--alpha", type=float, help="family-wise level of the verdict (default 1e-3)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("reference", help="print the job spec reference (every field, default, description)")
    p.set_defaults(func=cmd_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "engine_factory", "unset") is None:
        from specbatch.jobs.build import ENGINE_FACTORY

        args.engine_factory = ENGINE_FACTORY
    from specbatch.jobs import signals
    from specbatch.deps import DependencyError

    with signals.restored():  # main() called in a longer-lived process leaves its handler alone
        signals.install()  # SIGTERM unwinds like Ctrl-C: actors stopped, the local Ray reaped
        try:
            return args.func(args)
        except DependencyError as exc:  # raised by the preflight, before Ray starts
            return _fail(str(exc), EXIT_INPUT)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (signals.Terminated, which Ray may rewrap)
            if signals.received():
                return _fail("terminated (SIGTERM); committed shards are kept, run again to resume", signals.EXIT_TERMINATED)
            return _fail("interrupted", 130)
        except BrokenPipeError:  # e.g. `specbatch stats OUT | head`: the reader left, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
