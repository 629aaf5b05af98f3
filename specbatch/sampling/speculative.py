"""Reference verifier for exact speculative sampling, in pure torch (docs/design.md section 4).

One *step* of one row: the drafter offered ``proposed`` tokens x_0 .. x_{proposed-1}, sampled
from q_0 .. q_{proposed-1}; the target scored the same prefix, giving p_0 .. p_{proposed}
(one more position than proposals).  For i = 0, 1, ... in order:

* the proposal is **tested**: accepted iff ``u_i * q_i(x_i) < p_i(x_i)`` (u_i uniform in (0, 1));
* at the first rejection j, a **recovered** token is drawn from norm(max(p_j - q_j, 0)), or from
  p_j where that residual has no mass, and the step ends;
* if every proposal is **accepted**, a **bonus** token is drawn from p_{proposed}.

So each step emits accepted + 1 tokens.  Proposals after the first rejection are *untested*.
The output follows p exactly whatever q is, provided q is exactly what the drafter sampled from.
A deterministic drafter has a one-hot q (pass ``draft_probs=None``).  Greedy rows need no special
case: their p is one-hot at the argmax, so they accept iff x_i is the argmax and emit it otherwise.

Random numbers come from :mod:`specbatch.sampling.rng`: the acceptance test at completion position t uses
role ACCEPT, the recovered token role RESIDUAL and the bonus token role SAMPLE, all at t.

Coupled verification (:func:`verify_coupled`) is the opt-in alternative: the token at each
position is argmax(log p + G) with Gumbel noise G keyed like every other draw; a proposal is
accepted iff it equals that choice.

The function is split into small building blocks (acceptance test, residual, sampling) so that
each is readable on its own and the exactness tests can break exactly one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specbatch.sampling import rng
from specbatch.sampling.warping import sample_from_probs


@dataclass
class VerifyResult:
    """What one verification step decided, per row (R rows, G = max proposals)."""

    tokens: torch.Tensor  # [R, G+1] int64: emitted tokens, -1 after num_emitted
    num_emitted: torch.Tensor  # [R] int64: accepted + 1 (fewer after a stop cut)
    num_tested: torch.Tensor  # [R] int64: proposals that reached the acceptance test
    num_accepted: torch.Tensor  # [R] int64: tested and kept
    num_proposed: torch.Tensor  # [R] int64

    def position_counts(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tested, accepted) per proposal position: two [width] int64 tensors summed over rows."""
        pos = torch.arange(width, device=self.num_tested.device)[None, :]  # [1, width]
        tested = (pos < self.num_tested[:, None]).sum(0)
        accepted = (pos < self.num_accepted[:, None]).sum(0)
        return tested, accepted


def acceptance_test(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """accept iff u * q(x) < p(x), no division. All [R, G] float32 -> [R, G] bool."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), falling back to p where that has no mass. p, q: [R, V] -> [R, V] (unnormalized)."""
    diff = (p - q).clamp(min=0)
    empty = diff.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, p, diff)


def first_rejection(accepted: torch.Tensor, num_proposed: torch.Tensor) -> torch.Tensor:
    """Number of leading accepted proposals. accepted: [R, G] bool, num_proposed: [R] -> [R] int64."""
    g = accepted.shape[1]
    live = torch.arange(g, device=accepted.device)[None, :] < num_proposed[:, None]
    return (accepted & live).to(torch.int64).cumprod(dim=1).sum(dim=1)


def _gather_token_probs(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """probs: [R, G, V], tokens: [R, G] (may hold -1 padding) -> probs[r, i, tokens[r, i]]: [R, G]."""
    return probs.gather(2, tokens.clamp(min=0)[..., None]).squeeze(-1)


def verify(
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
) -> VerifyResult:
    """Verify one step for R rows with ragged proposals.

    draft_tokens:  [R, G] int64, proposals (entries at i >= num_proposed[r] are ignored)
    num_proposed:  [R] int64 in 0..G
    target_probs:  [R, G+1, V] float32, warped p at each proposal position and the bonus position
    draft_probs:   [R, G, V] float32 q the proposals were sampled from, or None for one-hot q
    key, sample_index: [R] int64, the rows' random-number keys (see specbatch.sampling.rng)
    position:      [R] int64, completion position of the first proposal (tokens emitted so far)
    """
    r, g = draft_tokens.shape
    assert target_probs.shape[:2] == (r, g + 1), (target_probs.shape, draft_tokens.shape)
    v = target_probs.shape[-1]
    rows = torch.arange(r, device=draft_tokens.device)
    offsets = torch.arange(g, device=draft_tokens.device)[None, :]  # [1, G]

    # 1. acceptance test at every proposal position (positions past the first rejection are ignored).
    if g:
        p_x = _gather_token_probs(target_probs[:, :g], draft_tokens)  # [R, G]
        q_x = torch.ones_like(p_x) if draft_probs is None else _gather_token_probs(draft_probs, draft_tokens)
        u_accept = rng.uniform(key[:, None], sample_index[:, None], position[:, None] + offsets, rng.Role.ACCEPT)
        n_acc = first_rejection(acceptance_test(p_x, q_x, u_accept), num_proposed)  # [R]
    else:  # a plain step tests nothing: no acceptance uniforms to draw (they would be an empty [R, 0])
        n_acc = torch.zeros(r, dtype=torch.int64, device=draft_tokens.device)
    rejected = n_acc < num_proposed  # [R]

    # 2. the extra token at position n_acc: recovered (after a rejection) or bonus (all accepted).
    p_next = target_probs[rows, n_acc]  # [R, V]
    extra_probs = p_next  # [R, V]: p for bonus rows (residual(p, 0) is p exactly)
    if g and bool(rejected.any()):  # plain steps (g = 0) and all-accepted steps skip this
        j = n_acc.clamp(max=g - 1)  # a rejection happened at j = n_acc < proposed
        if draft_probs is None:
            q_next = torch.zeros_like(p_next)
            q_next[rows, draft_tokens[rows, j].clamp(min=0)] = 1.0
        else:
            q_next = draft_probs[rows, j]
        q_next = torch.where(rejected[:, None], q_next, torch.zeros_like(q_next))
        extra_probs = residual(p_next, q_next)
    role = torch.where(rejected, int(rng.Role.RESIDUAL), int(rng.Role.SAMPLE))  # [R]
    u_extra = rng.uniform(key, sample_index, position + n_acc, role)  # [R]
    extra = sample_from_probs(extra_probs, u_extra)  # [R]

    # 3. assemble: accepted prefix, then the extra token, -1 after.
    tokens = torch.full((r, g + 1), -1, dtype=torch.int64, device=draft_tokens.device)
    if g:
        keep = offsets < n_acc[:, None]
        tokens[:, :g] = torch.where(keep, draft_tokens, tokens[:, :g])
    tokens[rows, n_acc] = extra
    assert extra.numel() == 0 or int(extra.max()) < v
    return accepted_run(tokens, n_acc, num_proposed)


def accepted_run(tokens: torch.Tensor, n_acc: torch.Tensor, num_proposed: torch.Tensor) -> VerifyResult:
    """The result of a step whose rows accepted their first n_acc proposals and emitted one more.

    tokens: [R, G+1] int64 (-1 after the run); n_acc, num_proposed: [R] int64.  A row with
    n_acc < num_proposed was rejected at n_acc (that proposal was tested too).
    """
    rejected = n_acc < num_proposed  # [R]
    return VerifyResult(
        tokens=tokens,
        num_emitted=n_acc + 1,
        num_tested=n_acc + rejected.to(torch.int64),
        num_accepted=n_acc,
        num_proposed=num_proposed.clone(),
    )


def emitted_logprobs(p: torch.Tensor, result: VerifyResult) -> torch.Tensor:
    """log p(token) at each emitted position, 0 after the run. p: [R, G+1, V] -> [R, G+1]."""
    width = p.shape[1]
    emitted = torch.arange(width, device=p.device)[None, :] < result.num_emitted[:, None]  # [R, G+1]
    p_tok = p.gather(2, result.tokens.clamp(min=0)[..., None]).squeeze(-1)  # [R, G+1]
    return torch.where(emitted, p_tok.log(), torch.zeros_like(p_tok))


def verify_coupled(
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    target_probs: torch.Tensor,
    key: torch.Tensor,
    sample_index: torch.Tensor,
    position: torch.Tensor,
) -> VerifyResult:
    """Coupled verification: the token at each position is argmax(log p + Gumbel).

    Shapes as in :func:`verify`.  The drafter must have proposed argmax(log q + Gumbel) with the
    same noise; then the output is token for token that of plain sampling with the same seed.
    """
    r, g = draft_tokens.shape
    v = target_probs.shape[-1]
    pos = position[:, None] + torch.arange(g + 1, device=draft_tokens.device)[None, :]  # [R, G+1]
    noise = rng.gumbel(
        key.repeat_interleave(g + 1), sample_index.repeat_interleave(g + 1), pos.reshape(-1), v
    ).view(r, g + 1, v)
    choice = coupled_choice(target_probs, noise)  # [R, G+1]
    n_acc = first_rejection(draft_tokens == choice[:, :g], num_proposed)
    offsets = torch.arange(g + 1, device=draft_tokens.device)[None, :]
    tokens = torch.where(offsets <= n_acc[:, None], choice, torch.full_like(choice, -1))
    return accepted_run(tokens, n_acc, num_proposed)


def coupled_choice(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(log probs + noise) over the last dim; zero-probability tokens are never chosen."""
    return (probs.log() + noise).argmax(dim=-1)


def cut(result: VerifyResult, keep: torch.Tensor) -> VerifyResult:
    """Cut each row's emitted run to at most ``keep`` tokens (a stop fell inside the run).

    Tokens after the cut are never emitted or counted; proposals after it are not tested.
    keep: [R] int64 >= 1.
    """
    keep = torch.minimum(keep, result.num_emitted)
    tokens = result.tokens.clone()
    tokens[torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= keep[:, None]] = -1
    return VerifyResult(
        tokens=tokens,
        num_emitted=keep,
        num_tested=torch.minimum(result.num_tested, keep),
        num_accepted=torch.minimum(result.num_accepted, keep),
        num_proposed=result.num_proposed,
    )


def stop_cut(tokens: torch.Tensor, num_emitted: torch.Tensor, is_stop: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """How many emitted tokens to keep: up to and including the first stop token, and at most budget.

    tokens: [R, W] int64, num_emitted: [R], is_stop: [R, W] bool (token is EOS / a stop id for
    that row), budget: [R] tokens the row may still emit (max_new_tokens - emitted so far).
    Returns keep: [R] int64.
    """
    w = tokens.shape[1]
    idx = torch.arange(w, device=tokens.device)[None, :]
    hit = is_stop & (idx < num_emitted[:, None])
    first = torch.where(hit.any(dim=1), hit.to(torch.int64).argmax(dim=1) + 1, num_emitted)
    return torch.minimum(first, budget)
