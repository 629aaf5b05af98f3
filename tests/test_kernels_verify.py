"""Fused verification kernels vs the torch reference, on a sampled set of odd shapes.

The Triton path is forced (it runs under TRITON_INTERPRET=1 on CPU) and each test asserts that
the kernels were launched.  Outputs must equal the reference's except on rows where a decision
sits within float32 rounding of its boundary (``specbatch_kernels.parity``): those are counted,
printed and bounded.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from specbatch.sampling import rng
from specbatch.sampling.warping import History, WarpParams, apply_bias_and_penalties, sample_from_probs
from specbatch_kernels import ops, parity, reference
from specbatch_kernels import verify as kverify
from specbatch_kernels.reference import VerifyStep
from tests.kernel_support import force_triton, keep_backend_choice

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

KINDS = ("plain", "greedy", "top_k_1", "top_k", "tiny_top_p", "top_p", "min_p", "all")


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton backend for one test and count kernel launches through ops."""
    return force_triton(monkeypatch, kverify, "verify_triton", "verify")


def row_params(kinds: list[str], vocab: int, g: torch.Generator) -> WarpParams:
    """Warp parameters, one row per entry of kinds (see KINDS)."""
    n = len(kinds)
    temperature = (torch.rand(n, generator=g) * 1.2 + 0.4).to(torch.float32)
    top_k = torch.zeros(n, dtype=torch.int64)
    top_p = torch.ones(n)
    min_p = torch.zeros(n)
    for i, kind in enumerate(kinds):
        if kind == "greedy":
            temperature[i] = 0.0
        elif kind == "top_k_1":
            top_k[i] = 1
        elif kind == "top_k":
            top_k[i] = int(torch.randint(2, max(3, vocab // 2 + 2), (1,), generator=g))
        elif kind == "tiny_top_p":
            top_p[i] = 1e-6
        elif kind == "top_p":
            top_p[i] = float(torch.rand(1, generator=g)) * 0.6 + 0.3
        elif kind == "min_p":
            min_p[i] = float(torch.rand(1, generator=g)) * 0.3 + 0.01
        elif kind == "all":
            top_k[i] = max(1, vocab // 3)
            top_p[i] = 0.85
            min_p[i] = 0.05
    return WarpParams(temperature, top_k, top_p, min_p, torch.ones(n), torch.zeros(n), torch.zeros(n))


def make_step(vocab, rows, gamma, dtype, one_hot, seed, zeros=False, kinds=KINDS):
    """Random target logits, per-row warping and proposals sampled from a correlated draft."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, gamma + 1, vocab, generator=g) * 3  # [R, G+1, V]
    if zeros and vocab > 1:  # exact zeros in p: -inf logits, never all of a row
        banned = torch.rand(rows, gamma + 1, vocab, generator=g) < 0.3
        banned[..., 0] = False
        logits = logits.masked_fill(banned, float("-inf"))
    logits = logits.to(dtype)
    row_kinds = [kinds[int(i)] for i in torch.randint(0, len(kinds), (rows,), generator=g)]
    warp = row_params(row_kinds, vocab, g)  # per row
    key = torch.randint(0, 2**62, (rows,), generator=g)
    sample_index = torch.randint(0, 64, (rows,), generator=g)
    position = torch.randint(0, 500, (rows,), generator=g)
    num_proposed = torch.randint(0, gamma + 1, (rows,), generator=g)
    draft_probs = None
    if gamma == 0:
        draft_tokens = torch.zeros(rows, 0, dtype=torch.int64)
    else:
        # the draft: target logits plus noise, sometimes truncated (exact zeros in q).
        d_logits = logits[:, :gamma].float() + torch.randn(rows, gamma, vocab, generator=g)
        if zeros and vocab > 2:
            kth = d_logits.topk(max(1, vocab // 2), dim=-1).values[..., -1:]
            d_logits = d_logits.masked_fill(d_logits < kth, float("-inf"))
        q = torch.softmax(d_logits, dim=-1)  # [R, G, V]
        pos = position[:, None] + torch.arange(gamma)[None, :]
        u = rng.uniform(key[:, None], sample_index[:, None], pos, rng.Role.DRAFT)  # [R, G]
        if one_hot:  # a deterministic drafter: its argmax
            draft_tokens = q.argmax(dim=-1)
        else:
            draft_tokens = sample_from_probs(q.reshape(-1, vocab), u.reshape(-1)).view(rows, gamma)
            draft_probs = q.contiguous()
    return logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position


def check_step(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position,
               history=None, ban=None, label=""):
    """Run kernel and reference; assert agreement up to near-boundary rows. -> near count."""
    rows, g1, vocab = logits.shape
    result, logprobs = ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index,
                                  position, history=history, ban=ban)
    pair_params = warp.index(torch.arange(rows).repeat_interleave(g1)) if len(warp) == rows else warp
    scores = apply_bias_and_penalties(logits.reshape(rows * g1, vocab), pair_params, history)
    if ban is not None:
        scores = scores.masked_fill(ban.reshape(scores.shape), float("-inf"))
    scores = scores.view(rows, g1, vocab)
    ref, ref_logprobs, ref_probs = reference.verify(
        VerifyStep(scores, draft_tokens, num_proposed, draft_probs, pair_params, key, sample_index, position)
    )
    equal, near = parity.classify_verify(result, ref, ref_probs, draft_tokens, draft_probs, scores, pair_params,
                                         key, sample_index, position)
    bad = ~equal & ~near
    assert not bool(bad.any()), (
        f"{label}: rows {bad.nonzero().squeeze(1).tolist()} differ away from any boundary:\n"
        f"kernel {result.tokens[bad].tolist()}\nreference {ref.tokens[bad].tolist()}"
    )
    n_near = int((~equal).sum())
    assert n_near <= max(1, rows // 20), f"{label}: {n_near} near-boundary mismatches in {rows} rows"
    # log p of the emitted tokens, where the rows agree.
    both = (equal & ~near)[:, None] & torch.isfinite(ref_logprobs)
    torch.testing.assert_close(logprobs[both], ref_logprobs[both], atol=2e-4, rtol=1e-4)
    assert bool((result.tokens < vocab).all())
    print(f"{label}: {rows} rows, {n_near} near-boundary mismatch(es), {int(near.sum())} row(s) near a boundary")
    return n_near


# (vocab, rows, gamma, dtype, one-hot q, exact zeros, row kinds): sampled so the interpreter
# stays quick; the big vocabularies with 1-2 rows only, their row kinds chosen.
CASES = [
    (1, 3, 2, torch.float32, False, False, KINDS),
    (7, 64, 8, torch.float16, False, True, KINDS),
    (7, 17, 0, torch.bfloat16, True, False, KINDS),
    (7, 33, 5, torch.float32, True, True, KINDS),
    (1000, 24, 4, torch.bfloat16, False, False, KINDS),
    (1000, 9, 8, torch.float32, True, True, KINDS),
    (1000, 40, 1, torch.float16, False, True, KINDS),
    (32001, 4, 3, torch.float16, False, False, ("top_k", "top_p", "min_p", "greedy")),
    (32001, 3, 2, torch.float32, True, True, ("all", "tiny_top_p", "plain")),
    (151936, 1, 2, torch.bfloat16, False, True, ("all",)),
    (151936, 2, 1, torch.float32, True, False, ("top_k_1", "plain")),
]


def _case_id(c) -> str:
    return f"V{c[0]}-R{c[1]}-G{c[2]}-{str(c[3])[6:]}-{'onehot' if c[4] else 'dense'}{'-zeros' if c[5] else ''}"


@pytest.mark.parametrize("vocab,rows,gamma,dtype,one_hot,zeros,kinds", CASES, ids=[_case_id(c) for c in CASES])
def test_verify_matches_reference(triton_path, vocab, rows, gamma, dtype, one_hot, zeros, kinds):
    step = make_step(vocab, rows, gamma, dtype, one_hot, seed=vocab * 131 + rows * 7 + gamma, zeros=zeros,
                     kinds=kinds)
    check_step(*step, label=f"V={vocab} R={rows} G={gamma} {dtype}")
    assert ops.backend() == "triton" and triton_path["verify"] == 1


def test_verify_greedy_rows_emit_the_argmax(triton_path):
    """Greedy rows accept exactly the proposals equal to the target argmax, then emit the argmax."""
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        50, 16, 4, torch.float32, one_hot=True, seed=5, kinds=("greedy",))
    argmax = logits.argmax(dim=-1)  # [R, G+1]
    draft_tokens[::2] = argmax[::2, :4]  # even rows propose the argmax everywhere
    result, logprobs = ops.verify(logits, draft_tokens, num_proposed, None, warp, key, sample_index, position)
    for r in range(16):
        n = int(num_proposed[r])
        expected_acc = 0
        while expected_acc < n and int(draft_tokens[r, expected_acc]) == int(argmax[r, expected_acc]):
            expected_acc += 1
        assert int(result.num_accepted[r]) == expected_acc
        assert result.tokens[r, : expected_acc + 1].tolist() == argmax[r, : expected_acc + 1].tolist()
    assert bool((logprobs == 0).all())  # p is one-hot: log p(argmax) = 0, and 0 after the run
    assert triton_path["verify"] == 1


def test_verify_with_bias_penalties_and_bans(triton_path):
    """Sparse adjustments go through torch first; per-pair history and bans; per-pair warp rows."""
    rows, gamma, vocab = 6, 3, 40
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        vocab, rows, gamma, torch.float32, one_hot=False, seed=11, kinds=("plain", "top_p", "min_p"))
    pairs = rows * (gamma + 1)
    pair_warp = warp.index(torch.arange(rows).repeat_interleave(gamma + 1))
    pair_warp.repetition_penalty[:] = 1.3
    pair_warp.presence_penalty[:] = 0.4
    pair_warp.frequency_penalty[:] = 0.2
    pair_warp.logit_bias = [{3: 2.0, 7: -1.5} if i % 3 == 0 else {} for i in range(pairs)]
    g = torch.Generator().manual_seed(3)
    history = History(prompt_ids=torch.randint(0, vocab, (pairs, 5), generator=g),
                      output_ids=torch.randint(-1, vocab, (pairs, 4), generator=g))
    ban = torch.zeros(rows, gamma + 1, vocab, dtype=torch.bool)
    ban[:, :2, 5] = True  # e.g. EOS = 5 before min_new_tokens
    check_step(logits, draft_tokens, num_proposed, draft_probs, pair_warp, key, sample_index, position,
               history=history, ban=ban, label="bias+penalties+ban")
    assert triton_path["verify"] == 1


def test_verify_matches_torch_backend_bit_for_bit_on_easy_rows(triton_path):
    """Rows far from every boundary give the same tokens on both backends (the choice is once)."""
    step = make_step(300, 32, 3, torch.float32, one_hot=False, seed=2)
    kernel, _ = ops.verify(*step)
    ops.force_backend("torch")
    reference, _ = ops.verify(*step)
    ops.force_backend("triton")
    same = (kernel.tokens == reference.tokens).all(dim=1)
    assert int(same.sum()) >= 30
    assert triton_path["verify"] == 1


def test_verify_validates_inputs(triton_path):
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        10, 4, 2, torch.float32, one_hot=False, seed=1)
    with pytest.raises(ValueError, match="draft_tokens"):
        ops.verify(logits, draft_tokens[:, :1], num_proposed, draft_probs, warp, key, sample_index, position)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ops.verify(logits.double(), draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position)
    with pytest.raises(ValueError, match="contiguous"):
        ops.verify(logits.transpose(1, 2).contiguous().transpose(1, 2), draft_tokens, num_proposed, draft_probs,
                   warp, key, sample_index, position)
    with pytest.raises(ValueError, match="num_proposed"):
        ops.verify(logits, draft_tokens, num_proposed + 5, draft_probs, warp, key, sample_index, position)
    with pytest.raises(ValueError, match="draft_probs"):
        ops.verify(logits, draft_tokens, num_proposed, draft_probs.double(), warp, key, sample_index, position)
    with pytest.raises(ValueError, match="warp has"):
        ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp.index(torch.arange(3)), key, sample_index,
                   position)
    with pytest.raises(ValueError, match="key"):
        ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key.int(), sample_index, position)
    assert triton_path["verify"] == 0


def test_backend_is_chosen_once_from_the_environment(monkeypatch):
    keep_backend_choice(monkeypatch)
    monkeypatch.setenv("SPECBATCH_KERNELS", "triton")
    ops.force_backend(None)
    assert ops.backend() == "triton"
    monkeypatch.setenv("SPECBATCH_KERNELS", "torch")
    assert ops.backend() == "triton"  # chosen once: a later change of the variable does not flip it
    ops.force_backend(None)
    assert ops.backend() == "torch"
    monkeypatch.setenv("SPECBATCH_KERNELS", "cuda-please")
    ops.force_backend(None)
    with pytest.raises(ValueError, match="SPECBATCH_KERNELS"):
        ops.backend()
    monkeypatch.delenv("SPECBATCH_KERNELS")
    ops.force_backend(None)
    assert ops.backend() == ("triton" if torch.cuda.is_available() else "torch")


def test_parity_checker_flags_a_real_difference():
    """The comparison can fail: a wrong token away from any boundary is not excused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
            20, 8, 2, torch.float32, one_hot=False, seed=9, kinds=("plain",))
    pair_params = warp.index(torch.arange(8).repeat_interleave(3))
    ref, _, ref_probs = reference.verify(VerifyStep(logits, draft_tokens, num_proposed, draft_probs, pair_params, key,
                                                    sample_index, position))
    broken = kverify.VerifyResult(ref.tokens.clone(), ref.num_emitted, ref.num_tested, ref.num_accepted,
                                  ref.num_proposed)
    last = ref.num_emitted - 1
    broken.tokens[torch.arange(8), last] = (ref.tokens[torch.arange(8), last] + 1) % 20
    equal, near = parity.classify_verify(broken, ref, ref_probs, draft_tokens, draft_probs, logits, pair_params, key,
                                         sample_index, position)
    assert not bool(equal.any())
    assert int(near.sum()) <= 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_engine_shaped_inputs(triton_path, backend):
    """What the engine hands over: per-row warp, -1 padding after num_proposed, a sliced logits
    view, and plain steps (gamma 0) with an empty q; both backends agree."""
    ops.force_backend(backend)
    rows, gamma, vocab = 5, 3, 64
    logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index, position = make_step(
        vocab, rows, gamma, torch.float32, one_hot=False, seed=17, kinds=("plain", "top_k", "greedy"))
    wide = torch.randn(rows, gamma + 3, vocab)
    wide[:, 2:] = logits
    sliced = wide[:, 2:]  # [R, G+1, V] view, not contiguous across rows
    padded = torch.where(torch.arange(gamma)[None, :] < num_proposed[:, None], draft_tokens, -1)
    result, logprobs = ops.verify(sliced, padded, num_proposed, draft_probs, warp, key, sample_index, position)
    ops.force_backend("torch")
    expected, expected_lp = ops.verify(logits, draft_tokens, num_proposed, draft_probs, warp, key, sample_index,
                                       position)
    assert torch.equal(result.tokens, expected.tokens)
    torch.testing.assert_close(logprobs, expected_lp, atol=2e-4, rtol=1e-4)
    plain = logits[:, :1].contiguous()
    empty_q = torch.zeros(rows, 0, vocab)
    no_proposals = torch.zeros(rows, dtype=torch.int64)
    ops.force_backend(backend)
    first, _ = ops.verify(plain, padded[:, :0], no_proposals, empty_q, warp, key, sample_index, position)
    assert bool((first.num_emitted == 1).all()) and bool((first.num_tested == 0).all())
    tokens, _ = ops.warp_and_sample(plain[:, 0], warp, key, sample_index, position, rng.Role.SAMPLE)
    assert torch.equal(first.tokens[:, 0], tokens)  # a bonus at position t is the plain SAMPLE draw at t
    assert triton_path["verify"] == (2 if backend == "triton" else 0)


def test_automatic_triton_leaves_cpu_tensors_to_torch(monkeypatch):
    """Chosen automatically (CUDA present), "triton" applies to CUDA tensors; CPU tensors take the
    reference instead of failing. Forced, it runs them through the kernels (interpreted here)."""
    keep_backend_choice(monkeypatch)
    calls = {"verify": 0}
    real = kverify.verify_triton

    def counted(*args, **kwargs):
        calls["verify"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kverify, "verify_triton", counted)
    monkeypatch.delenv("SPECBATCH_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ops.force_backend(None)
    assert ops.backend() == "triton"
    step = make_step(30, 3, 2, torch.float32, one_hot=False, seed=4)
    ops.verify(*step)
    assert calls["verify"] == 0
    ops.force_backend("triton")
    ops.verify(*step)
    assert calls["verify"] == 1
