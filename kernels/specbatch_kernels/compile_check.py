"""Compile every kernel for a GPU architecture without a GPU (ahead of time, to PTX and cubin).

The CPU interpreter runs the kernels' arithmetic but not Triton's compiler: type errors in
loop-carried values, constexpr misuse or unsupported ops show only when compiling.  This does
that for each kernel in the layouts the host wrapper launches (one row per program with a
4096-wide vocabulary tile, and packed rows for small vocabularies)::

    python -m specbatch_kernels.compile_check            # sm_90 (Hopper)
    python -m specbatch_kernels.compile_check --arch 80  # sm_80 (Ampere)

It must run without TRITON_INTERPRET (kernels decorated under the interpreter cannot compile);
the module refuses to start otherwise.  Exit status 1 when a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys

P32, P64, I32, C = "*fp32", "*i64", "i32", "constexpr"
LAYOUTS = ((1, 4096), (256, 16))  # (BLOCK_R, BLOCK_V): a big vocabulary, and V <= 16 packed


def kernels():
    """(name, jit function, signature, constexprs) for every kernel and layout."""
    from specbatch_kernels import approximate, attention, verify, warp
    from specbatch_kernels import rng as krng

    out = []
    for block_r, block_v in LAYOUTS:
        tile = {"BLOCK_R": block_r, "BLOCK_V": block_v}
        for write_probs in (False, True):
            sig = dict(logits_ptr="*bf16", stride_row=I32, temperature_ptr=P32, top_k_ptr=P64, top_p_ptr=P32,
                       min_p_ptr=P32, key_ptr=P64, sample_ptr=P64, position_ptr=P64, role=I32, tokens_ptr=P64,
                       logprob_ptr=P32, probs_ptr=P32, M=I32, V=I32, WRITE_PROBS=C, BLOCK_R=C, BLOCK_V=C)
            out.append((f"warp_sample probs={write_probs} {block_r}x{block_v}", warp._warp_sample_kernel, sig,
                        {"WRITE_PROBS": write_probs, **tile}))
        sig = dict(logits_ptr="*fp16", stride_r=I32, stride_g=I32, draft_ptr=P64, num_proposed_ptr=P64,
                   temperature_ptr=P32, top_k_ptr=P64, top_p_ptr=P32, min_p_ptr=P32, stats_ptr=P32, amax_ptr=P64,
                   p_x_ptr=P32, logp_x_ptr=P32, P=I32, G=I32, V=I32, BLOCK_R=C, BLOCK_V=C)
        out.append((f"verify pairs {block_r}x{block_v}", verify._pair_kernel, sig, dict(tile)))
        for one_hot in (False, True):
            sig = dict(logits_ptr=P32, stride_r=I32, stride_g=I32, draft_ptr=P64, num_proposed_ptr=P64, q_ptr=P32,
                       stride_qr=I32, stride_qg=I32, key_ptr=P64, sample_ptr=P64, position_ptr=P64, stats_ptr=P32,
                       amax_ptr=P64, p_x_ptr=P32, logp_x_ptr=P32, tokens_ptr=P64, logprobs_ptr=P32, counts_ptr=P64,
                       R=I32, G=I32, V=I32, ONE_HOT=C, BLOCK_R=C, BLOCK_V=C)
            out.append((f"verify emit one_hot={one_hot} {block_r}x{block_v}", verify._emit_kernel, sig,
                        {"ONE_HOT": one_hot, **tile}))
            sig = dict(logits_ptr=P32, stride_r=I32, stride_g=I32, draft_ptr=P64, num_proposed_ptr=P64, q_ptr=P32,
                       stride_qr=I32, stride_qg=I32, temperature_ptr=P32, key_ptr=P64, sample_ptr=P64,
                       position_ptr=P64, tokens_ptr=P64, logprobs_ptr=P32, counts_ptr=P64, R=I32, G=I32, V=I32,
                       ONE_HOT=C, BLOCK_R=C, BLOCK_V=C)
            out.append((f"approximate one_hot={one_hot} {block_r}x{block_v}", approximate._approx_kernel, sig,
                        {"ONE_HOT": one_hot, **tile}))
    # Slot attention as a GPU step launches it: bf16/fp16 (and float32 with IEEE products), with and
    # without a shared prompt and a sliding window, int64 and int32 lengths.
    for dtype, index, has_prefix, has_window, g, hd, block_m, block_n in (
            ("bf16", P64, True, True, 4, 128, 32, 64), ("fp16", "*i32", False, False, 1, 64, 16, 64),
            ("fp32", P64, True, False, 8, 256, 64, 32), ("bf16", "*i32", False, True, 2, 128, 16, 64)):
        t = "*" + dtype
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, slots_ptr=index, start_ptr=index, ntok_ptr=index,
                   pk_ptr=t, pv_ptr=t, pslot_ptr=index, plen_ptr=index,
                   **{name: I32 for name in ("stride_qb", "stride_qw", "stride_qh", "stride_ks", "stride_kh",
                                             "stride_kl", "stride_vs", "stride_vh", "stride_vl", "stride_ob",
                                             "stride_ow", "stride_oh", "stride_pks", "stride_pkh", "stride_pkl",
                                             "stride_pvs", "stride_pvh", "stride_pvl", "W", "HD", "window")},
                   scale="fp32", G=C, HAS_PREFIX=C, HAS_WINDOW=C, PRECISION=C, UPCAST=C, BLOCK_M=C, BLOCK_N=C,
                   BLOCK_D=C)
        consts = dict(G=g, HAS_PREFIX=has_prefix, HAS_WINDOW=has_window,
                      PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_D=hd)
        out.append((f"slot_attention {dtype} g={g} hd={hd} prefix={has_prefix} window={has_window}",
                    attention._slot_attention_kernel, sig, consts))
    sig = dict(key_ptr=P64, sample_ptr=P64, pos_ptr=P64, role_ptr=P64, lane_ptr=P64, out_ptr=P32, n=I32, BLOCK=C)
    out.append(("uniform", krng._uniform_kernel, sig, {"BLOCK": 256}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--only", action="append", default=[], help="compile only kernels whose name contains this "
                    "(repeatable: any of them)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, sig, constexprs in kernels():
        if args.only and not any(part in name for part in args.only):
            continue
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                      options={"num_warps": 8})
            stages = ",".join(k for k in ("ttgir", "ptx", "cubin") if compiled.asm.get(k))
            print(f"ok      sm_{args.arch} {name} ({stages})")
        except Exception as err:  # report every kernel, then fail
            failed += 1
            print(f"FAILED  sm_{args.arch} {name}: {type(err).__name__}: {str(err)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
