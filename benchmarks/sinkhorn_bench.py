"""Batched unbalanced Sinkhorn (Algorithm 3): every backend against the reference and POT.

    python benchmarks/sinkhorn_bench.py            # headline shape + sweeps over M and problem count
    python benchmarks/sinkhorn_bench.py --quick    # small sweep, < 1 minute on a 2-core CPU

Headline shape: 32 problems of 40 x 2049 on CPU (the CPU target of the kernels issue), 640 on GPU
(the paper's per-step load: 5 layers x 16 heads x batch 8); eps = 0.05, m = 0.9, `--iters`
iterations with tol = 0 (every implementation does the same amount of work).

Implementations, all in one run: the log-domain reference eager and under torch.compile (its
iteration body compiled, see _compiled_reference.py; not in --quick unless --compile), POT's
`ot.unbalanced.sinkhorn_unbalanced(..., reg_type="entropy")` looped per problem (torch backend,
and NumPy on CPU), and every backend in `pisces_fast.ops.available_backends(device)` through the public API
("cpp-op-only": the C++ op called without the API's input validation; on a GPU "triton-float16-triton-sweep":
the Triton 16-bit sweep that the on-chip CUDA kernel replaces where it applies). Each row also
reports the largest plan difference to the eager reference (a benchmark that got a wrong answer
fast would show it).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _compiled_reference  # noqa: E402
from _harness import (Row, append_csv, device_name, fill_ratios, load_average, plot_sweeps, print_table,  # noqa: E402
                      time_fn)

from pisces_fast import sinkhorn_unbalanced  # noqa: E402
from pisces_fast.ops import available_backends, reference  # noqa: E402
from pisces_fast.ops.backends import triton_interpreter_enabled  # noqa: E402

EPS, MASS, N_TEXT = 0.05, 0.9, 40


def pot_loop(cost: torch.Tensor, iters: int, numpy: bool):
    """POT's generalized Sinkhorn-Knopp (the same fixed point as Algorithm 3), one call per problem."""
    import ot

    p, n, m = cost.shape
    rho = EPS * MASS / (1 - MASS)
    if numpy:
        c = cost.cpu().numpy()
        a, b = torch.full((n,), 1.0 / n, dtype=cost.dtype).numpy(), torch.full((m,), 1.0 / m, dtype=cost.dtype).numpy()
        plans = [ot.unbalanced.sinkhorn_unbalanced(a, b, c[i], reg=EPS, reg_m=rho, reg_type="entropy",
                                                   numItermax=iters, stopThr=0.0) for i in range(p)]
        return torch.from_numpy(__import__("numpy").stack(plans)).to(cost.device)
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    return torch.stack([
        ot.unbalanced.sinkhorn_unbalanced(a, b, cost[i], reg=EPS, reg_m=rho, reg_type="entropy",
                                          numItermax=iters, stopThr=0.0)
        for i in range(p)
    ])


def implementations(device: torch.device, iters: int, with_compile: bool, with_pot: bool):
    impls = {}
    ref = functools.partial(reference.sinkhorn_unbalanced, eps=EPS, mass=MASS, max_iter=iters, tol=0.0)
    impls["reference-eager"] = ref
    if with_compile:
        impls["reference-compiled"] = functools.partial(_compiled_reference.sinkhorn, eps=EPS, mass=MASS,
                                                        max_iter=iters)
    for backend in available_backends(device):
        if backend == "reference":
            continue
        if backend == "triton" and device.type == "cpu" and triton_interpreter_enabled():
            continue  # the Triton interpreter is a correctness tool, not something to time
        impls[backend] = functools.partial(sinkhorn_unbalanced, eps=EPS, mass=MASS, max_iter=iters, tol=0.0,
                                           backend=backend)
        if backend in ("cpp", "triton"):
            # kernel_dtype="auto" (the row above) stores the kernel in float16 at this setting; each storage
            # explicitly, through the public API:
            for kd in ("float32", "bfloat16", "float16"):
                impls[f"{backend}-{kd}"] = functools.partial(sinkhorn_unbalanced, eps=EPS, mass=MASS,
                                                             max_iter=iters, tol=0.0, backend=backend, kernel_dtype=kd)
        if backend == "triton" and device.type == "cuda":
            # float16 above runs the on-chip CUDA kernel (pisces_fast/ops/cuda, sinkhorn_path's "shared" sweep)
            # where it applies; the Triton 16-bit sweep it replaced, in the same run:
            from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward

            impls["triton-float16-triton-sweep"] = functools.partial(
                lambda cost, **kw: sinkhorn_forward(cost, None, None, **kw), eps=EPS, mass=MASS, max_iter=iters,
                tol=0.0, kernel_dtype="float16", sweep="stream")
        if backend == "cpp":
            # The same kernel without the public API's input validation (NaN/Inf scans etc.).
            from pisces_fast.ops import cpp

            impls["cpp-op-only"] = functools.partial(cpp.sinkhorn_unbalanced, eps=EPS, mass=MASS, max_iter=iters,
                                                     tol=0.0)
    if with_pot:
        try:
            import ot  # noqa: F401

            impls["pot-torch-loop"] = functools.partial(pot_loop, iters=iters, numpy=False)
            if device.type == "cpu":
                impls["pot-numpy-loop"] = functools.partial(pot_loop, iters=iters, numpy=True)
        except ImportError:
            print("POT not installed: skipping the POT rows (pip install pot)")
    return impls


def kernel_dtype_errors(args):
    """Plan error of each cpp kernel storage vs the float64 reference (docs/numerics.md's table).

    Errors: max over entries >= 1e-30 of |P/P64 - 1| (what the a-priori bound is about) and max |P - P64| /
    max P64; the bound is ``cpp.kernel16_plan_error_bound``. Costs U[0, 1) (the paper's normalized range),
    eps = 0.05; masks drop ~1/3 of rows and columns on the odd shapes.
    """
    from pisces_fast.ops import cpp

    gen = torch.Generator().manual_seed(1)
    cases = [(8, 40, 2049, 0.9, False), (8, 40, 2049, 0.8, False), (8, 7, 37, 0.9, True), (8, 33, 301, 0.9, True),
             (4, 40, 4097, 0.9, True), (8, 40, 2049, 0.95, False)]
    rows = []
    print("| P x N x M | m (tau) | masked | kernel | plan max rel. error (entries) | max abs. error / max | "
          "a-priori bound | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for p, n, m, mass, masked in cases:
        cost = torch.rand(p, n, m, generator=gen)
        rows_m = cols_m = None
        if masked:
            rows_m = torch.rand(p, n, generator=gen) > 0.35
            cols_m = torch.rand(p, m, generator=gen) > 0.35
            rows_m[:, 0] = cols_m[:, 0] = True
        kw = dict(eps=EPS, mass=mass, max_iter=args.iters or 100, tol=0.0, row_mask=rows_m, col_mask=cols_m)
        ref64 = reference.sinkhorn_unbalanced(cost.double(), **kw)
        keep = ref64 > 1e-30
        auto = cpp.kernel_storage(1.0, EPS, mass, n, m, torch.float32)
        for kd in ("float32", "bfloat16", "float16"):
            got = cpp.sinkhorn_unbalanced(cost, kernel_dtype=kd, **kw).double()
            ent = float(((got - ref64).abs()[keep] / ref64[keep]).max())
            rel = float((got - ref64).abs().max() / ref64.abs().max())
            bound = cpp.kernel16_plan_error_bound(mass, kd)
            rows.append((p, n, m, mass, masked, kd, ent, rel, bound, auto))
            print(f"| {p} x {n} x {m} | {mass} | {'yes' if masked else 'no'} | {kd} | {ent:.1e} | {rel:.1e} | "
                  f"{'—' if kd == 'float32' else f'{bound:.1e}'} | {auto} |", flush=True)
    return rows


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    if args.quick:
        headline = (8, 513)
        m_sweep = [129, 513]
        p_sweep = [2, 8]
        iters = args.iters or 20
    else:
        headline = (640, 2049) if gpu else (32, 2049)
        m_sweep = [257, 1025, 2049, 4097]
        p_sweep = [64, 640, 2560] if gpu else [8, 32, 128]
        iters = args.iters or 100
    with_compile = not args.no_compile and (args.compile or not args.quick)
    impls = implementations(device, iters, with_compile, not args.no_pot)
    print(f"device: {device_name(device)}; dtype {args.dtype}; eps={EPS}, m={MASS}, {iters} iterations, tol=0; "
          f"load average {load_average()}")
    print(f"implementations: {', '.join(impls)}")

    shapes = [headline] + [(headline[0], m) for m in m_sweep] + [(p, headline[1]) for p in p_sweep]
    shapes = [headline] if args.no_sweep else list(dict.fromkeys(shapes))  # unique, in order
    rows = []
    gen = torch.Generator().manual_seed(0)
    for p, m in shapes:
        cost = torch.rand(p, N_TEXT, m, generator=gen, dtype=dtype).to(device)
        expected = None
        for name, fn in impls.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" overwrites c
                out = fn(cost)
                heavy = name.startswith(("reference", "pot"))
                times = time_fn(lambda: fn(cost), device, warmup=0 if heavy else 1,
                                repeats=args.repeats if heavy or args.quick else 4 * args.repeats)
            if name == "reference-eager":
                expected = out
            diff = "" if expected is None else (
                f"max|diff| {float((out.to(expected.dtype) - expected).abs().max() / expected.abs().max()):.1e}")
            rows.append(Row("sinkhorn", name, "fwd", {"P": p, "N": N_TEXT, "M": m, "iters": iters}, times, note=diff))
            print(f"  P={p:5d} M={m:5d} {name:20s} median {rows[-1].median:9.2f} ms  {diff}", flush=True)
    fill_ratios(rows)
    head = [r for r in rows if (r.shape["P"], r.shape["M"]) == headline]
    print_table(head, f"Sinkhorn, headline shape: {headline[0]} problems of {N_TEXT} x {headline[1]}, {iters} iterations")
    print_table(rows, "All shapes")
    print(f"load average at the end: {load_average()}")
    csv_path = append_csv(rows, "sinkhorn.csv", device, {"dtype": args.dtype, "eps": EPS, "mass": MASS,
                                                          "threads": torch.get_num_threads(),
                                                          "load_avg": load_average()})
    sweeps = {
        f"P = {headline[0]} problems, sweep over M": ("M", [r for r in rows if r.shape["P"] == headline[0]]),
        f"M = {headline[1]}, sweep over problem count": ("P", [r for r in rows if r.shape["M"] == headline[1]]),
    }
    tag = ("_quick" if args.quick else "") + ("_headline" if args.no_sweep else "")
    png = plot_sweeps(rows, sweeps, f"sinkhorn_{device.type}{tag}_{torch.get_num_threads()}t.png",
                      f"Sinkhorn ({N_TEXT} x M, {iters} it., {args.dtype}) on {device_name(device)}")
    print(f"\nrows appended to {csv_path}; plot {png}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=None, help="Sinkhorn iterations (default 100, 20 with --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation and shape")
    parser.add_argument("--no-sweep", action="store_true", help="only the headline shape")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small sweep, under a minute on a 2-core CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--compile", action="store_true",
                        help="with --quick: include the compiled reference (its compilation alone takes ~20-60 s)")
    parser.add_argument("--no-pot", action="store_true", help="skip POT")
    parser.add_argument("--kernel-dtype-errors", action="store_true",
                        help="only print the plan-error table of the cpp kernel storages (docs/numerics.md)")
    args = parser.parse_args(argv)
    return kernel_dtype_errors(args) if args.kernel_dtype_errors else run(args)


if __name__ == "__main__":
    main()
