"""Package-level import rules (docs/design.md, "Import rules").

The rules as folders, read statically from every module's real import statements (ast, lazy
imports inside functions included), so a rule holds on every path, not just the one a test runs:

* ``specbatch/sampling`` imports nothing else of specbatch and no kernels;
* ``specbatch_kernels`` imports only ``specbatch.sampling`` of specbatch;
* ``specbatch/models`` never imports the engine or the jobs;
* ``specbatch/engine`` never imports the jobs (the seam is ``specbatch/jobs/build.py``);
* only ``specbatch/jobs`` and ``specbatch/cli.py`` import Ray;
* no import circles between modules (the imports that run on import: no lazy ones, no
  ``if TYPE_CHECKING:`` ones).

Then, in fresh interpreters:
* importing every kernel module loads no engine, worker or driver, and the engine loads no Ray;
* with Triton absent (hidden by a meta-path finder, as on a platform where it is not installed),
  ``import specbatch`` works and plain sampling and rejection verification run on CPU through the
  public path: ``Engine.generate`` with the n-gram drafter, on the torch reference backend.
"""

from __future__ import annotations

import ast
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


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    # run at import: the module body and its try blocks (not ``if TYPE_CHECKING:``, which never runs)
    top |= {id(n) for node in tree.body if isinstance(node, ast.Try) for n in node.body}
    out = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from pkg import mod" imports pkg.mod when mod is a module of ours
            for a in node.names:
                full = f"{base}.{a.name}"
                is_module = any((ROOT / d / full.replace(".", "/")).with_suffix(".py").exists()
                                or (ROOT / d / full.replace(".", "/")).is_dir() for d in ("", "kernels"))
                out.append((full if is_module else base, node.lineno, id(node) in top))
    return out


MODULES = {_module_name(p): p for p in sorted([*ROOT.glob("specbatch/**/*.py"), *ROOT.glob("kernels/specbatch_kernels/*.py")])}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# (rule, the importing modules it covers, the test a forbidden imported name fails)
RULES = [
    ("sampling imports nothing else of specbatch",
     lambda m: _under(m, "specbatch.sampling"),
     lambda n: (_under(n, "specbatch") and not _under(n, "specbatch.sampling")) or _under(n, "specbatch_kernels")),
    ("the kernels import only specbatch.sampling of specbatch",
     lambda m: _under(m, "specbatch_kernels"),
     lambda n: _under(n, "specbatch") and not _under(n, "specbatch.sampling")),
    ("models never import the engine or the jobs",
     lambda m: _under(m, "specbatch.models"),
     lambda n: _under(n, "specbatch.engine") or _under(n, "specbatch.jobs")),
    ("the engine never imports the jobs",
     lambda m: _under(m, "specbatch.engine"),
     lambda n: _under(n, "specbatch.jobs") or n == "specbatch.cli"),
    ("nothing but the jobs and the cli imports Ray",
     lambda m: not (_under(m, "specbatch.jobs") or m == "specbatch.cli"),
     lambda n: _under(n, "ray")),
]


def test_import_rules_hold_as_folders():
    assert {"specbatch.sampling.warping", "specbatch.engine.engine", "specbatch.jobs.build", "specbatch_kernels.ops",
            "specbatch.models.cache", "specbatch.engine.drafting.factory"} <= set(MODULES)
    broken = []
    for rule, covers, forbidden in RULES:
        for module, path in MODULES.items():
            if covers(module):
                broken += [f"{rule}: {module} imports {name} (line {line})"
                           for name, line, _ in _imports(path) if forbidden(name)]
    assert broken == []


def test_no_import_circles():
    """The imports that run on import form no cycle among specbatch's modules (a package is its __init__)."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for name, _, top in _imports(path):
            if not top:
                continue
            while name and name not in MODULES:  # "from specbatch.jobs.data import X": the package
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_reading_a_spec_loads_no_data_package_and_no_pyarrow():
    out = run_python(textwrap.dedent(
        """
        import json, sys
        from specbatch.jobs.spec import spec_from_dict
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("specbatch.jobs.data", "pyarrow")))))
        """
    ))
    assert out == []


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
