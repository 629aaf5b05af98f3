"""The engine through the transformers backend reproduces plain sampling from the warped target
exactly: the harness of :mod:`tests.exactness.engine_harness` (enumerated distribution,
marginals, pairs, joints, power) on tiny Gemma 3 and Phi-3 checkpoints, with no drafter, a
model drafter (the target's head plus noise), the n-gram drafter and the suffix drafter.

The checkpoints mirror the harness's: V = 16, a target with tied embeddings (it repeats its last
token, so n-gram and suffix proposals get accepted and rejected), a near draft made from it. The
Gemma 3 target has a sliding-window layer whose window (4) the compared positions cross.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import pathlib
import shutil
import tempfile
from unittest import mock

import pytest

from specbatch.models import load_model, load_tokenizer
from specbatch.models.hf_backend import TransformersModel
from tests import tiny
from tests.exactness import engine_harness as eh
from tests.tiny_hf import make_tiny_hf_checkpoint

ARCHS = ("gemma3", "phi3")


@functools.lru_cache(maxsize=None)
def hf_models(arch: str, device: str = "cpu") -> eh.TinyModels:
    """The target and a near draft of one architecture, loaded through the transformers backend
    on ``device`` (the harness's ``tiny_models(device)``)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"specbatch-hf-harness-{arch}-"))
    atexit.register(shutil.rmtree, root, True)
    shape = dict(vocab_size=eh.VOCAB, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    if arch == "gemma3":
        shape["head_dim"] = 8
    target = make_tiny_hf_checkpoint(root / "target", arch, tie_word_embeddings=True, seed=0, **shape)
    paths = {"target": target, "near": tiny.perturbed_copy(target, root / "near", noise=0.25, seed=1)}
    models = {name: load_model(path, dtype="float32", device=device) for name, path in paths.items()}
    assert all(isinstance(m, TransformersModel) for m in models.values())
    return eh.TinyModels(models=models, tokenizer=load_tokenizer(target))


@dataclasses.dataclass(frozen=True)
class HFCase(eh.EngineCase):
    """An EngineCase run on one architecture's tiny checkpoints (see hf_models): inside
    ``models()`` the harness's ``tiny_models`` gives them, so the engine run, the enumerated
    distribution and every other check of the harness use the transformers backend."""

    arch: str = "gemma3"

    def models(self):
        return mock.patch.object(eh, "tiny_models", lambda device="cpu": hf_models(self.arch, device))


N = 2000


def _params(**kw) -> eh.SamplingParams:
    return eh.SamplingParams(**{"seed": 7, "max_new_tokens": 4, **kw})


def _cases(arch: str) -> list[HFCase]:
    return [
        HFCase(f"{arch}-plain", _params(n=N, temperature=0.9, top_k=8), arch=arch),
        HFCase(f"{arch}-model", _params(n=N, temperature=0.8, top_k=10), drafter="near", power_positions=2,
               min_rejections=50, arch=arch),
        HFCase(f"{arch}-ngram", _params(n=N, temperature=0.9, top_k=6), drafter="ngram",
               draft=dict(min_n=1, max_n=3), power_positions=1, min_rejections=50, arch=arch),
        HFCase(f"{arch}-suffix", _params(n=N, temperature=0.9, top_k=12), drafter="suffix",
               draft=dict(top_m=4, min_n=1, max_n=2, max_entries=8), power_positions=1, min_rejections=50,
               prompts=(eh.PROMPT, (1, 12, 3, 14)), max_batch=256, arch=arch),
    ]


CASES = {c.name: c for arch in ARCHS for c in _cases(arch)}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_through_the_transformers_backend_matches_exact_distribution(name):
    case = CASES[name]
    with case.models():
        run = case.run()
        assert isinstance(run.engine.target, TransformersModel)
        assert len(run.outputs) == case.params.n * len(case.prompts)
        case.check(run)
