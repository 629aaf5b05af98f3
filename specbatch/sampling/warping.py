"""Warping: logits -> the distribution a row actually samples from (docs/design.md section 4).

Terms: *warping* turns a row's raw logits into its sampling distribution; the *warped* target
distribution is **p**, the warped draft distribution (what the drafter sampled from) is **q**.
The pipeline, in float32, in this order:

1. ``logit_bias`` (added), then penalties from the row's *history* at that position:
   repetition (prompt + completion so far, transformers' rule: negative logits are multiplied,
   positive ones divided), presence and frequency (completion tokens only, OpenAI's rule:
   subtract ``presence`` once and ``frequency x count``).  Inside a verify window the history
   includes the proposals before the position.
2. ``min_new_tokens``: before the minimum length, EOS and stop token ids get -inf (the
   caller passes that per-position ``ban`` mask).
3. temperature: 0 is greedy (one-hot at the argmax, lowest token id on ties; never divides);
   otherwise logits / T.
4. top-k (k > 0): keep logits >= the k-th largest (ties at the threshold kept).
5. top-p (< 1): on the distribution renormalized after top-k, sorted descending, the
   *crossing token* is the first whose cumulative mass reaches top_p; keep every token whose
   score (logit / T) is >= the crossing token's: the smallest descending set reaching top_p
   plus every token tied with the crossing token (like top-k's ties, and independent of the
   sort's order among equal scores).
6. min-p (> 0): keep tokens whose probability >= min_p x the largest probability.
7. renormalize (softmax over what is kept).

transformers' logits processors, applied in the same order in float32, are the test oracle, with
one deliberate deviation: ``TopPLogitsWarper`` keeps a sort-dependent part of a group of tokens
tied at the crossing, we keep all of it (the oracle restores them; tests/test_sampling.py).
Every parameter is per row, so one call warps a mixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from specbatch.sampling.limits import sampling_problem

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (the `sampling:` block of a job spec)."""

    n: int = 1
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        problem = sampling_problem(vars(self))  # the job spec's limits (specbatch.sampling.limits), one table
        if problem:
            raise ValueError(problem)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _setting(dtype: torch.dtype, off: float) -> Any:
    """A per-row warp setting: its tensor dtype and the value that leaves the logits unchanged."""
    return field(metadata={"dtype": dtype, "off": off})


@dataclass
class WarpParams:
    """Per-row warping parameters as tensors, M rows (one row per (sequence, position)).

    The seven settings below are the one list of warp settings: from_params, neutral, index and
    map (and through them the kernels' host wrapper) go over :data:`WARP_FIELDS`.
    """

    temperature: torch.Tensor = _setting(torch.float32, 1.0)  # [M] float32, 0 = greedy
    top_k: torch.Tensor = _setting(torch.int64, 0)  # [M] int64, 0 = off
    top_p: torch.Tensor = _setting(torch.float32, 1.0)  # [M] float32, 1 = off
    min_p: torch.Tensor = _setting(torch.float32, 0.0)  # [M] float32, 0 = off
    repetition_penalty: torch.Tensor = _setting(torch.float32, 1.0)  # [M] float32, 1 = off
    presence_penalty: torch.Tensor = _setting(torch.float32, 0.0)  # [M] float32, 0 = off
    frequency_penalty: torch.Tensor = _setting(torch.float32, 0.0)  # [M] float32, 0 = off
    logit_bias: list[dict[int, float]] | None = None  # per row, None when no row has one

    @staticmethod
    def from_params(params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> "WarpParams":
        """One row per request's SamplingParams (each setting is a SamplingParams field of the same name)."""
        biases = [dict(p.logit_bias) for p in params]
        return WarpParams(
            **{name: torch.tensor([getattr(p, name) for p in params], dtype=WARP_DTYPES[name], device=device)
               for name in WARP_FIELDS},
            logit_bias=biases if any(biases) else None,
        )

    @staticmethod
    def neutral(rows: int, device: torch.device | str = "cpu", **settings: Any) -> "WarpParams":
        """`rows` rows that leave the logits unchanged, except for `settings` (name -> a number or an [M] tensor)."""
        unknown = set(settings) - set(WARP_FIELDS)
        if unknown:
            raise TypeError(f"not a warp setting: {sorted(unknown)}")

        def column(name: str) -> torch.Tensor:
            value = settings.get(name, WARP_OFF[name])
            if isinstance(value, torch.Tensor):
                return value.to(dtype=WARP_DTYPES[name], device=device)
            return torch.full((rows,), value, dtype=WARP_DTYPES[name], device=device)

        return WarpParams(**{name: column(name) for name in WARP_FIELDS})

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor], logit_bias: Any = ...) -> "WarpParams":
        """fn(name, tensor) applied to each setting; logit_bias kept unless given."""
        return WarpParams(**{name: fn(name, getattr(self, name)) for name in WARP_FIELDS},
                          logit_bias=self.logit_bias if logit_bias is ... else logit_bias)

    def __len__(self) -> int:
        return self.temperature.shape[0]

    def index(self, idx: torch.Tensor) -> "WarpParams":
        """Rows `idx` of these parameters (idx: [M'] int64); used to expand rows to positions."""
        bias = None
        if self.logit_bias is not None:
            bias = [self.logit_bias[i] for i in idx.tolist()]
        return self.map(lambda _, t: t[idx], logit_bias=bias)

    @property
    def any_penalty(self) -> bool:
        return bool(
            (self.repetition_penalty != 1).any()
            or (self.presence_penalty != 0).any()
            or (self.frequency_penalty != 0).any()
        )


_SETTINGS = [f for f in fields(WarpParams) if "dtype" in f.metadata]
WARP_FIELDS: tuple[str, ...] = tuple(f.name for f in _SETTINGS)  # the seven warp settings, in order
WARP_DTYPES: dict[str, torch.dtype] = {f.name: f.metadata["dtype"] for f in _SETTINGS}
WARP_OFF: dict[str, float] = {f.name: f.metadata["off"] for f in _SETTINGS}


@dataclass
class History:
    """Token history of each row at the position being warped, padded with -1.

    prompt_ids: [M, Hp] int64 (repetition penalty only); output_ids: [M, Ho] int64 (completion
    tokens so far, proposals before this position included).
    """

    prompt_ids: torch.Tensor
    output_ids: torch.Tensor


def _token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids: [M, H] int64 padded with -1 -> counts [M, V] float32."""
    m = ids.shape[0]
    counts = torch.zeros(m, vocab_size + 1, dtype=torch.float32, device=ids.device)
    slot = torch.where(ids < 0, torch.full_like(ids, vocab_size), ids)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_bias_and_penalties(
    logits: torch.Tensor, params: WarpParams, history: History | None
) -> torch.Tensor:
    """Step 1 of the pipeline. logits: [M, V] float32 -> [M, V] float32 (new tensor)."""
    logits = logits.to(torch.float32).clone()
    m, v = logits.shape
    if params.logit_bias is not None:
        for row, bias in enumerate(params.logit_bias):
            if bias:
                ids = torch.tensor(list(bias.keys()), dtype=torch.int64, device=logits.device)
                vals = torch.tensor(list(bias.values()), dtype=torch.float32, device=logits.device)
                logits[row, ids] += vals
    if history is None or not params.any_penalty:
        return logits
    out_counts = _token_counts(history.output_ids, v)  # [M, V]
    seen = (out_counts > 0) | (_token_counts(history.prompt_ids, v) > 0)  # [M, V]
    return apply_penalties(logits, out_counts, seen, params.repetition_penalty[:, None],
                           params.presence_penalty[:, None], params.frequency_penalty[:, None])


def apply_penalties(
    logits: torch.Tensor,
    out_counts: torch.Tensor,
    seen: torch.Tensor | None,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """The penalties of step 1 from token counts (any leading shape [..., V], all float32).

    out_counts: [..., V] completion count of each token (proposals before the position
    included); seen: [..., V] bool, in the prompt or the completion, or None when every token
    given is; repetition, presence, frequency: the rows' penalties, broadcastable against
    [..., V] (e.g. [M, 1]).

    The repetition penalty multiplies a negative logit and divides a positive one: of x * r and
    x / r that is the smaller when r >= 1 and the larger when r < 1, so it is picked with a
    minimum between sign-flipped values (exact, and several times cheaper than a select on the
    CPU); r = 1 leaves x unchanged either way.
    """
    flip = 1.0 - 2.0 * (repetition < 1).to(torch.float32)  # [..., 1] +1, or -1 where r < 1
    penalized = flip * torch.minimum(flip * (logits * repetition), flip * (logits / repetition))
    logits = penalized if seen is None else torch.where(seen, penalized, logits)
    logits = logits - frequency * out_counts
    logits = logits - presence * (out_counts > 0).to(torch.float32)
    return logits


# Candidate prefix sizes for the top-p search: most rows of a language model's distribution
# reach top_p within a few dozen tokens, so a partial top-k finds their crossing token at a small
# fraction of a full-vocabulary sort (demo model, 40 rows of 49,152: top-64 1.5 ms, sort 83 ms);
# rows whose crossing lies deeper go to the next size, the last one being the full sort.
TOP_P_PREFIXES = (64, 1024)


def crossing_score(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p threshold: score of the crossing token. scores: [M, V] float32, top_p: [M] -> [M, 1].

    Sorted descending, the *crossing token* is the first whose cumulative probability reaches
    top_p (the last token if rounding leaves the total below top_p).  Top-p keeps every token
    whose score is >= this one's: the crossing token, everything above it and every token tied
    with it, so the kept set does not depend on how a sort orders equal scores.  Scores are
    compared rather than probabilities: exp is monotone, and two distinct scores whose float32
    probabilities happen to round equal are still told apart the same way by every
    implementation (mirror of ``specbatch_kernels.warp.row_distribution``'s top-p search).

    The search runs on descending prefixes of growing size (:data:`TOP_P_PREFIXES`, then the
    whole row): a row is settled by the first prefix whose mass reaches its top_p, and the
    cumulative sums of a prefix are those of the full sort, so every size finds the same token.
    Rows with top_p >= 1 get -inf (keep everything).
    """
    m, v = scores.shape
    out = torch.full((m, 1), NEG_INF, dtype=scores.dtype, device=scores.device)  # [M, 1]
    todo = (top_p < 1).nonzero().squeeze(1)  # [M'] rows still searching
    if todo.numel() == 0:
        return out
    sub = scores[todo]  # [M', V] the rows still searching
    log_z = sub.logsumexp(dim=-1, keepdim=True)  # [M', 1] the normalizer of the full row
    for k in (*[k for k in TOP_P_PREFIXES if k < v], v):
        top = sub.sort(dim=-1, descending=True).values if k == v else sub.topk(k, dim=-1).values  # [M', k]
        cum = (top - log_z).exp().cumsum(dim=-1)  # [M', k] non-decreasing
        below = (cum < top_p[todo, None]).sum(dim=-1, keepdim=True)  # [M', 1] tokens before the crossing
        settled = (below < k).squeeze(1) if k < v else torch.ones_like(todo, dtype=torch.bool)  # [M']
        out[todo[settled]] = top.gather(1, below.clamp(max=k - 1))[settled]
        todo, sub, log_z = todo[~settled], sub[~settled], log_z[~settled]
        if todo.numel() == 0:
            break
    return out


def truncate_and_normalize(logits: torch.Tensor, params: WarpParams) -> torch.Tensor:
    """Steps 3-7 (temperature, top-k, top-p, min-p, renormalize). logits: [M, V] -> probs [M, V].

    Greedy rows (temperature 0) become one-hot at their argmax (first index on ties).
    """
    m, v = logits.shape
    greedy = params.temperature == 0  # [M]
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    scores = logits / temp[:, None]  # [M, V]

    # top-k: keep scores >= the k-th largest (ties kept); k > V keeps everything.
    k = params.top_k.clamp(max=v)
    if bool((k > 0).any()):
        kth_index = (k - 1).clamp(min=0)[:, None]  # [M, 1]
        kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, kth_index)  # [M, 1]
        scores = torch.where((k[:, None] > 0) & (scores < kth), NEG_INF, scores)

    # top-p: descending sort; the crossing token is the first whose cumulative mass reaches top_p;
    # keep every score >= the crossing token's (all tokens tied with it, whatever the sort order).
    top_p = params.top_p
    if bool((top_p < 1).any()):
        scores = torch.where(scores < crossing_score(scores, top_p), NEG_INF, scores)

    # min-p: relative to the largest probability after the steps above.
    min_p = params.min_p
    if bool((min_p > 0).any()):
        probs = scores.softmax(dim=-1)  # [M, V]
        threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < threshold, NEG_INF)

    probs = scores.softmax(dim=-1)  # [M, V]
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs)
        one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def warp(
    logits: torch.Tensor,
    params: WarpParams,
    history: History | None = None,
    ban: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole pipeline. logits: [M, V] (any float dtype) -> probs [M, V] float32.

    ban: [M, V] bool, True where a token is masked for min_new_tokens at this position.
    """
    scores = apply_bias_and_penalties(logits, params, history)
    if ban is not None:
        scores = scores.masked_fill(ban, NEG_INF)
    return truncate_and_normalize(scores, params)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative mass exceeds u x total.

    probs: [M, V] non-negative (need not be normalized), u: [M] in (0, 1) -> tokens [M] int64.
    A token with zero mass is never returned.
    """
    cdf = probs.to(torch.float32).cumsum(dim=-1)  # [M, V]
    target = (u.to(torch.float32) * cdf[:, -1])[:, None]  # [M, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [M]
    # Rounding can put target at the very top; fall back to the last token with mass.
    vocab = torch.arange(probs.shape[-1], device=probs.device)  # [V]
    # where() rather than vocab * mask: an int64 x bool product takes torch's slow mixed-type path (~8x).
    last = torch.where(probs > 0, vocab, 0).amax(dim=-1)  # [M] (0 when no mass)
    return torch.minimum(idx, last)
