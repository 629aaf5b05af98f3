"""The installed environment: nothing in the repository shadows another distribution, and a
broken dependency is one line before Ray starts.

The repository root is on ``sys.path`` in every process a job has: pytest (rootdir), ``python -m
specbatch`` run from the root (the current directory comes first), and Ray workers (the driver's
working directory, and the ``PYTHONPATH`` the local Ray passes on). A folder there that is a
regular package (an ``__init__.py``) wins over an installed distribution of the same name; that
is how our old ``kernels/`` folder broke transformers 5.25, which imports PyPI's ``kernels``. The
kernels now live one level down (``kernels/specbatch_kernels``) and ``kernels/`` has no
``__init__.py``: at most a namespace portion, which any installed ``kernels`` outranks.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from specbatch import deps
from tests.tiny import make_tiny_checkpoint
from tests import PYTHONPATH

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Folders that are sys.path[0] of some process: the root (pytest, python -m, Ray workers) and
# bench/ (its scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path).
PATH_FOLDERS = (ROOT, ROOT / "bench")


def _importable_names(folder: pathlib.Path) -> set[str]:
    """Top-level names a folder on sys.path provides as regular packages or modules."""
    names = {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in folder.glob("*.py")}
    return names


@pytest.mark.parametrize("folder", PATH_FOLDERS, ids=lambda p: p.name)
def test_no_module_on_a_path_folder_shadows_an_installed_distribution(folder):
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in _importable_names(folder)
               if name in owners and set(owners[name]) - {"specbatch"}}
    assert clashes == {}


def test_the_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "specbatch_kernels" / "__init__.py").exists()


def _installed_kernels() -> str:
    """The file ``import kernels`` must resolve to: the PyPI distribution's own."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels package is not installed here (the lock installs it)")
    return str(pathlib.Path(dist.locate_file("kernels/__init__.py")).resolve())


def test_import_kernels_under_pytest_is_the_installed_distribution():
    want = _installed_kernels()
    assert str(ROOT) in [str(pathlib.Path(p or ".").resolve()) for p in sys.path]  # the risky setting
    import kernels
    import transformers.activations  # noqa: F401  (imports PyPI's kernels on transformers >= 5.25)

    assert str(pathlib.Path(kernels.__file__).resolve()) == want


DRIVER_AND_ACTOR = textwrap.dedent(
    """
    import json, os, sys
    import kernels
    import transformers.activations
    from specbatch.jobs import localray

    def where():
        import kernels, sys, os
        import transformers.activations
        return dict(kernels=os.path.realpath(kernels.__file__), cwd_on_path=os.getcwd() in sys.path or "" in sys.path)

    local = localray.start(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        import ray
        actor = ray.remote(num_cpus=1)(type("Probe", (), {"where": lambda self: where()})).remote()
        in_actor = ray.get(actor.where.remote(), timeout=120)
    finally:
        local.stop()
    print(json.dumps(dict(driver=os.path.realpath(kernels.__file__), actor=in_actor["kernels"])))
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=PYTHONPATH, RAY_AUTH_MODE="disabled")
    return env


def test_import_kernels_in_a_driver_at_the_root_and_in_its_ray_actor_is_the_installed_distribution():
    want = _installed_kernels()
    proc = subprocess.run([sys.executable, "-c", DRIVER_AND_ACTOR], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == dict(driver=want, actor=want)


def test_a_tiny_job_runs_end_to_end_from_the_repository_root(tmp_path):
    """``python -m specbatch run`` from the root with PyPI's kernels importable: the real engine
    (tokenizer and model loaded in the actor, n-gram drafter), every (id, sample) once."""
    _installed_kernels()
    model = make_tiny_checkpoint(tmp_path / "model", vocab_size=64, seed=5)
    inp = tmp_path / "in" / "prompts.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["one two", "three four", "five"]}), inp)
    spec = {
        "name": "fresh-install",
        "input": {"path": str(inp)},
        "output": {"path": str(tmp_path / "out")},
        "models": {"target": {"path": str(model), "dtype": "float32"}, "draft": {"kind": "ngram"}},
        "sampling": {"n": 2, "max_new_tokens": 4, "seed": 1},
        "resources": {"actors": 1, "gpus_per_actor": 0},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "specbatch", "run", str(job), "--quiet"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in rows) == [(i, s) for i in "abc" for s in (0, 1)]
    assert all(r["error"] is None and r["num_tokens"] >= 1 for r in rows)


def test_a_module_that_does_not_import_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(deps, "RUNTIME_MODULES", (("numpy", "arrays"), ("specbatch_no_such_module", "a test")))
    monkeypatch.setattr(deps, "_triton_expected", lambda: False)
    with pytest.raises(deps.DependencyError) as err:
        deps.check()
    message = str(err.value)
    assert "\n" not in message
    assert "`import specbatch_no_such_module` (a test) failed: ModuleNotFoundError" in message


def test_run_stops_with_one_line_before_ray_when_a_dependency_is_broken(tmp_path):
    """A package that raises on import (a shadowing ``kernels`` folder first on PYTHONPATH, the
    very failure of transformers 5.25) stops ``specbatch validate`` with exit 2 and one line."""
    _installed_kernels()
    shadow = tmp_path / "shadow" / "kernels"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('a stale kernels folder')\n")
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), inp)
    model = make_tiny_checkpoint(tmp_path / "model", vocab_size=64, seed=5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "broken-env", "input": {"path": str(inp)}, "output": {"path": str(tmp_path / "out")},
                                   "models": {"target": {"path": str(model)}}}))
    env = _env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{PYTHONPATH}"
    proc = subprocess.run([sys.executable, "-m", "specbatch", "validate", str(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the environment cannot run specbatch: `import transformers")
    assert "a stale kernels folder" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# scripts/venv.sh: a step that fails is one line naming it


def _venv_script(tmp_path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(ROOT / "scripts" / "venv.sh"), str(tmp_path / "venv"), "lock"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_venv_script_stops_in_one_line_when_the_venv_cannot_be_created(tmp_path):
    proc = _venv_script(tmp_path, {"PY": "false"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: creating the virtual environment {tmp_path / 'venv'} with false failed "
        f"(full log: {tmp_path / 'venv' / 'install.log'})"]


def test_venv_script_stops_in_one_line_naming_the_step_and_pips_error(tmp_path):
    """An existing environment whose pip refuses the torch requirement (a stand-in python)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text('#!/bin/sh\ncase "$*" in *torch*) echo "Collecting torch"; '
                      'echo "ERROR: No matching distribution found for torch==99.0"; exit 1;; esac\nexit 0\n')
    python.chmod(0o755)
    proc = _venv_script(tmp_path, {"TORCH_SPEC": "torch==99.0"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: installing torch (torch==99.0) failed: ERROR: No matching distribution found for "
                     f"torch==99.0 (full log: {tmp_path / 'venv' / 'install.log'})"]
