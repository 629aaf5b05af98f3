"""One command that validates specbatch's GPU path: kernels, exactness, step times, fused verify.

    python bench/gpu_check.py --out gpu_check.json          # on one GPU: under 8 minutes on an H200
    python bench/gpu_check.py --smoke --out smoke.json      # the same code on CPU, tiny shapes (~1 min)

Needs only torch, triton, transformers, safetensors, pyarrow and numpy: no network, no Ray, no
pydantic, no scipy, and it drives the engine directly (specbatch's job layer is never imported).
Sections, each a list of checks in the JSON and rows of the one printed table:

* ``kernels``: the compiled Triton kernels (``specbatch_kernels.ops`` with the triton backend)
  against the torch reference on random logits: vocabularies up to 152k, up to 1024 rows, ragged
  proposal counts, mixed warping per row.  Kept sets and tokens must be equal except on rows that
  ``specbatch_kernels.parity`` classifies as within float rounding of a decision boundary (those
  are classified on the CPU, for the differing rows only, and bounded at 1 in 20 rows);
* ``exactness``: the engine exactness cases of ``tests/exactness/engine_harness.py`` run through
  ``Engine.generate`` on the device (the kernels' backend there) at reduced sample counts, against
  the enumerated exact distribution (chi-square and total variation), with proposal-position
  power scaled by the same fraction;
* ``steps``: engine step time (draft + target forward + verification + host work, median over
  full-batch steps) at batch 1, 16, 64, 256 and widths 1 (plain) and 5 (4 proposals of a model
  drafter), with Llama-3.1-8B-shaped random bf16 weights and a Llama-3.2-1B-shaped draft, next to
  the target forward alone, the step's bound from the memory bandwidth and bf16 matmul rate
  measured on the spot, and transformers' ``generate`` on the same shapes and weights;
* ``fused``: the fused verification kernel against the unfused torch path (time), and the opt-in
  sigmoid-approximate kernel's time and measured total variation from exact sampling;
* ``graphs``: the target's steps as CUDA graphs (``specbatch.models.steps``) against its eager
  forward: logits of ragged steps (relative difference, argmax agreement), forward time at each
  batch and width, and whole engine steps with the target and a model drafter graphed.

``--smoke`` runs every section on CPU with tiny shapes and the kernels under the Triton
interpreter (its times measure nothing but that the code runs).  Exit status 1 when a check fails.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # The kernels run interpreted on CPU; Triton reads this when a kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Not bench/ itself (python puts a script's directory first): a module there must never shadow an
# installed package (tests/test_environment.py checks the folder too).
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "bench"]
for _path in (ROOT / "kernels", ROOT):  # a bare checkout: specbatch and specbatch_kernels from here
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from specbatch.sampling import rng  # noqa: E402
from specbatch.engine.costmodel import time_forward  # noqa: E402
from specbatch.engine.drafting.model import ModelDrafter  # noqa: E402
from specbatch.engine.engine import Engine, EngineConfig  # noqa: E402
from specbatch.models.config import parse_config  # noqa: E402
from specbatch.models.llama import LlamaModel  # noqa: E402
from specbatch.engine.request import Request  # noqa: E402
from specbatch.sampling.warping import SamplingParams, WarpParams, sample_from_probs, truncate_and_normalize  # noqa: E402
from specbatch.sampling.speculative import VerifyResult  # noqa: E402
from specbatch_kernels import ops, parity, reference  # noqa: E402
from specbatch_kernels.reference import VerifyStep  # noqa: E402
from tests.exactness import engine_harness as eh  # noqa: E402

# Llama-3.1-8B and Llama-3.2-1B, as their config.json files describe them (the weights are random).
LLAMA_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], hidden_act="silu",
)
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                tie_word_embeddings=True, rope_scaling=dict(LLAMA_8B["rope_scaling"], factor=32.0))
# Tiny stand-ins of the same architecture for --smoke.
TINY_TARGET = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                   bos_token_id=1, eos_token_id=[2])
TINY_DRAFT = dict(TINY_TARGET, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True)

ROW_KINDS = ("plain", "greedy", "top_k", "top_p", "min_p", "all")


@dataclass(frozen=True)
class Profile:
    """The shapes and sample counts of one run (full on a GPU, tiny with --smoke)."""

    name: str
    device: str
    verify_cases: tuple[tuple[int, int, int, torch.dtype, bool], ...]  # (vocab, rows, gamma, dtype, one-hot q)
    sample_cases: tuple[tuple[int, int, torch.dtype], ...]  # (vocab, rows, dtype)
    exact_cases: tuple[str, ...]  # names in engine_harness.CASES
    exact_fraction: float  # of each case's sample count
    target: dict
    draft: dict
    dtype: torch.dtype
    batches: tuple[int, ...]
    widths: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    copy_bytes: int  # the bandwidth probe's tensor
    matmul_n: int  # the compute probe's square matmul
    fused_cases: tuple[tuple[int, int, int], ...]  # (vocab, rows, gamma)
    tv_rows: int
    repeats: int


GPU = Profile(
    name="gpu", device="cuda",
    verify_cases=((32000, 1024, 4, torch.bfloat16, False), (128256, 256, 4, torch.bfloat16, True),
                  (151936, 1024, 1, torch.float32, False), (151936, 64, 8, torch.float16, False),
                  (7, 1024, 5, torch.float32, False)),
    sample_cases=((151936, 1024, torch.bfloat16), (128256, 256, torch.float32), (7, 1024, torch.float16)),
    exact_cases=tuple(eh.CASES), exact_fraction=0.5,
    target=LLAMA_8B, draft=LLAMA_1B, dtype=torch.bfloat16, batches=(1, 16, 64, 256), widths=(1, 5),
    prompt_len=128, new_tokens=32, copy_bytes=4 << 30, matmul_n=8192,
    fused_cases=((128256, 1, 4), (128256, 64, 4), (128256, 256, 4), (151936, 1024, 1)), tv_rows=100_000,
    repeats=5,
)
SMOKE = Profile(
    name="smoke", device="cpu",
    verify_cases=((7, 33, 5, torch.float32, False), (1000, 16, 3, torch.bfloat16, True),
                  (5000, 3, 2, torch.float16, False)),
    sample_cases=((7, 64, torch.bfloat16), (1000, 24, torch.float32), (5000, 4, torch.bfloat16)),
    exact_cases=("plain", "near_draft_warped", "ngram"), exact_fraction=0.1,
    target=TINY_TARGET, draft=TINY_DRAFT, dtype=torch.float32, batches=(1, 4), widths=(1, 5),
    prompt_len=12, new_tokens=8, copy_bytes=64 << 20, matmul_n=256,
    fused_cases=((1000, 4, 3),), tv_rows=4000, repeats=3,
)


@dataclass
class Check:
    """One row of the table: what was checked, its figures, and whether it passed (None: a measurement)."""

    section: str
    case: str
    result: str
    ok: bool | None = None
    figures: dict = dataclasses.field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of fn over `repeats` calls after one warm-up, the device synchronized."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------- random inputs


def warp_rows(kinds: Sequence[str], vocab: int, g: torch.Generator) -> WarpParams:
    """Per-row warping (CPU tensors), one row per kind: plain, greedy, top_k, top_p, min_p or all."""
    n = len(kinds)
    temperature = torch.rand(n, generator=g) * 1.2 + 0.4
    top_k = torch.zeros(n, dtype=torch.int64)
    top_p, min_p = torch.ones(n), torch.zeros(n)
    for i, kind in enumerate(kinds):
        if kind == "greedy":
            temperature[i] = 0.0
        elif kind == "top_k":
            top_k[i] = int(torch.randint(1, max(2, vocab // 2 + 1), (1,), generator=g))
        elif kind == "top_p":
            top_p[i] = float(torch.rand(1, generator=g)) * 0.6 + 0.3
        elif kind == "min_p":
            min_p[i] = float(torch.rand(1, generator=g)) * 0.3 + 0.01
        elif kind == "all":
            top_k[i], top_p[i], min_p[i] = max(1, vocab // 3), 0.85, 0.05
    return WarpParams(temperature, top_k, top_p, min_p, torch.ones(n), torch.zeros(n), torch.zeros(n))


def params_to(params: WarpParams, device: torch.device | str) -> WarpParams:
    return WarpParams(*(getattr(params, f.name).to(device) for f in dataclasses.fields(WarpParams)
                        if f.name != "logit_bias"), logit_bias=params.logit_bias)


def random_step(vocab: int, rows: int, gamma: int, dtype: torch.dtype, one_hot: bool, device: torch.device,
                seed: int, kinds: Sequence[str] = ROW_KINDS) -> VerifyStep:
    """A verification step on `device`: logits ~ N(0, 3^2), per-pair warping, ragged proposal counts
    0..gamma, proposals drawn from a draft q = softmax(target logits + noise) (or its argmax)."""
    g = torch.Generator().manual_seed(seed)
    row_kinds = [kinds[int(i)] for i in torch.randint(0, len(kinds), (rows,), generator=g)]
    pairs = params_to(warp_rows(row_kinds, vocab, g), device).index(
        torch.arange(rows, device=device).repeat_interleave(gamma + 1))
    gd = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(rows, gamma + 1, vocab, generator=gd, device=device) * 3).to(dtype)  # [R, G+1, V]
    key = torch.randint(0, 2**62, (rows,), generator=gd, device=device)
    sample_index = torch.randint(0, 64, (rows,), generator=gd, device=device)
    position = torch.randint(0, 500, (rows,), generator=gd, device=device)
    num_proposed = torch.randint(0, gamma + 1, (rows,), generator=gd, device=device)
    q = torch.softmax(logits[:, :gamma].float() + torch.randn(rows, gamma, vocab, generator=gd, device=device), -1)
    if one_hot:
        draft, q = q.argmax(dim=-1), None  # [R, G]
    else:
        u = rng.uniform(key[:, None], sample_index[:, None], position[:, None] + torch.arange(gamma, device=device),
                        rng.Role.DRAFT)  # [R, G]
        draft = sample_from_probs(q.reshape(-1, vocab), u.reshape(-1)).view(rows, gamma)
        q = q.contiguous()  # [R, G, V]
    return VerifyStep(logits, draft, num_proposed, q, pairs, key, sample_index, position)


# ----------------------------------------------------------------------------------- a. kernels


def _rows_of(result: VerifyResult, idx: torch.Tensor) -> VerifyResult:
    return VerifyResult(*(getattr(result, f.name)[idx].cpu() for f in dataclasses.fields(VerifyResult)))


def check_verify_parity(vocab: int, rows: int, gamma: int, dtype: torch.dtype, one_hot: bool,
                        device: torch.device) -> Check:
    """Fused verification vs the reference on one random step; differing rows must be near a boundary."""
    step = random_step(vocab, rows, gamma, dtype, one_hot, device, seed=vocab * 7 + rows * 3 + gamma)
    ops.force_backend("triton")
    result, logprobs = ops.verify(step.scores, step.draft_tokens, step.num_proposed, step.draft_probs, step.params,
                                  step.key, step.sample_index, step.position)
    ref, ref_logprobs, ref_probs = reference.verify(step)
    equal = ((result.tokens == ref.tokens).all(dim=1) & (result.num_accepted == ref.num_accepted)
             & (result.num_tested == ref.num_tested) & (result.num_emitted == ref.num_emitted))  # [R]
    finite = torch.isfinite(ref_logprobs)  # [R, G+1]
    error = torch.where(finite, (logprobs - ref_logprobs).abs(), torch.zeros_like(logprobs))
    logp_off = (error > 2e-4 + 1e-4 * torch.where(finite, ref_logprobs.abs(), 0.0)).any(dim=1)  # [R]
    suspect = (~equal | logp_off).nonzero().squeeze(1)  # rows to classify: other tokens, or other log p
    near = torch.zeros(rows, dtype=torch.bool)
    if suspect.numel():  # classified on the CPU, only where the backends disagree
        g1 = gamma + 1
        pair_idx = (suspect[:, None] * g1 + torch.arange(g1, device=device)).reshape(-1)
        _, near_suspect = parity.classify_verify(
            _rows_of(result, suspect), _rows_of(ref, suspect), ref_probs[suspect].cpu(),
            step.draft_tokens[suspect].cpu(), None if step.draft_probs is None else step.draft_probs[suspect].cpu(),
            step.scores[suspect].cpu(), params_to(step.params.index(pair_idx), "cpu"), step.key[suspect].cpu(),
            step.sample_index[suspect].cpu(), step.position[suspect].cpu())
        near[suspect.cpu()] = near_suspect
    differ = int((~equal).sum())
    near_count = int(near.sum())
    bad = int(suspect.numel()) - near_count
    clean = (equal.cpu() & ~near).to(device)  # rows whose log p must agree to rounding
    logp_err = float(error[clean].max()) if bool(clean.any()) else 0.0
    ok = bad == 0 and differ <= max(1, rows // 20)
    name = f"verify V={vocab} R={rows} G={gamma} {str(dtype)[6:]} {'one-hot' if one_hot else 'dense'} q"
    return Check("kernels", name, f"{rows - differ}/{rows} rows equal, {near_count} near a boundary, {bad} away from any; "
                 f"max |dlogp| {logp_err:.2g}", ok,
                 dict(rows=rows, differ=differ, near=near_count, bad=bad, logp_err=logp_err))


def check_sample_parity(vocab: int, rows: int, dtype: torch.dtype, device: torch.device) -> Check:
    """Fused warp-and-sample vs the reference: the same kept set (support of p) and the same token."""
    g = torch.Generator().manual_seed(vocab + rows)
    kinds = [ROW_KINDS[int(i)] for i in torch.randint(0, len(ROW_KINDS), (rows,), generator=g)]
    params = params_to(warp_rows(kinds, vocab, g), device)
    gd = torch.Generator(device=device).manual_seed(vocab + rows)
    logits = (torch.randn(rows, vocab, generator=gd, device=device) * 3).to(dtype)  # [M, V]
    key = torch.randint(0, 2**62, (rows,), generator=gd, device=device)
    sample_index = torch.randint(0, 64, (rows,), generator=gd, device=device)
    position = torch.randint(0, 500, (rows,), generator=gd, device=device)
    ops.force_backend("triton")
    tokens, probs = ops.warp_and_sample(logits, params, key, sample_index, position, return_probs=True)
    ref_probs = truncate_and_normalize(logits.float(), params)  # [M, V]
    u = rng.uniform(key, sample_index, position, rng.Role.SAMPLE)  # [M]
    ref_tokens = sample_from_probs(ref_probs, u)
    same_set = ((probs > 0) == (ref_probs > 0)).all(dim=1)  # [M]
    equal = same_set & (tokens == ref_tokens)
    differ = (~equal).nonzero().squeeze(1)
    near_count, bad = 0, 0
    if differ.numel():
        sub = params_to(params.index(differ), "cpu")
        scores = logits[differ].float().cpu()
        _, near_token = parity.classify_sample(tokens[differ].cpu(), ref_tokens[differ].cpu(), ref_probs[differ].cpu(),
                                               scores, sub, u[differ].cpu())
        near_set = parity.truncation_near(scores, sub)
        near = torch.where(same_set[differ].cpu(), near_token, near_set)
        near_count, bad = int(near.sum()), int((~near).sum())
    ok = bad == 0 and differ.numel() <= max(1, rows // 20)
    return Check("kernels", f"warp+sample V={vocab} R={rows} {str(dtype)[6:]}",
                 f"{rows - differ.numel()}/{rows} rows with equal kept set and token, {near_count} near a boundary, "
                 f"{bad} away from any", ok, dict(rows=rows, differ=int(differ.numel()), near=near_count, bad=bad))


def kernel_checks(profile: Profile, device: torch.device) -> list[Check]:
    out = [check_verify_parity(*case, device) for case in profile.verify_cases]
    return out + [check_sample_parity(*case, device) for case in profile.sample_cases]


# ----------------------------------------------------------------------------------- b. exactness


def exactness_checks(profile: Profile, device: torch.device) -> list[Check]:
    """The engine harness's cases on `device` with the kernels' backend there, fewer samples each."""
    # The kernels compiled on a GPU; the reference on CPU (the kernels section interprets the kernels).
    backend = "triton" if device.type == "cuda" else "torch"
    out = []
    for name in profile.exact_cases:
        base = eh.CASES[name]
        n = max(50, round(base.params.n * profile.exact_fraction))
        case = dataclasses.replace(base, device=str(device), backend=backend,
                                   params=dataclasses.replace(base.params, n=n))
        start = time.perf_counter()
        run = case.run()
        reports = case.reports(run)
        seconds = time.perf_counter() - start
        failed = sorted(eh.failures(reports))
        worst, report = eh.strongest(reports)
        tested = run.stats.tested_at + [0] * case.power_positions
        accepted = run.stats.accepted_at + [0] * case.power_positions
        rejections = [tested[i] - accepted[i] for i in range(case.power_positions)]
        scale = n / base.params.n
        power = case.drafter == "none" or (
            all(r >= int(case.min_rejections * scale) for r in rejections)
            and tested[case.power_positions - 1] >= int(case.min_reached * scale))
        out.append(Check("exactness", f"{name} ({case.backend}, n={n})",
                         f"{len(reports) - len(failed)}/{len(reports)} comparisons pass (lowest p {report.p_value:.2g} "
                         f"at {worst}); rejections per position {rejections}; {seconds:.1f} s",
                         not failed and power,
                         dict(n=n, comparisons=len(reports), failed=failed, lowest_p=report.p_value,
                              rejections=rejections, power=power, seconds=seconds)))
    return out


# ----------------------------------------------------------------------------------- c. steps


class IdTokenizer:
    """The tokenizer of a random-weight model: token ids are its words (no EOS: lengths are fixed)."""

    eos_token_id = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def random_models(raw: dict, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[LlamaModel, Any]:
    """(native model, transformers model) of one config with the same random weights, on `device`.

    transformers builds and initializes the weights on the device (normal, std 0.02); the native
    model is built from its state dict (fused q/k/v and gate/up are copies, the rest is shared).
    """
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "config.json").write_text(json.dumps(raw))
        config = parse_config(pathlib.Path(tmp)).with_dtype(dtype)
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device(device):  # initialized in place, in the dtype: no float32 copy of 8B weights
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    weights = dict(hf.state_dict())
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return LlamaModel(config, weights), hf


def weight_bytes(model: LlamaModel) -> tuple[int, int]:
    """(bytes a forward reads from weights, weights that multiply: params less an untied embedding)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed.numel() * model.embed.element_size()
    read = total - (0 if model.config.tie_word_embeddings else embed)
    return read, read // model.embed.element_size()


def forward_bound(model: LlamaModel, batch: int, width: int, context: int, bandwidth: float, flops: float) -> float:
    """Seconds a forward of batch x width tokens over `context` cached ones cannot beat:
    max(weights + KV read at the bandwidth, 2 x params x tokens + attention at the matmul rate)."""
    c = model.config
    read, params = weight_bytes(model)
    kv = batch * (context + width) * c.kv_bytes_per_token
    attention = 4 * batch * width * (context + width) * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    return max((read + kv) / bandwidth, (2 * params * batch * width + attention) / flops)


def measure_bounds(profile: Profile, device: torch.device) -> tuple[float, float]:
    """(copy bandwidth bytes/s, read + write counted; matmul FLOP/s in the model dtype), measured now."""
    src = torch.ones(profile.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * profile.copy_bytes / median_seconds(lambda: dst.copy_(src), device, 5)
    del src, dst
    n = profile.matmul_n
    a = torch.randn(n, n, device=device).to(profile.dtype)
    b = torch.randn(n, n, device=device).to(profile.dtype)
    flops = 2 * n**3 / median_seconds(lambda: a @ b, device, 5)
    return bandwidth, flops


def engine_step_seconds(target: LlamaModel, draft: LlamaModel, batch: int, width: int, profile: Profile) -> list[float]:
    """Seconds of each full-batch engine step (all `batch` rows, `width` - 1 proposals), after warm-up."""
    drafter = ModelDrafter(draft, target.config.vocab_size) if width > 1 else None
    max_len = profile.prompt_len + profile.new_tokens + width + 1
    config = EngineConfig(max_batch_size=batch, num_draft_tokens=width - 1, max_model_len=max_len, measure_cost=False,
                          kv_cache_bytes=target.config.kv_bytes_per_token * (batch + 1) * max_len)
    engine = Engine(target, IdTokenizer(), drafter, config)
    prompt = [int(t) for t in torch.randint(3, target.config.vocab_size, (profile.prompt_len,),
                                            generator=torch.Generator().manual_seed(batch))]
    params = SamplingParams(n=batch, max_new_tokens=profile.new_tokens, ignore_eos=True, temperature=1.0, seed=1)
    times: list[float] = []
    real = engine._step

    def timed(rows: list) -> None:
        start = time.perf_counter()
        before = engine.steps_by_shape[(batch, width - 1)]  # steps of the full width so far
        real(rows)
        sync(target.device)
        if len(rows) == batch and engine.steps_by_shape[(batch, width - 1)] > before:
            times.append(time.perf_counter() - start)

    engine._step = timed  # the step loop calls it through the instance
    with torch.inference_mode():
        engine.generate([Request("warm-up", prompt, dataclasses.replace(params, max_new_tokens=4))])
        times.clear()
        engine.generate([Request("timed", prompt, params)])
    return times


def hf_seconds_per_token(hf: Any, hf_draft: Any | None, batch: int, profile: Profile) -> float:
    """transformers' generate, sampling at temperature 1 with fixed lengths: seconds per new token,
    from two lengths (so that prefill cancels); with hf_draft, assisted generation (4 tokens a step)."""
    device = next(hf.parameters()).device
    ids = torch.randint(3, hf.config.vocab_size, (batch, profile.prompt_len),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    extra = {}
    if hf_draft is not None:
        extra = dict(assistant_model=hf_draft, num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                     assistant_confidence_threshold=0.0)

    def run(tokens: int) -> None:
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0, **extra)

    short, full = max(2, profile.new_tokens // 4), profile.new_tokens
    repeats = min(profile.repeats, 3)
    t_short = median_seconds(lambda: run(short), device, repeats)
    t_full = median_seconds(lambda: run(full), device, repeats)
    return max(t_full - t_short, 0.0) / (full - short)


def step_checks(profile: Profile, device: torch.device) -> list[Check]:
    ops.force_backend(None)  # the engine's own choice: the kernels on CUDA, the torch reference on CPU
    bandwidth, flops = measure_bounds(profile, device)
    out = [Check("steps", "bounds measured now", f"copy {bandwidth / 1e9:.0f} GB/s, {str(profile.dtype)[6:]} matmul "
                 f"{flops / 1e12:.1f} TFLOP/s", None, dict(bandwidth=bandwidth, flops=flops))]
    target, hf = random_models(profile.target, profile.dtype, device, seed=0)
    draft, hf_draft = random_models(profile.draft, profile.dtype, device, seed=1)
    context = profile.prompt_len + profile.new_tokens // 2  # the mean attended length over the run
    for width in profile.widths:
        for batch in profile.batches:
            steps = engine_step_seconds(target, draft, batch, width, profile)
            if not steps:
                out.append(Check("steps", f"batch {batch} width {width}", "no step ran all rows at full width", False))
                continue
            step = statistics.median(steps)
            forward = time_forward(target, batch, width, context=context)
            bound = forward_bound(target, batch, width, context, bandwidth, flops)
            if width > 1:  # the draft's width - 1 forwards of one token
                bound += (width - 1) * forward_bound(draft, batch, 1, context, bandwidth, flops)
            figures = dict(batch=batch, width=width, step_ms=step * 1e3, steps=len(steps), target_forward_ms=forward * 1e3,
                           bound_ms=bound * 1e3, step_over_bound=step / bound)
            hf_note = ""
            if width == 1 or batch == 1:
                try:
                    per_token = hf_seconds_per_token(hf, hf_draft if width > 1 else None, batch, profile)
                    figures["transformers_ms_per_token"] = per_token * 1e3
                    hf_note = f"; transformers {per_token * 1e3:.2f} ms/token"
                except Exception as err:  # a comparison, not a check: report why it did not run
                    figures["transformers_error"] = f"{type(err).__name__}: {err}"[:300]
                    hf_note = f"; transformers failed ({type(err).__name__})"
            else:
                hf_note = "; transformers: assisted generation takes batch 1 only"
            out.append(Check("steps", f"batch {batch} width {width}",
                             f"{step * 1e3:.2f} ms/step (target forward {forward * 1e3:.2f} ms, bound {bound * 1e3:.2f} ms, "
                             f"x{step / bound:.1f}){hf_note}", None, figures))
    return out


# ----------------------------------------------------------------------------------- d. fused verify


def approximate_tv(logits: torch.Tensor, q: torch.Tensor, rows: int, device: torch.device) -> tuple[float, float, float]:
    """(measured TV, analytic TV, sampling bound) of the approximate verifier's first token from exact
    p = softmax(logits): `rows` one-proposal steps on `device` (specbatch_kernels.approximate.measure_tv
    on any device); measured must be within the bound of analytic."""
    from specbatch_kernels import approximate  # imports triton: only here

    v = logits.shape[0]
    key = torch.zeros(rows, dtype=torch.int64, device=device)
    sample_index = torch.arange(rows, dtype=torch.int64, device=device)
    position = torch.zeros(rows, dtype=torch.int64, device=device)
    qs = q.float().to(device)[None, :].expand(rows, v).contiguous()  # [rows, V]
    draft = sample_from_probs(qs, rng.uniform(key, sample_index, position, rng.Role.DRAFT))  # [rows]
    ones = torch.ones(rows, device=device)
    warp = WarpParams(ones.clone(), torch.zeros(rows, dtype=torch.int64, device=device), ones.clone(),
                      torch.zeros_like(ones), ones.clone(), torch.zeros_like(ones), torch.zeros_like(ones))
    target = logits.float().to(device)[None, None, :].expand(rows, 2, v).contiguous()  # [rows, 2, V]
    result, _ = ops.verify(target, draft[:, None], torch.ones(rows, dtype=torch.int64, device=device),
                           qs[:, None, :].contiguous(), warp, key, sample_index, position, approximate=True)
    empirical = torch.bincount(result.tokens[:, 0].cpu(), minlength=v).double() / rows
    exact = torch.softmax(logits.double().cpu(), dim=0)
    produced = approximate.output_distribution(logits.cpu(), q.cpu())
    bound = 0.5 * float((produced * (1 - produced) / rows).sqrt().sum()) + math.sqrt(math.log(1e6) / (2 * rows))
    return 0.5 * float((empirical - exact).abs().sum()), 0.5 * float((produced - exact).abs().sum()), bound


def fused_checks(profile: Profile, device: torch.device) -> list[Check]:
    out = []
    for vocab, rows, gamma in profile.fused_cases:
        step = random_step(vocab, rows, gamma, torch.bfloat16, False, device, seed=rows, kinds=("plain",))

        def verify_with(backend: str, approximate: bool = False) -> Callable[[], Any]:
            def run() -> Any:
                ops.force_backend(backend)
                return ops.verify(step.scores, step.draft_tokens, step.num_proposed, step.draft_probs, step.params,
                                  step.key, step.sample_index, step.position, approximate=approximate)
            return run

        fused = median_seconds(verify_with("triton"), device, profile.repeats)
        unfused = median_seconds(verify_with("torch"), device, profile.repeats)
        approx = median_seconds(verify_with("triton", approximate=True), device, profile.repeats)
        out.append(Check("fused", f"verify V={vocab} R={rows} G={gamma} bf16",
                         f"fused {fused * 1e6:.0f} us, unfused torch {unfused * 1e6:.0f} us ({unfused / fused:.1f}x), "
                         f"approximate {approx * 1e6:.0f} us", None,
                         dict(fused_us=fused * 1e6, unfused_us=unfused * 1e6, approximate_us=approx * 1e6)))
    g = torch.Generator().manual_seed(0)
    base, noise = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ops.force_backend("triton")
    for name, logits in (("peaked", base * 3), ("flat", base * 0.5), ("log-probs", torch.log_softmax(base * 2, 0))):
        measured, analytic, bound = approximate_tv(logits, torch.softmax(logits + noise, 0), profile.tv_rows, device)
        out.append(Check("fused", f"approximate TV, {name} logits (V=16, {profile.tv_rows} steps)",
                         f"measured {measured:.4f}, analytic {analytic:.4f} (sampling bound {bound:.4f})",
                         abs(measured - analytic) <= bound, dict(measured=measured, analytic=analytic, bound=bound)))
    return out


# ----------------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------------- e. graphs


def ragged_step_parity(model: LlamaModel, steps: Any, batch: int, width: int, profile: Profile) -> dict:
    """One ragged step (rows of random prompt lengths, widths 1..width) run eagerly and then as a
    static step from the same cache state: the largest logit difference relative to the largest
    logit, and how often the argmax agrees, at real positions."""
    device = model.device
    g = torch.Generator().manual_seed(batch * 31 + width)
    lengths = torch.randint(1, profile.prompt_len + 1, (batch,), generator=g)
    widths = torch.randint(1, width + 1, (batch,), generator=g)
    cache = model.new_cache(batch, profile.prompt_len + width + 1)
    slots = torch.randperm(batch, generator=g).to(device)  # rows not in slot order
    prefix = torch.randint(3, model.config.vocab_size, (batch, profile.prompt_len), generator=g).to(device)
    tokens = torch.randint(3, model.config.vocab_size, (batch, width), generator=g).to(device)
    with torch.inference_mode():
        model.steps = None
        model(prefix, cache, slots, lengths.to(device), last_only=True)  # prefill, eager
        start = cache.lengths.clone()
        eager = model(tokens, cache, slots, widths.to(device)).clone()
        cache.lengths.copy_(start)
        model.steps = steps
        static = model(tokens, cache, slots, widths.to(device)).clone()
    real = torch.arange(width, device=device)[None, :] < widths.to(device)[:, None]  # [B, W]
    e, s_ = eager[real], static[real]  # [N, V]
    return dict(rel_diff=float((e - s_).abs().max() / e.abs().max().clamp(min=1e-30)),
                argmax_agree=float((e.argmax(-1) == s_.argmax(-1)).float().mean()))


def graph_checks(profile: Profile, device: torch.device) -> list[Check]:
    """Static steps against the eager forward: logits on ragged steps, forward time at each batch
    and width, and whole engine steps with graphed target and draft. On a GPU the static steps
    are CUDA graphs; with --smoke (CPU) they run eagerly, which times nothing useful."""
    from specbatch.models.steps import use_static_steps

    ops.force_backend(None)
    graphs = device.type == "cuda"
    kind = "CUDA graphs" if graphs else "static steps (eager, CPU)"
    widest = max(profile.widths)
    target, hf = random_models(profile.target, profile.dtype, device, seed=0)
    del hf
    draft, hf_draft = random_models(profile.draft, profile.dtype, device, seed=1)
    del hf_draft
    steps = use_static_steps(target, widest, max(profile.batches), graphs=graphs)
    use_static_steps(draft, 2, max(profile.batches), graphs=graphs)
    out = []
    for batch in profile.batches:
        parity = ragged_step_parity(target, steps, batch, widest, profile)
        ok = parity["rel_diff"] <= 2e-2 and parity["argmax_agree"] >= 0.98
        out.append(Check("graphs", f"ragged step parity, batch {batch}",
                         f"{kind} vs eager: max |diff| {parity['rel_diff']:.2g} of the largest logit, argmax agrees "
                         f"on {parity['argmax_agree']:.1%} of positions", ok, dict(batch=batch, **parity)))
    context = profile.prompt_len + profile.new_tokens // 2
    for width in profile.widths:
        for batch in profile.batches:
            target.steps = None
            eager = time_forward(target, batch, width, context=context)
            target.steps = steps
            static = time_forward(target, batch, width, context=context)
            engine = statistics.median(engine_step_seconds(target, draft, batch, width, profile) or [float("nan")])
            out.append(Check("graphs", f"batch {batch} width {width}",
                             f"target forward {eager * 1e3:.2f} ms eager, {static * 1e3:.2f} ms {kind} "
                             f"(x{eager / static:.2f}); engine step {engine * 1e3:.2f} ms", None,
                             dict(batch=batch, width=width, eager_forward_ms=eager * 1e3,
                                  static_forward_ms=static * 1e3, engine_step_ms=engine * 1e3, graphs=graphs)))
    return out


SECTIONS: dict[str, Callable[[Profile, torch.device], list[Check]]] = {
    "kernels": kernel_checks, "exactness": exactness_checks, "steps": step_checks, "fused": fused_checks,
    "graphs": graph_checks,
}


def table(checks: Sequence[Check]) -> str:
    rows = [(c.section, c.case, {True: "pass", False: "FAIL", None: "-"}[c.ok], c.result) for c in checks]
    headers = ("section", "case", "ok", "result")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(x).ljust(w) for x, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                cuda=torch.version.cuda, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
                python=platform.python_version())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, kernels interpreted")
    ap.add_argument("--out", type=pathlib.Path, help="write the checks as JSON here")
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)")
    args = ap.parse_args(argv)
    profile = SMOKE if args.smoke else GPU
    if profile.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU run", file=sys.stderr)
        return 2
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 (set it, or run this file as a script)", file=sys.stderr)
        return 2
    device = torch.device(profile.device)
    saved = (ops._backend, ops._forced)
    started = time.perf_counter()
    checks: list[Check] = []
    timings = {}
    try:
        for name, section in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            found = section(profile, device)
            timings[name] = time.perf_counter() - start
            checks += found
            print(f"{name}: {len(found)} checks in {timings[name]:.1f} s", file=sys.stderr, flush=True)
    finally:
        ops._backend, ops._forced = saved
    passed = all(c.ok is not False for c in checks)
    print(table(checks))
    print(f"gpu_check {profile.name}: {'PASS' if passed else 'FAIL'} in {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(dict(
            profile=profile.name, passed=passed, seconds=time.perf_counter() - started, section_seconds=timings,
            environment=environment(device),
            sections={name: [dataclasses.asdict(c) for c in checks if c.section == name]
                      for name in SECTIONS if not args.only or name in args.only},
        ), indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
