"""The on-chip CUDA Sinkhorn (pisces_fast/ops/cuda) against the Triton 16-bit sweeps, split into its parts.

    python benchmarks/sinkhorn_onchip_bench.py                 # paper shape: 640 problems of 40 x 2049
    python benchmarks/sinkhorn_onchip_bench.py --out r.json    # also write the numbers

Needs a CUDA device. Every row is a `triton.testing.do_bench` median of one launch through
`sinkhorn_forward` (the Triton backend's standalone solver) with tol = 0, at 100 and 200 iterations:
per iteration = (t200 - t100) / 100; "kernel_t<threads>_<iters>" times the CUDA kernel alone at 0 / 100 / 200
iterations (0: the range pass, the kernel build in shared memory and the plan). Also printed: the largest
per-entry difference between the shared-memory and the Triton sweep's plans. benchmarks/RESULTS.md
("Third GPU session") has the numbers and the model they are compared with.
"""
from __future__ import annotations

import argparse
import json

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=640)
    parser.add_argument("--rows", type=int, default=40, help="N (text tokens)")
    parser.add_argument("--cols", type=int, default=2049, help="M (video tokens)")
    parser.add_argument("--threads", type=int, nargs="+", default=[256, 384], help="CTA sizes for the kernel-only rows")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sinkhorn_onchip_bench.py needs a CUDA device")
    import triton

    from pisces_fast.ops.cuda import sinkhorn as cs
    from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward, sinkhorn_path, solver_params

    torch.manual_seed(0)
    p, n, m = args.problems, args.rows, args.cols
    cost = torch.rand(p, n, m, device="cuda")
    print(sinkhorn_path(n, m, torch.float32, "float16", 0.9, 0.05, cost.device), flush=True)
    res = {}

    def bench(name, fn):
        fn()
        torch.cuda.synchronize()
        res[name] = round(triton.testing.do_bench(fn, warmup=30, rep=300, return_mode="median"), 4)
        print(f"{name:28s} {res[name]:9.4f} ms", flush=True)

    def solve(iters, kd, sweep):
        return lambda: sinkhorn_forward(cost, None, None, 0.05, 0.9, iters, 0.0, kernel_dtype=kd, sweep=sweep)

    for it in (100, 200):
        bench(f"float16_shared_{it}", solve(it, "auto", "shared"))
        bench(f"bfloat16_shared_{it}", solve(it, "bfloat16", "shared"))
        bench(f"float16_stream_{it}", solve(it, "auto", "stream"))
    params = solver_params(0.05, 0.9, 0.0, torch.float32, cost.device)
    plan = torch.empty_like(cost)
    n_iter = torch.empty(p, dtype=torch.int32, device="cuda")
    storage = torch.empty_like(n_iter)
    for threads in args.threads:
        for it in (0, 100, 200):
            bench(f"kernel_t{threads}_{it}", lambda: cs.sinkhorn_onchip(cost, plan, None, None, params, n_iter, storage,
                                                                        it, False, threads=threads))
    a = solve(100, "auto", "shared")()
    b = solve(100, "auto", "stream")()
    res["shared_vs_stream_max_rel"] = float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
    keys = ["float16_shared", "bfloat16_shared", "float16_stream"] + [f"kernel_t{t}" for t in args.threads]
    res["per_iteration_us"] = {k: round((res[f"{k}_200"] - res[f"{k}_100"]) * 10, 2) for k in keys}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
