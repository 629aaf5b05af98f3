"""Package-level import rules, each checked in a fresh interpreter (DESIGN section 2 layering).

* the engine never imports Ray (Ray belongs to the driver and the worker actors);
* the kernels never import the engine, the worker or the driver;
* with Triton absent (hidden by a meta-path finder, as on a platform where it is not installed),
  ``import specbatch`` works and plain sampling and rejection verification run on CPU through the
  public path: ``Engine.generate`` with the n-gram drafter, on the torch reference backend.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from tests.tiny import make_tiny_checkpoint
from tests import PYTHONPATH

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels" / "specbatch_kernels").glob("*.py") if p.stem != "__init__")

HIDE_TRITON = textwrap.dedent(
    """
    import sys

    class HideTriton:
        '''Refuse triton and its submodules as if the package were not installed.'''

        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideTriton())
    """
)


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter rooted at the repository; it prints one JSON line."""
    environ = {**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})}
    environ.pop("SPECBATCH_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_never_import_the_engine_and_the_engine_never_imports_ray():
    """One interpreter: every kernel module first (nothing above them may load), then the engine."""
    out = run_python(textwrap.dedent(
        f"""
        import importlib, json, sys
        loaded = lambda names: sorted(m for m in sys.modules if m in names or m.startswith("ray."))
        for module in {KERNEL_MODULES!r}:
            importlib.import_module("specbatch_kernels." + module)
        after_kernels = loaded(("specbatch.engine.engine", "specbatch.jobs.worker", "specbatch.jobs.driver", "specbatch.engine.drafting.base", "ray"))
        import specbatch.engine.engine, specbatch.engine.drafting.base, specbatch.engine.verification
        print(json.dumps(dict(after_kernels=after_kernels, after_engine=loaded(("ray",)))))
        """
    ))
    assert len(KERNEL_MODULES) >= 7  # ops, reference, warp, verify, approximate, rng, parity...
    assert out == dict(after_kernels=[], after_engine=[])


def test_reference_backend_runs_without_triton(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", vocab_size=32, seed=3)
    out = run_python(HIDE_TRITON + textwrap.dedent(
        f"""
        import json, sys
        import specbatch
        from specbatch.engine.drafting.ngram import NgramDrafter
        from specbatch.engine.engine import Engine, EngineConfig
        from specbatch.models import load_model, load_tokenizer
        from specbatch.engine.request import Request
        from specbatch.sampling.warping import SamplingParams
        from specbatch_kernels import ops

        target = load_model({str(ckpt)!r}, dtype="float32")
        tokenizer = load_tokenizer({str(ckpt)!r})
        prompt = [1, 10, 11, 12, 10, 11, 12, 10, 11]
        outs = {{}}
        for name, drafter in (("plain", None), ("ngram", NgramDrafter())):
            engine = Engine(target, tokenizer, drafter, EngineConfig(max_batch_size=4, num_draft_tokens=3,
                                                                     measure_cost=False))
            params = SamplingParams(n=4, max_new_tokens=8, ignore_eos=True, top_p=0.9, seed=5)
            done = engine.generate([Request("p", prompt, params)])
            outs[name] = dict(lengths=[len(o.token_ids) for o in done], tested=engine.stats.tested)
        try:
            import triton  # noqa: F401
            hidden = False
        except ImportError:
            hidden = True
        print(json.dumps(dict(outs=outs, backend=ops.backend(), hidden=hidden,
                              triton_loaded=[m for m in sys.modules if m == "triton" or m.startswith("triton.")])))
        """
    ), env={"TRITON_INTERPRET": "0"})
    assert out["hidden"] and out["triton_loaded"] == [] and out["backend"] == "torch"
    assert out["outs"]["plain"]["lengths"] == [8] * 4 and out["outs"]["plain"]["tested"] == 0
    assert out["outs"]["ngram"]["lengths"] == [8] * 4
    assert out["outs"]["ngram"]["tested"] > 0  # proposals went through rejection verification
