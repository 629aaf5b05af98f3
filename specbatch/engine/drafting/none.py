"""The ``none`` drafter: zero proposals, so every step is a plain one-token sampling step."""

from __future__ import annotations

from typing import Sequence

import torch

from specbatch.engine.drafting.base import Proposal, _StatelessDrafter, _empty_proposal
from specbatch.engine.rows import Row


class NoDrafter(_StatelessDrafter):
    """Zero proposals: every step is a plain one-token step."""

    kind = "none"

    def propose(self, rows: Sequence[Row], max_proposals: torch.Tensor, coupled: bool) -> Proposal:
        return _empty_proposal(len(rows), None)
