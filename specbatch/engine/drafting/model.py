"""The ``model`` drafter: a second, smaller checkpoint with its own slot cache.

A sampling drafter: it draws its proposal at completion position t with rng.Role.DRAFT at t; in
coupled mode it proposes argmax(log q + Gumbel) with the same Gumbel noise the verifier uses.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from specbatch.sampling import rng
from specbatch.engine.drafting.base import Proposal, _empty_proposal
from specbatch.engine.rows import Row
from specbatch.models.cache import CacheLayout
from specbatch.sampling.warping import WarpParams, warp
from specbatch.sampling.speculative import coupled_choice
from specbatch_kernels import ops


class ModelDrafter:
    """A second checkpoint drafting for the target, with its own slot cache.

    draft_temperature None uses each row's own temperature; draft_top_k / draft_top_p apply to
    the draft only.  The draft's logits are padded (or cut) to the target's vocabulary width;
    ids beyond the target's width are never proposed.

    ``lengths`` keeps each draft cache slot's length on the host, as every call here sets it
    (prefill, fan-out, proposals, rollback, release): reading the cache's own lengths would be a
    host synchronization in each ``propose`` and ``commit`` on a GPU.
    """

    kind = "model"
    deterministic = False

    def __init__(
        self,
        model: Any,
        target_vocab_size: int,
        draft_temperature: float | None = None,
        draft_top_k: int = 0,
        draft_top_p: float = 1.0,
        draft_min_p: float = 0.0,
    ):
        self.model = model
        self.vocab = target_vocab_size
        self.draft_temperature = draft_temperature
        self.draft_top_k = draft_top_k
        self.draft_top_p = draft_top_p
        self.draft_min_p = draft_min_p
        self.cache = None
        self.lengths: list[int] = []  # per draft cache slot, on the host: the cache's lengths
        self.device = next(model.parameters()).device

    def attach(self, layout: CacheLayout) -> None:
        self.cache = self.model.new_cache(layout.num_slots, layout.max_len, layout.prompt_slots, layout.prompt_len)
        self.lengths = [0] * (layout.num_slots + layout.prompt_slots)

    def prefill(self, prompt_ids: Sequence[int], slot: int) -> None:
        self.cache.reset([slot])
        head = list(prompt_ids[:-1])
        if head:
            tokens = torch.tensor([head], dtype=torch.int64, device=self.device)
            self.model(tokens, self.cache, torch.tensor([slot], device=self.device), torch.tensor([len(head)], device=self.device), last_only=True)
        self.lengths[slot] = len(head)

    def copy_prefix(self, src: int, dst: Sequence[int], length: int) -> None:
        self.cache.copy_prefix(src, list(dst), length)
        for d in dst:
            self.lengths[d] = length

    def release(self, slots: Sequence[int]) -> None:
        self.cache.reset(list(slots))
        for s in slots:
            self.lengths[s] = 0

    @property
    def draft_model(self) -> Any:
        return self.model

    @property
    def draft_cache(self) -> Any:
        return self.cache

    def confidence(self, rows: Sequence[Row], limits: Sequence[int]) -> list[list[float]] | None:
        return None  # q is known only after drafting

    def observe(self, rows: Sequence[Row], logits: torch.Tensor, num_emitted: torch.Tensor, params: WarpParams) -> None:
        pass

    def stats(self) -> dict[str, Any] | None:
        return None

    def _warp_params(self, rows: Sequence[Row]) -> WarpParams:
        def temp(row: Row) -> float:
            return row.params.temperature if self.draft_temperature is None else self.draft_temperature

        return WarpParams.neutral(
            len(rows), self.device, temperature=torch.tensor([temp(r) for r in rows]),
            top_k=self.draft_top_k, top_p=self.draft_top_p, min_p=self.draft_min_p,
        )

    def _to_target_width(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V_draft] -> [R, V_target] float32; padding gets -inf (q = 0 there)."""
        logits = logits.to(torch.float32)
        vd = logits.shape[-1]
        if vd >= self.vocab:
            return logits[:, : self.vocab]
        pad = torch.full((logits.shape[0], self.vocab - vd), float("-inf"), device=logits.device)
        return torch.cat([logits, pad], dim=-1)

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        r = len(rows)
        g = int(max_proposals.max()) if r else 0
        if g == 0:
            return _empty_proposal(r, self.vocab, self.device)
        dev = self.device
        slots = torch.tensor([row.slot for row in rows], dtype=torch.int64, device=dev)
        lengths = [self.lengths[row.slot] for row in rows]
        limit_list = max_proposals.tolist()
        # 1. catch up: feed the committed tokens the draft cache lacks (1 or 2 per row, ragged).
        pending = [row.tokens[length:] if lim > 0 else [] for row, length, lim in zip(rows, lengths, limit_list)]
        for row, length in zip(rows, lengths):
            assert length <= len(row.tokens) - 1, "draft cache holds tokens the row never committed"
        sizes = [len(p) for p in pending]
        width = max(sizes)
        feed = torch.tensor([p + [0] * (width - k) for p, k in zip(pending, sizes)], dtype=torch.int64,
                            device=dev)  # [R, width]: one copy to the device
        n_feed = torch.tensor(sizes, dtype=torch.int64, device=dev)  # [R]
        # Every position's logits, then each row's last real one: a step-shaped call (1 or 2 wide),
        # which a model with static steps runs as one (a CUDA graph on a GPU).
        fed = self.model(feed, self.cache, slots, n_feed)  # [R, width, Vd]
        last = fed[torch.arange(r, device=dev), (n_feed - 1).clamp(min=0)]  # [R, Vd] at each row's last token

        params = self._warp_params(rows)
        key = torch.tensor([row.key for row in rows], dtype=torch.int64, device=dev)
        sidx = torch.tensor([row.sample_index for row in rows], dtype=torch.int64, device=dev)
        pos = torch.tensor([row.position for row in rows], dtype=torch.int64, device=dev)
        limits = max_proposals.to(dev)
        tokens = torch.full((r, g), -1, dtype=torch.int64, device=dev)
        q = torch.zeros(r, g, self.vocab, dtype=torch.float32, device=dev)
        for i in range(g):
            logits_i = self._to_target_width(last)  # [R, V]
            if coupled:
                probs = warp(logits_i, params)
                x = coupled_choice(probs, rng.gumbel(key, sidx, pos + i, self.vocab))
            else:
                x, probs = ops.warp_and_sample(logits_i, params, key, sidx, pos + i, rng.Role.DRAFT, return_probs=True)
            live = i < limits  # [R]
            tokens[:, i] = torch.where(live, x, tokens[:, i])
            q[:, i] = probs
            if i + 1 < g:
                step_tokens = (i + 1 < limits).to(torch.int64)  # feed x_i only where x_{i+1} is wanted
                last = self.model(x.clamp(min=0)[:, None], self.cache, slots, step_tokens)[:, 0]
        for row, k, lim in zip(rows, sizes, limit_list):  # the catch-up, then x_0 .. x_{lim-2}
            self.lengths[row.slot] += k + max(lim - 1, 0)
        return Proposal(tokens=tokens, num_proposed=max_proposals.to("cpu", copy=True), q=q)

    def commit(self, rows: Sequence[Row], num_proposed: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Roll the draft cache back to the accepted prefix: n - 1 after a rejection, n - 2 after
        a fully accepted step (n = committed length after the step)."""
        slots = [row.slot for row in rows]
        lengths = [self.lengths[s] for s in slots]
        new = []
        for row, length, g, a in zip(rows, lengths, num_proposed.tolist(), num_accepted.tolist()):
            n = len(row.tokens)
            target_len = min(length, n - 1)
            if g > 0 and row.finish_reason is None:
                expected = n - 2 if a == g else n - 1
                assert target_len == expected, f"draft cache length {target_len} != {expected} (n={n}, g={g}, a={a})"
            new.append(target_len)
            self.lengths[row.slot] = target_len
        self.cache.set_lengths(slots, new)


def check_same_tokenizer(target_tok: Any, draft_tok: Any, draft_path: str) -> None:
    """Refuse a draft whose tokenizer maps text to ids differently from the target's.

    Logit widths may differ (padding); the vocabularies and special tokens must not.
    """
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise ValueError(
            f"models.draft.path: tokenizer of {draft_path} differs from the target's "
            f"({only_t} target and {only_d} draft token-id pairs not shared); draft and target must tokenize identically"
        )
    if target_tok.eos_token_id != draft_tok.eos_token_id:
        raise ValueError(f"models.draft.path: {draft_path} has eos id {draft_tok.eos_token_id}, target has {target_tok.eos_token_id}")
