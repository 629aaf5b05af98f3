"""The engine through static steps (the forwards CUDA graphs capture) reproduces plain sampling
from the warped target exactly: harness cases of :mod:`tests.exactness.engine_harness` with the
target's steps, and the model drafter's, run by :class:`specbatch.models.steps.StaticSteps` on
the CPU (the static forward a graph records; attention reads the slot cache in place through
the slot-attention reference). Plain sampling, a model drafter, the n-gram drafter, stops inside
a min_new_tokens run, and more rows than the batch (slot refills) cover what a static step
changes: padding written into the tail, ragged widths, rows linked to shared prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import pytest

from specbatch.models import load_model, load_tokenizer
from specbatch.models.steps import StaticSteps, use_static_steps
from tests.exactness import engine_harness as eh

# The target's steps are at most gamma + 1 wide (the harness's gamma is 3); a model drafter's 2.
TARGET_WIDTH, DRAFT_WIDTH = 4, 2


@functools.lru_cache(maxsize=None)
def static_models(device: str = "cpu") -> eh.TinyModels:
    """The harness's checkpoints loaded again, every model's steps static."""
    paths = eh.tiny_checkpoints()
    models = {}
    for name, path in paths.items():
        model = load_model(path, dtype="float32", device=device)
        use_static_steps(model, TARGET_WIDTH if name in ("target", "eos") else DRAFT_WIDTH, 512, graphs=False)
        models[name] = model
    return eh.TinyModels(models=models, tokenizer=load_tokenizer(paths["target"]))


@dataclasses.dataclass(frozen=True)
class StaticCase(eh.EngineCase):
    """An EngineCase whose models (engine, enumerated distribution, every check) have static steps."""

    def models(self):
        return mock.patch.object(eh, "tiny_models", static_models)


CASES = {name: StaticCase(**{f.name: getattr(eh.CASES[name], f.name) for f in dataclasses.fields(eh.EngineCase)})
         for name in ("plain", "near_draft_warped", "ngram", "min_new_with_stops", "refill")}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_through_static_steps_matches_exact_distribution(name):
    case = CASES[name]
    with case.models():
        run = case.run()
        assert isinstance(run.engine.target.steps, StaticSteps)
        assert run.engine.cache.tail == TARGET_WIDTH
        assert len(run.outputs) == case.params.n * len(case.prompts)
        case.check(run)


def test_a_static_plan_that_ignores_the_prompt_link_fails_the_harness():
    """A broken static forward must fail the same check: rows that read no shared prompt (their
    own tokens taken as the whole context) give another distribution."""
    import torch

    from specbatch.models import steps

    original = steps.StaticPlan.__init__

    def no_prompt_link(self, *args):
        original(self, *args)
        self.prefix_len = torch.zeros_like(self.prefix_len)

    case = CASES["near_draft_warped"]
    with mock.patch.object(steps.StaticPlan, "__init__", no_prompt_link), case.models():
        run = case.run()
        with pytest.raises(AssertionError, match="marginal"):
            case.check(run)
