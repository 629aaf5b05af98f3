"""Warping and sampling (specbatch.sampling.warping) against transformers' logits processors.

The oracle is the exactness harness's (tests/exactness/oracle.py), per parameter combination, in
float32 and in this order: SequenceBiasLogitsProcessor (single-token sequences = logit_bias),
RepetitionPenaltyLogitsProcessor (over prompt + completion), presence / frequency penalties (no
transformers processor: OpenAI's definition over completion tokens only),
MinNewTokensLengthLogitsProcessor (EOS and stop ids), then either greedy (one-hot argmax, lowest
id on ties) or TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper and
a softmax.
Our side warps every combination in ONE mixed batch with per-row parameters.

One deliberate deviation (the top-p tie contract, ``specbatch.sampling.warping.crossing_score``):
TopPLogitsWarper keeps a sort-dependent part of a group of tokens tied with the crossing token,
we keep all of it.  So the oracle's top-p is ``tie_aware_top_p``: TopPLogitsWarper, then every token
whose score equals the smallest score it kept (the crossing token's) is restored.  Where no tie
sits at the crossing that changes nothing, and transformers is compared unchanged.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import TopPLogitsWarper

from specbatch.sampling.warping import TOP_P_PREFIXES, History, SamplingParams, WarpParams, sample_from_probs, warp
from tests.exactness.oracle import oracle_probs as exactness_oracle

# Many tiny operations: one torch thread avoids synchronization overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


V = 16
EOS = 3
STOP_IDS = (11,)
PROMPT_LEN = 5
OUTPUT_LEN = 4
ROWS_PER_COMBO = 4  # two continuous random rows, two tie-heavy integer rows

TRUNCATION_GRID = list(
    itertools.product(
        [0.0, 0.6, 1.0, 1.9],  # temperature (0 = greedy)
        [0, 1, 3, 20],  # top_k (20 > V keeps all)
        [1.0, 0.85, 0.3],  # top_p
        [0.0, 0.1, 0.6],  # min_p
    )
)
PENALTY_GRID = list(
    itertools.product(
        [1.0, 1.4, 0.7],  # repetition_penalty
        [0.0, 0.6],  # presence_penalty
        [0.0, 0.35],  # frequency_penalty
        [{}, {2: 1.5, 9: -3.0, 0: 0.25}],  # logit_bias
        [0, OUTPUT_LEN, OUTPUT_LEN + 1],  # min_new_tokens (EOS / stop banned only in the last case)
    )
)


def oracle_probs(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The harness's oracle (tests/exactness/oracle.py) with this module's EOS and stop ids banned
    before min_new_tokens. logits: [B, V]; prompt: [B, P]; output: [B, O] -> probs [B, V]."""
    return exactness_oracle(logits, params, prompt, output, ban_ids=(EOS, *STOP_IDS))


def random_logits(rows: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, V]: half continuous N(0, 2^2), half integers in -2..2 (many exact ties)."""
    cont = torch.randn(rows, V, generator=generator) * 2.0
    ties = torch.randint(-2, 3, (rows, V), generator=generator).to(torch.float32)
    use_ties = (torch.arange(rows) % ROWS_PER_COMBO >= ROWS_PER_COMBO // 2)[:, None]
    return torch.where(use_ties, ties, cont)


def ban_mask(params_list: list[SamplingParams], output_len: int) -> torch.Tensor:
    """min_new_tokens: [M, V] True where EOS / stop ids are masked at this position."""
    stops = torch.zeros(V, dtype=torch.bool)
    stops[[EOS, *STOP_IDS]] = True
    min_new = torch.tensor([p.min_new_tokens for p in params_list])
    return (output_len < min_new)[:, None] & stops[None, :]


def check_against_oracle(params_list: list[SamplingParams], logits, prompt, output) -> None:
    """Warp all rows in one mixed batch; compare with the oracle one parameter set at a time."""
    wp = WarpParams.from_params(params_list)
    ours = warp(logits, wp, History(prompt_ids=prompt, output_ids=output), ban_mask(params_list, output.shape[1]))
    assert ours.dtype == torch.float32 and ours.shape == logits.shape
    expected = torch.empty_like(ours)
    start = 0
    while start < len(params_list):  # consecutive rows with the same parameters form one oracle batch
        end = start
        while end < len(params_list) and params_list[end] == params_list[start]:
            end += 1
        sl = slice(start, end)
        expected[sl] = oracle_probs(logits[sl], params_list[start], prompt[sl], output[sl])
        start = end
    support_differs = ((ours > 0) != (expected > 0)).any(dim=1)
    assert not bool(support_differs.any()), [params_list[i] for i in support_differs.nonzero().squeeze(1)[:5].tolist()]
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=1e-5)


def test_warp_equals_transformers_processors_on_every_combination():
    combos = [
        SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rep, presence_penalty=pres,
                       frequency_penalty=freq, logit_bias=bias, min_new_tokens=mn, max_new_tokens=16)
        for (t, k, p, mp), (rep, pres, freq, bias, mn) in itertools.product(TRUNCATION_GRID, PENALTY_GRID)
    ]
    params_list = [c for c in combos for _ in range(ROWS_PER_COMBO)]
    m = len(params_list)
    g = torch.Generator().manual_seed(0)
    logits = random_logits(m, g)
    prompt = torch.randint(0, V, (m, PROMPT_LEN), generator=g)
    output = torch.randint(0, V // 2, (m, OUTPUT_LEN), generator=g)  # repeats: frequency counts > 1
    check_against_oracle(params_list, logits, prompt, output)


def test_mixed_batch_equals_row_by_row():
    """Per-row parameters: warping a shuffled mixed batch gives each row what it gets alone."""
    g = torch.Generator().manual_seed(1)
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.6, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, min_p=0.2, presence_penalty=0.5, frequency_penalty=0.2, logit_bias={5: 2.0}),
        SamplingParams(temperature=0.9, min_new_tokens=3, top_k=2, top_p=0.9, min_p=0.05),
    ]
    m = 200
    params_list = [choices[i] for i in torch.randint(0, len(choices), (m,), generator=g).tolist()]
    logits = random_logits(m, g)
    prompt = torch.randint(0, V, (m, PROMPT_LEN), generator=g)
    output = torch.randint(0, V, (m, 2), generator=g)
    ban = ban_mask(params_list, 2)
    batch = warp(logits, WarpParams.from_params(params_list), History(prompt, output), ban)
    for i in range(m):
        alone = warp(logits[i : i + 1], WarpParams.from_params([params_list[i]]), History(prompt[i : i + 1], output[i : i + 1]), ban[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-7, rtol=0)
    check_against_oracle(params_list, logits, prompt, output)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_warped_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, V, generator=g) * 3).to(dtype)
    params_list = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)] * 64
    prompt = torch.randint(0, V, (64, PROMPT_LEN), generator=g)
    output = torch.randint(0, V, (64, OUTPUT_LEN), generator=g)
    ours = warp(logits, WarpParams.from_params(params_list))
    torch.testing.assert_close(ours, oracle_probs(logits.float(), params_list[0], prompt, output), atol=2e-6, rtol=1e-5)


def test_greedy_is_one_hot_at_lowest_tied_argmax_and_never_divides():
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0], [5.0, 5.0, 5.0, 5.0], [-2.0, -1.0, -1.0, -3.0]])
    probs = warp(logits, WarpParams.from_params([SamplingParams(temperature=0.0, top_p=0.1, top_k=1)] * 3))
    assert torch.equal(probs, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]))
    assert bool(torch.isfinite(probs).all())


def test_top_k_keeps_ties_at_the_threshold():
    logits = torch.tensor([[4.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    probs = warp(logits, WarpParams.from_params([SamplingParams(top_k=2)]))
    assert (probs[0] > 0).tolist() == [True, True, True, True, False, False]


def test_top_p_keeps_the_crossing_token():
    # probabilities 0.5, 0.3, 0.2 (logits are their logs): top_p 0.6 needs the first two tokens.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = warp(logits, WarpParams.from_params([SamplingParams(top_p=0.6)]))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0]]))


def test_top_p_keeps_every_token_tied_with_the_crossing_token():
    # the crossing is the third 0 (cumulative 0.66 >= 0.5); all four tied 0s are kept, where
    # transformers keeps three of them, chosen by its sort (TV 0.25 between the two).
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    probs = warp(logits, WarpParams.from_params([SamplingParams(top_p=0.5)]))
    torch.testing.assert_close(probs, torch.tensor([[0.25] * 4 + [0.0] * 4]))
    transformers_kept = TopPLogitsWarper(0.5)(None, logits.clone()) > float("-inf")
    assert int(transformers_kept.sum()) == 3


def bf16_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """[rows, vocab] float32 logits rounded to bfloat16: many exact ties near any crossing."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 2).to(torch.bfloat16).float()


def test_bf16_ties_follow_the_tie_aware_oracle():
    rows, vocab = 64, 512
    logits = bf16_logits(rows, vocab, seed=4)
    g = torch.Generator().manual_seed(5)
    params_list = [SamplingParams(temperature=t, top_p=p) for t, p in
                   zip([1.0, 0.7] * (rows // 2), (torch.rand(rows, generator=g) * 0.85 + 0.1).tolist())]
    ours = warp(logits, WarpParams.from_params(params_list))
    expected = torch.cat([oracle_probs(logits[i : i + 1], params_list[i], torch.zeros(1, 0, dtype=torch.int64),
                                       torch.zeros(1, 0, dtype=torch.int64)) for i in range(rows)])
    assert torch.equal(ours > 0, expected > 0)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=1e-5)
    # the deviation from plain transformers is exercised: some rows split a tie group there.
    plain = torch.cat([TopPLogitsWarper(p.top_p)(None, logits[i : i + 1] / p.temperature)
                       for i, p in enumerate(params_list)]) > float("-inf")
    assert int((plain != (ours > 0)).any(dim=-1).sum()) >= rows // 8


def test_top_p_search_settles_rows_at_every_prefix_size_like_the_full_sort():
    """The staged search (top-64, top-1024, full sort) against the tie-aware oracle, with rows
    peaked, medium and flat enough that each stage settles some of them."""
    rows, vocab = 48, 4096
    g = torch.Generator().manual_seed(11)
    scale = torch.tensor([8.0, 1.5, 0.05] * (rows // 3))[:, None]
    logits = (torch.randn(rows, vocab, generator=g) * scale).to(torch.bfloat16).float()
    params_list = [SamplingParams(temperature=1.0, top_p=p) for p in (torch.rand(rows, generator=g) * 0.8 + 0.15).tolist()]
    ours = warp(logits, WarpParams.from_params(params_list))
    expected = torch.cat([oracle_probs(logits[i : i + 1], params_list[i], torch.zeros(1, 0, dtype=torch.int64),
                                       torch.zeros(1, 0, dtype=torch.int64)) for i in range(rows)])
    assert torch.equal(ours > 0, expected > 0)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=1e-5)
    kept = (ours > 0).sum(dim=-1)
    assert int((kept <= TOP_P_PREFIXES[0]).sum()) > 0
    assert int(((kept > TOP_P_PREFIXES[0]) & (kept <= TOP_P_PREFIXES[1])).sum()) > 0
    assert int((kept > TOP_P_PREFIXES[1]).sum()) > 0
    # a row with top_p 1 beside them keeps everything and takes no search
    mixed = WarpParams.from_params([SamplingParams(top_p=1.0)] + params_list[1:])
    assert int((warp(logits, mixed)[0] > 0).sum()) == vocab


def test_permuting_the_vocabulary_permutes_the_warped_distribution():
    rows, vocab = 32, 256
    logits = bf16_logits(rows, vocab, seed=6)
    params = WarpParams.from_params([SamplingParams(temperature=0.9, top_k=100, top_p=0.6, min_p=0.01)] * rows)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(7))
    probs = warp(logits, params)
    permuted = warp(logits[:, perm], params)
    assert torch.equal(permuted > 0, probs[:, perm] > 0)
    torch.testing.assert_close(permuted, probs[:, perm], atol=1e-7, rtol=1e-6)


def test_min_p_is_relative_to_the_largest_probability():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = warp(logits, WarpParams.from_params([SamplingParams(min_p=0.5)]))  # keep p >= 0.25
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0]]))


def test_presence_and_frequency_use_completion_only_repetition_uses_prompt_too():
    logits = torch.zeros(1, 4)
    history = History(prompt_ids=torch.tensor([[0]]), output_ids=torch.tensor([[1, 1, -1]]))
    params = WarpParams.from_params([SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, temperature=1.0)])
    probs = warp(logits, params, history)
    expected = torch.tensor([[0.0, -2.0, 0.0, 0.0]]).softmax(-1)  # token 1: -0.5*2 - 1; prompt token 0 untouched
    torch.testing.assert_close(probs, expected)
    rep = WarpParams.from_params([SamplingParams(repetition_penalty=2.0)])
    logits = torch.tensor([[2.0, -2.0, 2.0, 0.5]])
    history = History(prompt_ids=torch.tensor([[0]]), output_ids=torch.tensor([[1, -1]]))
    torch.testing.assert_close(warp(logits, rep, history), torch.tensor([[1.0, -4.0, 2.0, 0.5]]).softmax(-1))


def test_ban_masks_eos_before_min_new_tokens():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    ban = torch.tensor([[False, True, False]])
    probs = warp(logits, WarpParams.from_params([SamplingParams()]), ban=ban)
    assert probs[0, 1] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))


# ---- inverse-CDF sampling -------------------------------------------------------------------


def test_sample_from_probs_inverse_cdf_boundaries():
    probs = torch.tensor([0.25, 0.0, 0.5, 0.25]).expand(6, 4)
    u = torch.tensor([1e-7, 0.2499, 0.2501, 0.7499, 0.7501, 1 - 1e-7])
    assert sample_from_probs(probs, u).tolist() == [0, 0, 2, 2, 3, 3]


def test_sample_from_probs_never_returns_zero_mass_and_accepts_unnormalized():
    probs = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0]]).expand(5, 5)  # total 8: cut at 0.25
    u = torch.tensor([1e-9, 0.2, 0.3, 0.999999, 1.0 - 2**-24])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_sample_from_probs_follows_the_distribution():
    from scipy import stats

    g = torch.Generator().manual_seed(3)
    p = torch.tensor([0.05, 0.0, 0.3, 0.15, 0.5])
    u = torch.rand(200_000, generator=g).clamp(min=2**-24)
    counts = torch.bincount(sample_from_probs(p.expand(u.numel(), -1), u), minlength=5)
    assert counts[1] == 0
    keep = p > 0
    expected = p[keep].double() / p[keep].double().sum() * u.numel()
    chi2 = stats.chisquare(counts[keep].double().numpy(), expected.numpy())
    assert chi2.pvalue > 1e-4


def test_sampling_params_validation():
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2.0),
                dict(repetition_penalty=0.0), dict(n=0), dict(max_new_tokens=0), dict(min_new_tokens=5, max_new_tokens=4)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).greedy and SamplingParams(frequency_penalty=0.1).has_penalties


def test_warp_params_index_expands_rows():
    wp = WarpParams.from_params([SamplingParams(temperature=0.5, logit_bias={1: 2.0}), SamplingParams(top_k=3)])
    sub = wp.index(torch.tensor([1, 1, 0]))
    assert sub.top_k.tolist() == [3, 3, 0] and sub.temperature.tolist() == [1.0, 1.0, 0.5]
    assert sub.logit_bias == [{}, {}, {1: 2.0}]
    assert WarpParams.from_params([SamplingParams()]).logit_bias is None
