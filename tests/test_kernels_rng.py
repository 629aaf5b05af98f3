"""The in-kernel Philox uniforms equal specbatch.sampling.rng.uniform bit for bit (Triton forced, interpreted)."""

from __future__ import annotations

import pytest
import torch

from specbatch.sampling import rng
from specbatch_kernels.rng import uniform_triton

pytestmark = pytest.mark.triton


def test_uniforms_match_the_torch_contract_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    n = 4096
    key = torch.randint(0, 2**63 - 1, (n,), generator=g)
    sample_index = torch.randint(0, 2**40, (n,), generator=g)  # wraps mod 2**32 like the contract
    position = torch.randint(0, 2**34, (n,), generator=g)
    role = torch.randint(0, len(rng.Role), (n,), generator=g)
    lane = torch.randint(0, 2**31 + 1, (n,), generator=g)
    # corners: zero key and counters, the largest key, the largest 32-bit counters.
    key[:4] = torch.tensor([0, 2**63 - 1, 1, 2**32])
    position[:4] = torch.tensor([0, 2**32 - 1, 2**32, 7])
    sample_index[:4] = torch.tensor([0, 2**32 - 1, 1, 2**32 + 5])
    lane[:4] = torch.tensor([0, 0, 2**31, 151936])
    expected = rng.uniform(key, sample_index, position, role, lane)
    got = uniform_triton(key, sample_index, position, role, lane)
    assert torch.equal(got, expected)
    assert bool(((got > 0) & (got < 1)).all())


def test_each_counter_field_changes_the_draw():
    base = dict(key=torch.tensor([123456789]), sample_index=torch.tensor([3]), position=torch.tensor([10]),
                role=torch.tensor([int(rng.Role.ACCEPT)]), lane=torch.tensor([0]))
    u0 = uniform_triton(**base)
    for field in base:
        changed = dict(base)
        changed[field] = base[field] + 1
        assert not torch.equal(uniform_triton(**changed), u0), field
