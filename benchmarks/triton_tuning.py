"""Launch-configuration sweep of the Triton kernels at the paper's shape (640 problems of 40 x 2049, D = 64).

    python benchmarks/triton_tuning.py            # on a GPU: times every candidate, prints a table per family
    python benchmarks/triton_tuning.py --defaults # on a GPU: the shipped defaults only, with the eager reference
    python benchmarks/triton_tuning.py --compile  # anywhere: ptxas registers / spills of every candidate (sm_90a)

Three families, each swept with everything else at its default:

* ``sinkhorn``: warps per program and persistent programs per SM of the standalone solver's scaling pass
  (``sinkhorn.sinkhorn_blocks(scaling_only=True)`` / ``_launch.solve_programs``), for the float32 and float16
  kernel storage; only the candidates with the solver's own tile width (its passes share the scratch stride),
  and an 8-warp candidate is the single-launch solver. One program per SM with 8 warps (the first default) leaves the sweep's per-tile reduction latency
  exposed; two 4-warp programs per SM hide one behind the other.
* ``attn_solve``: the same Sinkhorn candidates in the fused ``ot_attention`` solve (scaling domain, float32;
  its device time from one profiled forward + backward), including 1- and 2-warp programs, 4-8 per SM, which
  only the fused solve can take (the standalone scaling pass shares the log pass's tile width).
* ``dot``: column-tile width and warps of the dot-product kernels (``attention._blocks``: fuse, dq, dk/dv).

Timing: ``triton.testing.do_bench`` medians; per-kernel device times from one profiled call. The candidates
are applied by replacing the two block-choice functions for the duration of a run (no environment knobs in
the library), so the defaults the library ships are whatever ``sinkhorn_blocks`` / ``_blocks`` return.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pisces_fast.ops.triton import attention as at  # noqa: E402
from pisces_fast.ops.triton import sinkhorn as sk  # noqa: E402

N, M, D, B, H, ITERS = 40, 2049, 64, 40, 16, 100
SINKHORN = [  # (warps, tile elements, programs per SM)
    (8, 4096, 1), (8, 2048, 1), (4, 2048, 1), (4, 2048, 2), (4, 4096, 2),
    # More, smaller programs per SM (more independent tiles in flight to hide the per-tile reduction
    # latency); spill-free in the fused solve on sm_80 / sm_90a. The standalone solver's scaling pass shares
    # the log pass's tile width, which spills at 1-2 warps, so these are timed in the fused solve only.
    (2, 2048, 4), (1, 1024, 8),
]
FUSED_ONLY_WARPS = (1, 2)
DOT = [  # (row block, column tile, warps, fuse and dk/dv num_stages or None) of fuse / dq / dk-dv
    (32, 16, 8, None), (32, 32, 8, None), (32, 32, 8, 1), (64, 32, 8, None), (32, 64, 8, None), (32, 64, 8, 1),
]


@contextlib.contextmanager
def sinkhorn_config(warps: int, tile: int, per_sm: int):
    original = sk.sinkhorn_blocks

    def blocks(n, m, dtype, device, scaling_only=False):
        bn, bm, default_warps = original(n, m, dtype, device, scaling_only)
        if not scaling_only:  # the candidate is the scaling sweep's; the log-domain pass keeps its blocks
            return bn, bm, default_warps
        return bn, max(4, min(sk.next_pow2(m), tile // bn)), warps

    sk.sinkhorn_blocks = at.sinkhorn_blocks = blocks
    old_env = os.environ.get("PISCES_FAST_TRITON_SOLVE_PROGRAMS")
    if torch.cuda.is_available():
        os.environ["PISCES_FAST_TRITON_SOLVE_PROGRAMS"] = str(per_sm * torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        yield
    finally:
        sk.sinkhorn_blocks = at.sinkhorn_blocks = original
        if old_env is None:
            os.environ.pop("PISCES_FAST_TRITON_SOLVE_PROGRAMS", None)
        else:
            os.environ["PISCES_FAST_TRITON_SOLVE_PROGRAMS"] = old_env


@contextlib.contextmanager
def dot_config(rows: int, cols: int, warps: int, fuse_stages=None):
    original = at._blocks

    def blocks(n, m, d, dv, dtype, device):
        cfg = dict(original(n, m, d, dv, dtype, device))
        cfg["bn"] = min(cfg["bn"], rows) if rows <= 32 else rows
        for k in ("fuse", "dq", "dkdv"):
            cfg[k] = (cols, warps)
        # fuse *and* dk/dv num_stages: None = Triton's default software pipelining of the streamed loads (key /
        # value in fuse, q / dout in dk/dv; this clears the shipped num_stages=1); 1 = none (fewer registers)
        stages = {} if fuse_stages is None else {"num_stages": fuse_stages}
        cfg["fuse_options"], cfg["dkdv_options"] = stages, dict(stages)
        return cfg

    at._blocks = blocks
    try:
        yield
    finally:
        at._blocks = original


def compile_candidates(arch: int) -> None:
    from pisces_fast.ops.triton import compile_report as cr

    for w, t, per_sm in SINKHORN:
        with sinkhorn_config(w, t, per_sm):
            rows = cr.report(arch, "paper", ["sinkhorn_scaling_pass", "sinkhorn_fp16_onchip_scaling_pass", "attn_solve_scaling"], sass=False)
        print(f"sinkhorn warps={w} tile={t}: " + "; ".join(
            f"{r.name} regs={r.registers} spills={r.spill_stores}/{r.spill_loads}" for r in rows), flush=True)
    for bn, bm, w, st in DOT:
        with dot_config(bn, bm, w, st):
            rows = cr.report(arch, "paper", ["attn_fuse", "attn_bwd_dq", "attn_bwd_dkdv"], sass=False)
        print(f"dot rows={bn} cols={bm} warps={w} fuse/dk-dv stages={st}: " + "; ".join(
            f"{r.name} regs={r.registers} spills={r.spill_stores}/{r.spill_loads} smem={r.shared}" for r in rows),
            flush=True)


def kernel_bytes(p: int, n: int, m: int, d: int, ms: int, iters: int, itemsize: int = 4) -> dict:
    """Compulsory bytes of each ot_attention kernel (forward + backward, no plan returned): every tensor it
    reads or writes, once; the solve streams the padded operand (``p x n x ms``) once per iteration. Per-row
    statistics (a few values per query row) are left out. What a kernel moves beyond this (K and V re-read per
    row block, the solve's one pass normalizing the operand before its iterations, ~2 % at the paper's shape)
    is the design's, not the floor's."""
    q, kv, o, scratch = p * n * d, p * m * d, p * n * d, p * n * ms
    return {k: v * itemsize for k, v in {
        "_attn_stats_kernel": q + kv,
        "_attn_cost_kernel": q + kv + scratch,
        "_attn_solve_kernel": iters * scratch + p * m,
        "_attn_fuse_kernel": q + 2 * kv + p * m + 2 * o,
        "_attn_bwd_dq_kernel": q + 2 * kv + p * m + 3 * o + q,
        "_attn_bwd_dkdv_kernel": q + 2 * kv + p * m + o + 2 * kv,
    }.items()}


def with_bandwidth(times_ms: dict, nbytes: dict) -> dict:
    """``times_ms`` plus, per kernel with a byte count, its achieved GB/s over those compulsory bytes."""
    out = dict(times_ms)
    for name, ms in times_ms.items():
        if name in nbytes and ms:
            out[name + "_GBps"] = round(nbytes[name] / (ms * 1e-3) / 1e9)
    return out


def kernel_times(fn, reps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("_"):  # our Triton kernels
            out[e.key] = round(e.device_time_total / reps / 1e3, 3)
    return out


def time_candidates(defaults_only: bool = False) -> list:
    import triton

    from pisces_fast import ot_attention, sinkhorn_unbalanced, video_token_positions

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cost = torch.rand(B * H, N, M, device=dev, generator=g)
    ref = sinkhorn_unbalanced(cost.double(), eps=0.05, mass=0.9, max_iter=ITERS, tol=0.0, backend="reference")
    rows = []
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731
    sink_configs = [None] if defaults_only else SINKHORN
    dot_configs = [None] if defaults_only else DOT
    t_idx, s_idx = video_token_positions(8, 16, 16, prefix_tokens=1, dtype=torch.float32, device=dev)
    q, k, v, dout = (torch.randn(B, H, n, D, device=dev, generator=g) for n in (N, M, M, N))

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = ot_attention(*leaves, t_idx, s_idx, eps=0.05, mass=0.9, max_iter=ITERS, tol=0.0, backend="triton")
        out.backward(dout)
        return out, leaves

    if not defaults_only:  # the fused ot_attention solve (scaling domain, float32) per candidate
        default_out = fwd_bwd()[0].detach()
        for sc in SINKHORN:
            with sinkhorn_config(*sc):
                out = fwd_bwd()[0].detach()
                solve_ms = kernel_times(fwd_bwd).get("_attn_solve_kernel")
            err = float((out - default_out).abs().max() / default_out.abs().max())
            row = dict(family="attn_solve", warps=sc[0], tile=sc[1], programs_per_sm=sc[2], solve_ms=solve_ms,
                       out_vs_default_max_rel=f"{err:.1e}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    # The standalone solver takes its tile width from the log pass's blocks (both passes share the scratch
    # stride), so only the candidates with that tile are what they say there.
    sbn, sbm, _ = sk.sinkhorn_blocks(N, M, torch.float32, dev)
    for kd in ("float32", "float16"):
        for sc in sink_configs:
            if sc and (sc[0] in FUSED_ONLY_WARPS or sc[1] != sbn * sbm):
                continue
            w, t, per_sm = sc if sc else ("default",) * 3
            with (sinkhorn_config(*sc) if sc else contextlib.nullcontext()):
                fn = lambda: sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=ITERS, tol=0.0,  # noqa: E731
                                                 backend="triton", kernel_dtype=kd)
                err = float((fn().double() - ref).abs().max() / ref.abs().max())
                ms = bench(fn)
                fn2 = lambda: sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=2, tol=0.0,  # noqa: E731
                                                  backend="triton", kernel_dtype=kd)
                ms2 = bench(fn2)
            row = dict(family="sinkhorn", kernel_dtype=kd, warps=w, tile=t, programs_per_sm=per_sm, median_ms=round(ms, 3),
                       us_per_iter=round((ms - ms2) / (ITERS - 2) * 1e3, 1), max_rel_err=f"{err:.1e}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = None
    if defaults_only:  # the eager reference in the same run, for the ratio
        ref_fn = lambda: ot_attention(*[x.detach().requires_grad_() for x in (q, k, v)], t_idx, s_idx,  # noqa: E731
                                      eps=0.05, mass=0.9, max_iter=ITERS, tol=0.0, backend="reference").backward(dout)
        rows.append(dict(family="dot", impl="reference-eager", fwd_bwd_ms=round(bench(ref_fn), 3)))
        print(json.dumps(rows[-1]), flush=True)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        out = ot_attention(*leaves, t_idx.double(), s_idx.double(), eps=0.05, mass=0.9, max_iter=ITERS, tol=0.0,
                           backend="reference")
        out.backward(dout.double())
        base = [out.detach()] + [x.grad for x in leaves]  # errors below: vs this float64 reference
    for dc in dot_configs:
        bn, bm, w, st = dc if dc else ("default",) * 4
        with (dot_config(*dc) if dc else contextlib.nullcontext()):
            out, leaves = fwd_bwd()
            got = [out.detach()] + [x.grad for x in leaves]
            if base is None:
                base = got
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, base))
            ms = bench(fwd_bwd)
            stride = at.solve_layout(N, M, torch.float32, dev, scaling=True)[3]
            kt = with_bandwidth(kernel_times(fwd_bwd), kernel_bytes(B * H, N, M, D, stride, ITERS))
        row = dict(family="dot", rows=bn, cols=bm, warps=w, fuse_stages=st, fwd_bwd_ms=round(ms, 3), vs_first_max_rel=f"{err:.1e}", **kt)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="compile-only register / spill report of every candidate")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--defaults", action="store_true", help="time the shipped defaults only (and the eager reference)")
    p.add_argument("--out", default=None, help="JSON file for the timed rows")
    args = p.parse_args(argv)
    if args.compile:
        compile_candidates(args.arch)
        return
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU (--compile works anywhere)")
    rows = time_candidates(args.defaults)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
