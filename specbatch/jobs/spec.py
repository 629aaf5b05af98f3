"""The job spec: one YAML file that says what to sample, from which models, and where to write.

A job spec is validated into a frozen :class:`JobSpec` (pydantic). The field descriptions below
are the reference documentation (``reference_markdown()`` renders them). Validation is strict:
unknown keys are rejected with a did-you-mean, values are never coerced across types (``n: "4"``
is an error, not 4), and every error is one line naming the field path, e.g.
``sampling.top_p: Input should be less than or equal to 1, got 1.5``.

Terms (docs/design.md section 3): the *target* model's distribution is what the output follows exactly;
the *draft* (drafter) proposes ``num_draft_tokens`` tokens per step, cheaply. A *sweep* runs every
prompt at every point of a grid of sampling values (N samples per point); the swept keys become
output columns. The *fingerprint* is a hash of everything that determines the output rows, used
to refuse resuming an output directory written by a different spec.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import pathlib
import re
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specbatch.sampling import limits
from specbatch.engine.speculation import AUTO_MAX_DRAFT_TOKENS
from specbatch.sampling.limits import SAMPLING as _BOUNDS
from specbatch.sampling.warping import SamplingParams


class SpecError(ValueError):
    """A malformed job spec. ``str(e)`` is one line naming the field path or the file."""


_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # NaN, inf: refused


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


# The output row's fixed columns, in order (specbatch.jobs.data.records.OutputRecord checks its
# fields against this on import): named here so that reading a spec loads neither pyarrow nor data/.
OUTPUT_COLUMNS = (
    "id", "sample_index", "prompt", "completion", "completion_token_ids", "num_prompt_tokens", "num_tokens",
    "finish_reason", "stop_reason", "cumulative_logprob", "draft_proposed", "draft_tested", "draft_accepted",
    "target_passes", "error",
)
Location = Annotated[str, AfterValidator(_not_blank)]  # a path or URI of job data (input.path, output.path)


class InputSpec(BaseModel):
    """Where the prompts come from."""

    model_config = _CONFIG

    path: Location = Field(
        description="Parquet input: a file, a directory (every *.parquet below it), or a glob; local, "
        "s3://bucket/key or gs://bucket/key. Relative local paths are taken from the working directory. "
        "Rows are read in a stable order: files sorted by path, then row groups, then rows."
    )
    prompt_column: str = Field(
        "prompt",
        description="Column holding each prompt: a string, or chat messages as a list of {role, content}.",
    )
    id_column: str | None = Field(
        "auto",
        description="Column of unique prompt ids (strings or integers; checked unique). 'auto': the column "
        "'id' if the input has one, else the row index in the stable order; null: always the row index.",
    )
    chat_template: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Apply the target tokenizer's chat template to the prompt. 'auto': for chat-message "
        "prompts always, for text prompts when the tokenizer has a template.",
    )
    keep_columns: list[str] = Field(
        default_factory=list,
        max_length=limits.MAX_KEEP_COLUMNS,
        description="Input columns copied to every output row of the prompt (their Arrow types are kept).",
    )

    @field_validator("chat_template", mode="before")
    @classmethod
    def _chat_template_value(cls, v: Any) -> Any:
        if v is True or v is False or v == "auto":
            return v
        raise ValueError(f"must be true, false or 'auto', got {v!r}")

    @field_validator("keep_columns")
    @classmethod
    def _keep_columns_ok(cls, v: list[str]) -> list[str]:
        clash = sorted(set(v) & set(OUTPUT_COLUMNS))
        if clash:
            raise ValueError(f"{clash[0]!r} is an output column already; rename it or drop it from keep_columns")
        dup = [c for c in v if v.count(c) > 1]
        if dup:
            raise ValueError(f"{dup[0]!r} is listed twice")
        return v


class OutputSpec(BaseModel):
    """Where the samples go."""

    model_config = _CONFIG

    path: Location = Field(
        description="Output directory (local, s3://, gs://). It receives part-NNNNN.parquet shard files and a "
        "__specbatch__/ folder (readers skip it) with their manifests (commit markers), plan.json, spec.json, stats.json. "
        "On a multi-node cluster it must be shared storage."
    )
    if_exists: Literal["resume", "overwrite", "fail"] = Field(
        "resume",
        description="When the directory already holds output: 'resume' keeps committed shards and runs the "
        "rest (refused if a different spec wrote it), 'overwrite' clears it first, 'fail' refuses to start.",
    )


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_DESCRIPTION = (
    "Weight and activation dtype: float32, bfloat16, float16 or 'auto': bfloat16 where the device computes it "
    "natively (CUDA GPUs from Ampere on; CPUs with AVX-512 or AMX), else float16 on older GPUs and float32 on CPUs "
    "without native bfloat16 (where bfloat16 matmuls run tens of times slower). stats.json names the one chosen."
)
Backend = Literal["auto", "native", "transformers"]
BACKEND_DESCRIPTION = (
    "Which code runs the model's forward: 'native' (specbatch's own, fastest; Llama, Mistral, Qwen2, Qwen3), "
    "'transformers' (the checkpoint's own transformers class with specbatch's attention over the slot cache; any "
    "decoder-only architecture whose transformers code supports the attention interface) or 'auto' (native for "
    "the Llama family, transformers otherwise)."
)


class TargetSpec(BaseModel):
    """The model whose distribution the samples follow exactly."""

    model_config = _CONFIG

    path: str = Field(description="A local Hugging Face checkpoint directory, or a model name known to `specbatch models`.")
    dtype: Dtype = Field("auto", description=DTYPE_DESCRIPTION)
    backend: Backend = Field("auto", description=BACKEND_DESCRIPTION)
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + completion a row may reach, in tokens; null: the model's own limit."
    )
    compile: bool = Field(
        False,
        description="Run the target's decode and verify steps through torch.compile (dynamic shapes, frozen weights; "
        "prefill stays eager). Faster steps after minutes of compilation per kind of step at start-up, so worth it "
        "on long jobs only. Compiled logits round slightly differently from eager ones: the rows differ from an "
        "uncompiled run's, and a shard retried on another actor may differ too (kernels are autotuned per process); "
        "the distribution contract holds either way.",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="Run decode and verify steps (the target's and a model drafter's) as static forwards captured "
        "in CUDA graphs, one per batch size bucket and step width, captured the first time each shape runs, and "
        "replayed: a step of a small model on a GPU is otherwise bound by kernel launches. null: on where the actor "
        "has a GPU and the model runs on the native backend (not with compile), off otherwise; true needs "
        "resources.gpus_per_actor > 0. Graphed logits round differently from eager ones (attention reads the cache "
        "in place); the distribution contract holds either way.",
    )


class DraftSpec(BaseModel):
    """What proposes tokens for the target to verify."""

    model_config = _CONFIG

    kind: Literal["none", "ngram", "model", "suffix"] = Field(
        "ngram",
        description="'none': plain sampling; 'ngram': proposes the continuation of the latest earlier match of "
        "the row's last min_n..max_n tokens in its own prompt + completion (free, deterministic); 'model': a "
        "smaller model sharing the target's tokenizer; 'suffix': sibling drafting, samples proposals from the "
        "target's own next-token distributions (top_m of each) cached by the last min_n..max_n tokens from every "
        "verification pass and shared by the samples of a prompt; n-gram lookup where the cache misses.",
    )
    path: str | None = Field(None, description="kind 'model' only: the draft checkpoint (like models.target.path).")
    dtype: Dtype | None = Field(None, description="kind 'model' only: the draft's dtype; null: the target's.")
    backend: Backend = Field("auto", description="kind 'model' only: like models.target.backend, for the draft.")
    min_n: int = Field(1, ge=1, description="kinds 'ngram' and 'suffix': shortest suffix to match.")
    max_n: int = Field(3, ge=1, description="kinds 'ngram' and 'suffix': longest suffix to match (tried first).")
    top_m: int = Field(8, ge=1, le=1024, description="kind 'suffix' only: tokens kept per cached distribution (renormalized).")
    max_entries: int = Field(
        65536, ge=1,
        description="kind 'suffix' only: the cache bound, in entries of top_m tokens each (about "
        "max_entries x (16 x top_m + 200) bytes); the least recently used entry is evicted beyond it.",
    )
    scope: Literal["request", "shard"] = Field(
        "request",
        description="kind 'suffix' only: 'request': the samples of one prompt share entries, dropped when its last "
        "sample finishes; 'shard': every prompt of the actor shares entries (keyed by the warping settings too). "
        "Still exact, but a row's tokens then depend on its siblings' (and earlier prompts'), so a retried shard "
        "may differ from an uninterrupted run (each is still an exact sample).",
    )

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "DraftSpec":
        given = self.model_fields_set
        if self.kind == "model":
            if not self.path:
                raise ValueError("path: required when kind is 'model'")
        else:
            for name in ("path", "dtype"):
                if name in given and getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for kind 'model', not {self.kind!r}")
            if "backend" in given and self.backend != "auto":
                raise ValueError(f"backend: only for kind 'model', not {self.kind!r}")
        if self.kind not in ("ngram", "suffix"):
            for name in ("min_n", "max_n"):
                if name in given and getattr(self, name) != DraftSpec.model_fields[name].default:
                    raise ValueError(f"{name}: only for kinds 'ngram' and 'suffix', not {self.kind!r}")
        if self.kind != "suffix":
            for name in ("top_m", "max_entries", "scope"):
                if name in given and getattr(self, name) != DraftSpec.model_fields[name].default:
                    raise ValueError(f"{name}: only for kind 'suffix', not {self.kind!r}")
        if self.min_n > self.max_n:
            raise ValueError(f"min_n: must be <= max_n ({self.max_n}), got {self.min_n}")
        return self


class ModelsSpec(BaseModel):
    model_config = _CONFIG

    target: TargetSpec = Field(description="The target model.")
    draft: DraftSpec = Field(default_factory=DraftSpec, description="The drafter.")


class SamplingSpec(BaseModel):
    """How each sample is drawn from the target (docs/design.md section 4: warping order is fixed)."""

    model_config = _CONFIG

    n: int = Field(1, **_BOUNDS["n"].field_kwargs(), description="Samples per prompt (per sweep point).")
    max_new_tokens: int = Field(
        256, **_BOUNDS["max_new_tokens"].field_kwargs(),
        description="Most tokens generated per sample (at most the target's context: max_model_len or max_position_embeddings).",
    )
    min_new_tokens: int = Field(0, **_BOUNDS["min_new_tokens"].field_kwargs(), description="EOS and stop token ids are masked before this many tokens.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (until max_new_tokens or a stop).")
    temperature: float = Field(1.0, **_BOUNDS["temperature"].field_kwargs(), description="0: greedy (argmax, lowest id on ties); else logits / T.")
    top_k: int = Field(0, **_BOUNDS["top_k"].field_kwargs(), description="Keep tokens whose logit is >= the k-th largest (ties kept); 0: off.")
    top_p: float = Field(1.0, **_BOUNDS["top_p"].field_kwargs(), description="Keep the most likely tokens down to the crossing token (the first whose cumulative mass, in descending order, reaches top_p) and every token tied with it; 1: off.")
    min_p: float = Field(0.0, **_BOUNDS["min_p"].field_kwargs(), description="Keep tokens with probability >= min_p x the largest; 0: off.")
    repetition_penalty: float = Field(
        1.0, **_BOUNDS["repetition_penalty"].field_kwargs(), description="Logits of tokens seen in prompt or completion: divided if positive, multiplied if negative; 1: off."
    )
    presence_penalty: float = Field(0.0, description="Subtracted once from the logit of every token already in the completion.")
    frequency_penalty: float = Field(0.0, description="Subtracted per occurrence of a token in the completion.")
    logit_bias: dict[int, float] = Field(
        default_factory=dict, max_length=limits.MAX_LOGIT_BIAS,
        description="Token id (within the target's vocabulary) -> finite value added to its logit first.",
    )
    stop: list[str] = Field(
        default_factory=list, max_length=limits.MAX_STOPS,
        description="Stop strings: the completion is cut before the first match.",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, max_length=limits.MAX_STOPS,
        description="Token ids (within the target's vocabulary) that end a sample, like EOS.",
    )
    seed: int = Field(0, ge=0, description="Job seed: every random number is a function of (seed, id, sample index, position, role).")

    @model_validator(mode="after")
    def _within_limits(self) -> "SamplingSpec":
        problem = limits.sampling_problem(self.model_dump())  # the table SamplingParams checks too
        if problem:
            raise ValueError(problem)
        if any(s == "" for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")
        return self

    def to_params(self) -> SamplingParams:
        d = self.model_dump()
        d["stop"] = tuple(d["stop"])
        d["stop_token_ids"] = tuple(d["stop_token_ids"])
        return SamplingParams(**d)


class SpeculativeSpec(BaseModel):
    """How the draft's proposals are made and verified."""

    model_config = _CONFIG

    num_draft_tokens: Union[Literal["auto"], int] = Field(
        4,
        description="gamma: proposals per row per step; 0: plain sampling. 'auto': each row's count (0 to "
        f"{AUTO_MAX_DRAFT_TOKENS}) is chosen every step from the drafter's confidence, the row's measured acceptance "
        "and the step costs measured on the job's own steps (the start-up cost model until then), so a batch mixes "
        "speculating and plain rows (adaptive_gamma is "
        "then not used); stats.json counts row-steps by chosen count and rule.",
    )
    draft_temperature: float | None = Field(
        None, ge=0, description="Temperature the draft samples its proposals at (q); null: the target's."
    )
    draft_top_k: int = Field(0, ge=0, description="top-k of the draft's q; 0: off.")
    draft_top_p: float = Field(1.0, gt=0, le=1, description="top-p of the draft's q; 1: off.")
    verification: Literal["rejection", "coupled"] = Field(
        "rejection",
        description="'rejection': accept x iff u q(x) < p(x), else a recovered token from norm(max(p - q, 0)). "
        "'coupled': shared Gumbel noise, the output is token-for-token that of plain sampling with the same seed.",
    )
    adaptive_gamma: bool = Field(
        False,
        description="Choose gamma (0..num_draft_tokens) from the measured acceptance rate and the cost model "
        "measured at start-up; gamma 0 (plain sampling) where speculation is measured to lose. Still exact, but a "
        "row's tokens then depend on what ran before it on its actor, so a resumed or retried shard may differ "
        "from an uninterrupted run (each is still an exact sample).",
    )

    @field_validator("num_draft_tokens", mode="before")
    @classmethod
    def _num_draft_tokens_value(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limits.MAX_DRAFT_TOKENS):
            return v
        raise ValueError(f"must be 'auto' or an integer in 0..{limits.MAX_DRAFT_TOKENS}, got {v!r}")


class ResourcesSpec(BaseModel):
    """How the job is spread over the machine or cluster. Changes here never change the output rows."""

    model_config = _CONFIG

    actors: Union[Literal["auto"], int] = Field(
        "auto", description="Worker actors, each building one engine. 'auto': one per GPU in the cluster, or one on a CPU-only machine."
    )
    gpus_per_actor: float = Field(1, ge=0, description="GPUs per actor (fractions share a GPU); 0: run on CPU.")
    cpus_per_actor: int = Field(1, ge=1, le=limits.MAX_CPUS_PER_ACTOR, description="CPUs per actor; on CPU this is also the actor's torch thread count.")
    max_batch_size: int = Field(32, ge=1, description="Most rows (prompt, sample) decoded together by one engine.")
    shard_rows: int = Field(256, ge=1, description="Prompts per shard (shards follow Parquet row groups; planned once into __specbatch__/plan.json).")
    max_attempts: int = Field(3, ge=1, description="Attempts per shard before it is split to isolate failing rows.")

    @field_validator("actors", mode="before")
    @classmethod
    def _actors_value(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limits.MAX_ACTORS):
            return v
        raise ValueError(f"must be 'auto' or an integer in [1, {limits.MAX_ACTORS}], got {v!r}")


# Sampling fields a sweep may vary: scalars only, each becomes an output column of its type.
SWEEPABLE = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens", "min_new_tokens", "ignore_eos", "seed",
)



class JobSpec(BaseModel):
    """A whole job: input, output, models, sampling, speculation, resources and an optional sweep."""

    model_config = _CONFIG

    name: str = Field(description="Job name, shown in logs and stats.json.")
    input: InputSpec = Field(description="The prompt dataset.")
    output: OutputSpec = Field(description="The output dataset.")
    models: ModelsSpec = Field(description="Target and draft models.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling settings (the target's warping).")
    speculative: SpeculativeSpec = Field(default_factory=SpeculativeSpec, description="Speculative decoding settings.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Actors and batching.")
    sweep: dict[str, Annotated[list[Any], Field(max_length=limits.MAX_SWEEP_VALUES)]] | None = Field(
        None,
        description="Optional grid over sampling fields, e.g. {temperature: [0.5, 1.0]}: every prompt runs at every "
        "point (the cartesian product, keys in the order given), n samples each; swept keys become output columns.",
    )

    @field_validator("sweep")
    @classmethod
    def _sweep_floats(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        """Integers given for float fields become floats, so [0, 1] and [0.0, 1.0] are one sweep
        (same fingerprint, same request ids, same output column values)."""
        if not v:
            return v
        out = {}
        for key, values in v.items():
            field = SamplingSpec.model_fields.get(key)
            if field is not None and field.annotation is float and isinstance(values, list):
                values = [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in values]
            out[key] = values
        return out

    @model_validator(mode="after")
    def _cuda_graphs_ok(self) -> "JobSpec":
        target = self.models.target
        if target.cuda_graphs and self.resources.gpus_per_actor <= 0:
            raise ValueError("models.target.cuda_graphs: true needs a GPU per actor (resources.gpus_per_actor > 0)")
        if target.cuda_graphs and target.compile:
            raise ValueError("models.target.cuda_graphs: true and models.target.compile: true exclude each other; "
                             "choose one")
        return self

    @model_validator(mode="after")
    def _sweep_ok(self) -> "JobSpec":
        if not self.sweep:
            return self
        base = self.sampling.model_dump()
        for key, values in self.sweep.items():
            if key not in SWEEPABLE:
                raise ValueError(f"sweep.{key}: not a sweepable sampling field{_did_you_mean(key, SWEEPABLE)}")
            if not values:
                raise ValueError(f"sweep.{key}: needs at least one value")
            if key in self.input.keep_columns:
                raise ValueError(f"sweep.{key}: also in input.keep_columns; an output column cannot be both")
            for i, value in enumerate(values):
                if isinstance(value, (list, dict)):
                    raise ValueError(f"sweep.{key}[{i}]: expected a single value, got a {type(value).__name__}")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"sweep.{key}: values must be distinct, got {values}")
            for i, value in enumerate(values):
                try:
                    SamplingSpec(**{**base, key: value})
                except ValidationError as e:
                    err = e.errors()[0]
                    raise ValueError(f"sweep.{key}[{i}]: {_first_message(err)}") from None
        points = math.prod(len(values) for values in self.sweep.values())
        if points > limits.MAX_SWEEP_POINTS:
            raise ValueError(f"sweep: {points} points, at most {limits.MAX_SWEEP_POINTS} allowed")
        return self

    @property
    def auto_gamma(self) -> bool:
        """True when each row chooses its own proposal count every step (num_draft_tokens: auto)."""
        return self.speculative.num_draft_tokens == "auto" and self.models.draft.kind != "none"

    @property
    def gamma(self) -> int:
        """The configured gamma: speculative.num_draft_tokens (for auto, the most proposals a row
        may choose), or 0 when there is no drafter (models.draft.kind none). An adaptive engine
        may then run with less."""
        if self.models.draft.kind == "none":
            return 0
        return AUTO_MAX_DRAFT_TOKENS if self.auto_gamma else self.speculative.num_draft_tokens

    def sweep_points(self) -> list[tuple[dict[str, Any], SamplingParams]]:
        """Every (point, params): [({}, params)] without a sweep; else the grid in key order."""
        if not self.sweep:
            return [({}, self.sampling.to_params())]
        keys = list(self.sweep)
        base = self.sampling.model_dump()
        points = []
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            point = dict(zip(keys, combo))
            points.append((point, SamplingSpec(**{**base, **point}).to_params()))
        return points

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of what determines the output rows.

        Excluded: name, output (where and how, not what), resources (how many actors and how
        batched; the shard plan is persisted separately in __specbatch__/plan.json).
        """
        d = self.model_dump(mode="json", exclude={"name", "output", "resources"})
        for role in ("target", "draft"):  # the default backend keeps the fingerprints of specs written before it
            if d["models"][role].get("backend") == "auto":
                del d["models"][role]["backend"]
        if d["models"]["target"].get("cuda_graphs") is None:  # so does the default cuda_graphs
            d["models"]["target"].pop("cuda_graphs", None)
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for stats.json and spec.json)."""
        return self.model_dump(mode="json")

    def model_dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def point_key(point: Mapping[str, Any]) -> str:
    """Canonical text of a sweep point ('' without a sweep), for request ids and logs."""
    if not point:
        return ""
    return json.dumps(dict(point), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Loading


class _AliasBomb(Exception):
    """A document whose aliases expand beyond limits.MAX_YAML_ALIAS_NODES, or refer to themselves.
    ``field``: the dotted path to where it happens ('' for the whole document)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field, self.problem = field, problem


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last),
    and a document whose aliases expand too far (a "billion laughs" bomb) before building it."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_alias_expansion(node)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_alias_expansion(root: yaml.Node) -> None:
    """Refuse a composed document that expands to more than limits.MAX_YAML_ALIAS_NODES nodes
    beyond its distinct ones (an alias reuses its anchor's node: the document is a graph whose
    tree, what every consumer walks, can be exponentially larger), or that contains itself.

    Iterative depth-first walk: ``sizes[id(node)]`` is None while the node is on the current
    path (an alias back to it is a cycle), then its expanded size (nodes in its tree).
    """
    sizes: dict[int, int | None] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(k)] or 0 for k in _children(node))
            continue
        if id(node) in sizes:
            continue
        sizes[id(node)] = None
        stack.append((node, True))
        for child in _children(node):
            if id(child) in sizes and sizes[id(child)] is None:
                raise _AliasBomb("", f"line {child.start_mark.line + 1}: a YAML alias refers to a node that contains it")
            stack.append((child, False))
    extra = sizes[id(root)] - len(sizes)
    if extra > limits.MAX_YAML_ALIAS_NODES:
        raise _AliasBomb(
            _heaviest_path(root, sizes),
            f"YAML aliases expand to {extra} more values, at most {limits.MAX_YAML_ALIAS_NODES} allowed",
        )


def _heaviest_path(root: yaml.Node, sizes: Mapping[int, int | None]) -> str:
    """The dotted field path down the mappings to the largest expanded value (names the field)."""
    parts: list[str] = []
    node = root
    while isinstance(node, yaml.MappingNode) and node.value:
        key, value = max(node.value, key=lambda pair: sizes.get(id(pair[1])) or 0)
        parts.append(str(key.value) if isinstance(key, yaml.ScalarNode) else "?")
        node = value
    return ".".join(parts)


def _load_yaml(text: str) -> Any:
    """Plain data from YAML text (safe loader, unique keys, bounded alias expansion)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_spec(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML job spec (safe loader), apply ``key.path=value`` overrides, validate.

    Override values are parsed as YAML scalars (``0.5`` a float, ``null`` None, ``[a, b]`` a
    list). Raises :class:`SpecError` with one line naming the file or field.
    """
    path = pathlib.Path(path)
    text = read_bounded(path)
    try:
        data = _load_yaml(text)  # a SafeLoader: plain data only
    except _AliasBomb as e:
        raise SpecError(f"{path}: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        raise SpecError(f"{path}: {_scalar_problem(e)}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}{where}: YAML syntax error: {_one_line(problem)}") from None
    if data is None:
        raise SpecError(f"{path}: empty file, expected a mapping with name, input, output, models")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        data = apply_override(data, item)
    return spec_from_dict(data)


def read_bounded(path: pathlib.Path, limit: int = limits.MAX_SPEC_BYTES) -> str:
    """The text of a small YAML file, reading at most `limit` + 1 bytes (a device such as
    /dev/zero, or a huge file, is refused, never read whole). SpecError (one line) otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, expected a YAML file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {_one_line(str(e))}") from None
    if len(raw) > limit:
        raise SpecError(f"{path}: larger than {limit} bytes, not a job spec")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: cannot read: {_one_line(str(e))}") from None


def _scalar_problem(e: ValueError) -> str:
    """One phrase for a scalar PyYAML could not convert (an over-long integer literal)."""
    text = _one_line(str(e))
    if "digits" in text:
        return f"a number is too long ({text})"
    return f"a value does not convert: {text[:200]}"


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Return a copy of data with ``a.b.c=value`` set (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise SpecError(f"--set {item!r}: expected key.path=value, e.g. sampling.temperature=0.7")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _AliasBomb as e:
        raise SpecError(f"--set {'.'.join(filter(None, (key, e.field)))}: {e.problem}") from None
    except ValueError as e:
        raise SpecError(f"--set {key}: {_scalar_problem(e)}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"--set {item!r}: value is not valid YAML: {_one_line(getattr(e, 'problem', None) or str(e))}") from None
    out = _deep_copy(data)
    node = out
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError(f"--set {item!r}: {where} is not a mapping")
        node = child
    node[parts[-1]] = value
    return out


def spec_from_dict(data: Mapping[str, Any]) -> JobSpec:
    """Validate a plain dict into a JobSpec, raising SpecError (one line)."""
    _check_keys(JobSpec, data, ())
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e.errors()[0])) from None


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _check_keys(model: type[BaseModel], data: Any, loc: tuple[str, ...]) -> None:
    """Reject unknown keys anywhere, with a did-you-mean, before pydantic sees them."""
    if not isinstance(data, Mapping):
        return
    fields = model.model_fields
    for key in data:
        where = ".".join(loc + (str(key),))
        if not isinstance(key, str):
            raise SpecError(f"{where}: keys must be strings, got {type(key).__name__}")
        if key not in fields:
            raise SpecError(f"{where}: unknown field{_did_you_mean(key, list(fields))}")
        annotation = fields[key].annotation
        sub = _model_in(annotation)
        if sub is not None:
            _check_keys(sub, data[key], loc + (key,))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(choices)})"


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def _first_message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    if "input" in err and err.get("type") not in ("missing",):
        got = err["input"]
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{msg}, got {shown}"
    return msg


def _format_error(err: Mapping[str, Any]) -> str:
    """pydantic error -> 'field.path: message, got value' (one line)."""
    loc = []
    for part in err.get("loc", ()):
        if isinstance(part, int):
            loc.append(f"[{part}]")
        elif part in ("[key]", "function-after", "literal['auto']", "int", "bool", "str", "none"):
            # Union branch tags add nothing for the reader.
            continue
        else:
            loc.append(("." if loc else "") + str(part))
    path = "".join(loc)
    if err.get("type") == "missing":
        return _one_line(f"{path}: required field is missing")
    msg = _first_message(err)
    if err.get("type") == "literal_error" and isinstance(err.get("input"), str):
        expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(err["input"], expected, n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    # A model-level validator names its own field ("min_n: ..."): join it to the path.
    if err.get("type") == "value_error" and ":" in msg.split(" ")[0]:
        return _one_line(f"{path + '.' if path else ''}{msg}")
    return _one_line(f"{path}: {msg}" if path else msg)


def reference_markdown() -> str:
    """The spec reference (every field with its type, default and description) as Markdown."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            sub = _model_in(info.annotation)
            full = f"{prefix}{name}"
            if info.is_required():
                default = "required"
            else:
                value = info.get_default(call_default_factory=True)
                default = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
            if sub is not None:
                lines.append(f"- `{full}`: {info.description or ''}")
                walk(sub, full + ".")
            else:
                lines.append(f"- `{full}` (default {default}): {info.description or ''}")

    walk(JobSpec, "")
    return "\n".join(lines) + "\n"
