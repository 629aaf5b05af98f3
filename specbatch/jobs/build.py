"""The seam between a job spec and an engine: build_engine and what the worker needs of an engine.

An *engine factory* is a function ``factory(spec) -> LoadedEngine`` named by an import path
``"module:function"`` (default :func:`build_engine`, the real engine; tests name a fake one).
Everything the engine is configured with is decided here, from the spec, once.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

from specbatch.engine.request import Request, SampleOutput
from specbatch.engine.stats import AcceptanceStats, CostModel

if TYPE_CHECKING:
    from specbatch.jobs.spec import JobSpec, TargetSpec

ENGINE_FACTORY = "specbatch.jobs.build:build_engine"


@runtime_checkable
class EngineLike(Protocol):
    """Everything the worker uses of an engine (specbatch.engine.engine.Engine and tests/fake_engine.py).

    stats: cumulative acceptance statistics (the worker records each shard's difference);
    cost_model: the measured cost model, None when the engine measured none;
    gamma, gamma_reason: the proposals per step it runs with now, and why;
    rows_by_proposals, steps_by_shape: cumulative step-shape counters, (batch, proposals) -> count
    of rows and of steps (see Engine.expected_speedup); empty for an engine that keeps none.
    """

    stats: AcceptanceStats
    cost_model: CostModel | None
    gamma: int
    gamma_reason: str
    rows_by_proposals: Mapping[tuple[int, int], int]
    steps_by_shape: Mapping[tuple[int, int], int]

    def generate(self, requests: list[Request]) -> list[SampleOutput]: ...


@dataclasses.dataclass
class LoadedEngine:
    """An engine ready to run, with the prompt encoder that belongs to its tokenizer.

    encode(prompt) -> prompt token ids (chat template applied as the spec says); it raises
    ValueError for a prompt that cannot be encoded, which becomes that row's error.
    description: what was built, for stats.json (device, dtypes, drafter).
    plain: when set, builds a plain-sampling engine (no drafter, no cost model) on the same
    loaded target and tokenizer, for measuring the drafter against plain sampling.
    """

    engine: EngineLike
    encode: Callable[[Any], list[int]]
    description: dict[str, Any] = dataclasses.field(default_factory=dict)
    plain: Callable[[], EngineLike] | None = None


def device_for(spec: JobSpec) -> str:
    """'cuda' when the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else 'cpu'."""
    if spec.resources.gpus_per_actor > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def _cuda_graphs(target_spec: TargetSpec, target: Any, device: str) -> bool:
    """Whether the job's steps run as CUDA graphs: as the spec says, else (null) on a GPU for a
    native model that is not compiled."""
    from specbatch.models.llama import LlamaModel

    if target_spec.cuda_graphs is not None:
        return bool(target_spec.cuda_graphs)
    return device == "cuda" and isinstance(target, LlamaModel) and not target_spec.compile


def build_engine(spec: JobSpec, measure_cost: bool = True) -> LoadedEngine:
    """The real engine for a job spec: target model, tokenizer, drafter, Engine.

    measure_cost False skips the start-up cost model (no expected speedup, no adaptive gamma).
    """
    from specbatch.engine.drafting.factory import build_drafter
    from specbatch.engine.engine import Engine, EngineConfig
    from specbatch.engine.speculation import choose_policy
    from specbatch.models import load_model, load_tokenizer
    from specbatch.models.compile import compile_steps
    from specbatch.models.dtypes import resolve_dtype
    from specbatch.models.llama import LlamaModel
    from specbatch.models.steps import use_static_steps
    from specbatch.engine.tokenization import encode_prompt

    device = device_for(spec)
    target_spec, draft_spec, spec_cfg = spec.models.target, spec.models.draft, spec.speculative
    dtype = resolve_dtype(target_spec.dtype, device)  # 'auto' decided once, here, for the whole engine
    target = load_model(target_spec.path, dtype=dtype, device=device, backend=target_spec.backend)
    if target_spec.compile:
        compile_steps(target)
    graphs = _cuda_graphs(target_spec, target, device)
    if graphs:  # the target's steps are at most gamma + 1 wide
        use_static_steps(target, spec.gamma + 1, spec.resources.max_batch_size, graphs=True)
    tokenizer = load_tokenizer(target_spec.path)
    drafter = build_drafter(
        draft_spec.kind,
        target,
        tokenizer,
        path=draft_spec.path,
        dtype=resolve_dtype(draft_spec.dtype or dtype, device),
        backend=draft_spec.backend,
        min_n=draft_spec.min_n,
        max_n=draft_spec.max_n,
        draft_temperature=spec_cfg.draft_temperature,
        draft_top_k=spec_cfg.draft_top_k,
        draft_top_p=spec_cfg.draft_top_p,
        device=device,
        top_m=draft_spec.top_m,
        max_entries=draft_spec.max_entries,
        scope=draft_spec.scope,
    )
    if graphs and drafter.draft_model is not None and isinstance(drafter.draft_model, LlamaModel):
        # a model drafter's steps: its catch-up feed (1 or 2 tokens) and one token per proposal
        use_static_steps(drafter.draft_model, 2, spec.resources.max_batch_size, graphs=True)
    gamma, auto = spec.gamma, spec.auto_gamma
    points = [params for _, params in spec.sweep_points()]
    # The speculation policy is chosen here, once: off, fixed, adaptive or auto.
    policy = choose_policy(gamma, adaptive=spec_cfg.adaptive_gamma, auto=auto, drafting=draft_spec.kind != "none")
    config = EngineConfig(
        max_batch_size=spec.resources.max_batch_size,
        verification=spec_cfg.verification,
        max_model_len=target_spec.max_model_len,
        measure_cost=measure_cost,
        # the KV plan: prompts held once for their samples, row slots sized for the completions
        samples_per_prompt=max(p.n for p in points),
        max_new_tokens=max(p.max_new_tokens for p in points),
    )
    engine = Engine(target, tokenizer, drafter, config, policy=policy)
    chat_template = spec.input.chat_template

    def encode(prompt: Any) -> list[int]:
        return encode_prompt(tokenizer, prompt, chat_template)

    description = {
        "device": device,
        "target": target_spec.path,
        "dtype": dtype,
        "compiled": target_spec.compile,
        "cuda_graphs": graphs,
        "backend": type(target).__name__,
        "draft": draft_spec.kind if draft_spec.kind != "model" else f"model:{draft_spec.path}",
        "num_draft_tokens": "auto" if auto and gamma else gamma,
    }

    def plain() -> EngineLike:
        return Engine(target, tokenizer, None, dataclasses.replace(config, measure_cost=False), policy=choose_policy(0))

    return LoadedEngine(engine=engine, encode=encode, description=description, plain=plain)


def import_factory(path: str) -> Callable[[Any], LoadedEngine]:
    """Resolve "package.module:function"."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"engine factory must look like 'module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)
