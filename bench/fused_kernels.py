"""Verification and sampling kernels: fused Triton vs the unfused torch reference vs FlashInfer.

For each (vocab, rows, gamma) it times one verification step from target logits, and one
warp-and-sample of rows x (gamma + 1) plain rows, as the median of 3 runs, and reports
microseconds and effective GB/s against the *bandwidth bound*: the time to read the inputs once
(target logits, plus the dense draft q for verification) at the device's memory bandwidth.

    python bench/fused_kernels.py                   # CPU: the torch reference alone, a small grid
    python bench/fused_kernels.py --full            # vocab 32k/128k/152k, rows 1..256, gamma 1..8
    python bench/fused_kernels.py --vocab 151936 --rows 64 --gamma 4

On CUDA the fused kernels run too, and FlashInfer where it is installed (its chain speculative
sampling takes probabilities, so its time includes the softmax that makes them).  On CPU only the
reference is timed: the Triton interpreter is a correctness tool, not a performance path.
Warping: temperature 0.8 and top-p 0.9 on every row (``--plain`` for temperature only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, memory_bandwidth, table  # noqa: E402

from specbatch.sampling import rng  # noqa: E402
from specbatch.sampling.warping import WarpParams  # noqa: E402
from specbatch_kernels import ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak DRAM bandwidth of known GPUs, bytes/s (datasheet figures; the CPU is measured).
GPU_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}


def device_bandwidth(device: torch.device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from) of the device's memory."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in GPU_BANDWIDTH.items():
            if key in name:
                return bw, f"{name} datasheet"
        return 2.0e12, f"{name} (unknown: 2 TB/s assumed)"
    return memory_bandwidth(gib=0.25), "CPU copy, measured"


def make_inputs(vocab: int, rows: int, gamma: int, dtype: torch.dtype, plain: bool, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(rows, gamma + 1, vocab, generator=g) * 3).to(dtype).to(device)  # [R, G+1, V]
    q = torch.softmax(logits[:, :gamma].float() + torch.randn(rows, gamma, vocab, generator=g).to(device), dim=-1)
    key = torch.arange(rows, dtype=torch.int64, device=device)
    sample_index = torch.zeros(rows, dtype=torch.int64, device=device)
    position = torch.zeros(rows, dtype=torch.int64, device=device)
    u = rng.uniform(key[:, None], sample_index[:, None], torch.arange(gamma, device=device)[None, :], rng.Role.DRAFT)
    draft = torch.searchsorted(q.cumsum(-1), (u * q.sum(-1))[..., None]).squeeze(-1).clamp(max=vocab - 1)  # [R, G]
    n = rows * (gamma + 1)
    ones = torch.ones(n, dtype=torch.float32, device=device)
    warp = WarpParams(
        temperature=ones * 0.8, top_k=torch.zeros(n, dtype=torch.int64, device=device),
        top_p=ones.clone() if plain else ones * 0.9, min_p=torch.zeros_like(ones),
        repetition_penalty=ones.clone(), presence_penalty=torch.zeros_like(ones), frequency_penalty=torch.zeros_like(ones),
    )
    num_proposed = torch.full((rows,), gamma, dtype=torch.int64, device=device)
    return logits, draft, num_proposed, q.contiguous(), warp, key, sample_index, position


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn over repeats (after a warm-up), synchronizing the GPU."""

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    seconds, _ = median_time(run, repeats)
    return seconds


def flashinfer_verify(logits, draft, q, warp):
    """FlashInfer's chain speculative sampling (probabilities in: softmax included), or None."""
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return None
    rows, g1, vocab = logits.shape

    def run():
        p = torch.softmax(logits.float() / 0.8, dim=-1)
        return fs.chain_speculative_sampling(q, draft.to(torch.int32), p)

    return run


def flashinfer_sample(logits2d, plain: bool):
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return None
    if plain:
        return lambda: fs.sampling_from_logits(logits2d.float() / 0.8)
    return lambda: fs.top_p_sampling_from_probs(torch.softmax(logits2d.float() / 0.8, dim=-1), 0.9)


def bench_one(vocab, rows, gamma, dtype, plain, device, repeats, bandwidth):
    logits, draft, num_proposed, q, warp, key, sample_index, position = make_inputs(
        vocab, rows, gamma, dtype, plain, device)
    in_bytes = logits.numel() * logits.element_size() + q.numel() * 4  # inputs read once

    def verify_with(name):
        ops.force_backend(name)
        return lambda: ops.verify(logits, draft, num_proposed, q, warp, key, sample_index, position)

    flat = logits.reshape(-1, vocab)
    n = flat.shape[0]
    keys = torch.arange(n, dtype=torch.int64, device=device)
    zeros = torch.zeros(n, dtype=torch.int64, device=device)
    sample_bytes = flat.numel() * flat.element_size()

    def sample_with(name):
        ops.force_backend(name)
        return lambda: ops.warp_and_sample(flat, warp, keys, zeros, zeros)

    results = []
    for what, make, nbytes, fi in (
        ("verify", verify_with, in_bytes, flashinfer_verify(logits, draft, q, warp) if device.type == "cuda" else None),
        ("sample", sample_with, sample_bytes, flashinfer_sample(flat, plain) if device.type == "cuda" else None),
    ):
        ref = timed(make("torch"), device, repeats)
        fused = timed(make("triton"), device, repeats) if device.type == "cuda" else None
        flash = None
        if fi is not None:
            try:
                flash = timed(fi, device, repeats)
            except Exception as err:  # an API change in FlashInfer must not hide the other columns
                print(f"flashinfer {what} failed: {type(err).__name__}: {err}")
        b = nbytes / bandwidth
        row = [what, vocab, rows, gamma, ref * 1e6, nbytes / ref / 1e9]
        row += ["-", "-"] if fused is None else [fused * 1e6, nbytes / fused / 1e9]
        row += ["-"] if flash is None else [flash * 1e6]
        row += [b * 1e6, (fused or ref) / b]
        results.append(row)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="*", default=None)
    ap.add_argument("--rows", type=int, nargs="*", default=None)
    ap.add_argument("--gamma", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--full", action="store_true", help="the whole grid (slow on CPU)")
    ap.add_argument("--plain", action="store_true", help="temperature only, no top-p")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = args.full or device.type == "cuda"
    vocabs = args.vocab or ([32000, 128256, 151936] if full else [32000, 151936])
    rows_list = args.rows or ([1, 16, 64, 256] if full else [1, 16])
    gammas = args.gamma or ([1, 4, 8] if full else [1, 4])
    bandwidth, source = device_bandwidth(device)
    previous = ops.backend()
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'no CUDA'}), "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s ({source}), dtype {args.dtype}, "
          f"{'temperature 0.8' if args.plain else 'temperature 0.8 + top-p 0.9'}, median of {args.repeats}")
    if device.type == "cpu":
        print("no CUDA device: the fused kernels and FlashInfer are not timed; the torch reference alone")
    rows_out = []
    try:
        for v in vocabs:
            for r in rows_list:
                for g in gammas:
                    rows_out += bench_one(v, r, g, DTYPES[args.dtype], args.plain, device, args.repeats, bandwidth)
    finally:
        ops.force_backend(previous)
    headers = ["op", "vocab", "rows", "gamma", "ref us", "ref GB/s", "fused us", "fused GB/s", "flashinfer us",
               "bound us", "x bound"]
    print(table(headers, rows_out))
    print("bound: inputs read once at the device bandwidth; x bound: the fastest timed path / bound. "
          "sample rows = rows x (gamma + 1).")


if __name__ == "__main__":
    main()
