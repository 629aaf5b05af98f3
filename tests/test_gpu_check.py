"""``bench/gpu_check.py --smoke``: the GPU validation script runs end to end on CPU, in an
interpreter that lacks what a bare GPU node lacks (15-40 s on 2 shared cores; the other test under 1 s).

The subprocess refuses Ray, pydantic, scipy, pytest and psutil outright, and yaml to the
repository's own code (transformers' hub client imports yaml, so it is installed wherever
transformers is; specbatch's engine path must not need it).  The JSON must hold every section,
every parity and exactness check passed, and a step time for every batch and width.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from specbatch_kernels import reference
from specbatch_kernels.reference import VerifyStep
from tests.kernel_support import keep_backend_choice

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUN_HIDDEN = textwrap.dedent(
    """
    import json, runpy, sys

    HIDDEN = ("ray", "pydantic", "scipy", "pytest", "psutil")
    REPO, OUT = sys.argv[1], sys.argv[2]
    refused = []

    def importer_is_ours():
        '''Whether the import statement being run is in the repository's own code.'''
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not (name.startswith("<") or "importlib" in name):
                return name.startswith(REPO) and "site-packages" not in name
            frame = frame.f_back
        return False

    class Hide:
        '''A meta-path finder that does not see the modules a bare GPU node lacks: importing one
        raises ModuleNotFoundError and importlib.util.find_spec says None, as if not installed.'''

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in HIDDEN or (top == "yaml" and importer_is_ours()):
                refused.append(name)
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
    sys.argv = ["bench/gpu_check.py", "--smoke", "--out", OUT]
    try:
        runpy.run_path("bench/gpu_check.py", run_name="__main__")
    except SystemExit as done:
        code = done.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
    print(json.dumps(dict(code=code, refused=sorted(set(refused)), loaded=loaded)))
    """
)


@pytest.mark.triton
def test_gpu_check_smoke_runs_without_ray_pydantic_or_scipy(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
    env.pop("SPECBATCH_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", RUN_HIDDEN, str(ROOT), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status["code"] == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert status["loaded"] == []
    assert "gpu_check smoke: PASS" in proc.stdout

    report = json.loads(out.read_text())
    assert report["profile"] == "smoke" and report["passed"] is True
    assert report["environment"]["triton_interpret"] is True
    sections = report["sections"]
    assert set(sections) == {"kernels", "exactness", "steps", "fused", "graphs"}
    assert all(sections[name] for name in sections)
    kernels = sections["kernels"]
    assert {c["case"].split()[0] for c in kernels} == {"verify", "warp+sample"}
    assert all(c["ok"] is True and c["figures"]["bad"] == 0 for c in kernels)
    assert all(c["ok"] is True and not c["figures"]["failed"] for c in sections["exactness"])
    steps = [c["figures"] for c in sections["steps"] if "batch" in c["figures"]]
    assert {(s["batch"], s["width"]) for s in steps} == {(1, 1), (4, 1), (1, 5), (4, 5)}
    assert all(s["step_ms"] > 0 and s["steps"] > 0 and s["bound_ms"] > 0 for s in steps)
    assert all("transformers_ms_per_token" in s for s in steps if s["width"] == 1)
    parity = [c for c in sections["graphs"] if c["case"].startswith("ragged step parity")]
    assert len(parity) == 2 and all(c["ok"] is True for c in parity)
    timed = [c["figures"] for c in sections["graphs"] if "width" in c["figures"]]
    assert {(t["batch"], t["width"]) for t in timed} == {(1, 1), (4, 1), (1, 5), (4, 5)}
    assert all(t["static_forward_ms"] > 0 and t["engine_step_ms"] > 0 and t["graphs"] is False for t in timed)
    tv = [c for c in sections["fused"] if c["case"].startswith("approximate TV")]
    assert len(tv) == 3 and all(c["ok"] is True for c in tv)


def _gpu_check_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_parity_checks_catch_a_kernel_that_differs_away_from_a_boundary(monkeypatch):
    """The kernel checks have teeth: a 'kernel' equal to the reference passes, one that changes a
    token (or a kept set) fails, and the classification of differing rows runs (under 1 s)."""
    gc = _gpu_check_module(monkeypatch)
    keep_backend_choice(monkeypatch)
    cpu = torch.device("cpu")

    def verify_as_reference(corrupt):
        def verify(scores, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position, **kw):
            result, logprobs, _ = reference.verify(VerifyStep(scores, draft_tokens, num_proposed, draft_probs, warp,
                                                              key, sample_index, position))
            if corrupt:
                result.tokens[0, 0] = (result.tokens[0, 0] + 1) % scores.shape[-1]
            return result, logprobs
        return verify

    monkeypatch.setattr(gc.ops, "verify", verify_as_reference(False))
    assert gc.check_verify_parity(50, 8, 3, torch.float32, False, cpu).ok is True
    monkeypatch.setattr(gc.ops, "verify", verify_as_reference(True))
    failed = gc.check_verify_parity(50, 8, 3, torch.float32, False, cpu)
    assert failed.ok is False and failed.figures["differ"] == 1 and failed.figures["bad"] == 1

    real_warp = gc.ops.warp_and_sample

    def sample_dropping_a_token(logits, warp, key, sample_index, position, **kw):
        gc.ops.force_backend("torch")
        tokens, probs = real_warp(logits, warp, key, sample_index, position, return_probs=True)
        kept = (probs[1] > 0).nonzero().squeeze(1)
        probs[1, kept[-1]] = 0.0  # row 1 keeps one token fewer than the reference
        return tokens, probs

    monkeypatch.setattr(gc.ops, "warp_and_sample", sample_dropping_a_token)
    dropped = gc.check_sample_parity(40, 6, torch.float32, cpu)
    assert dropped.ok is False and dropped.figures["bad"] >= 1
