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
("cpp-op-only": the C++ op called without the API's input validation). Each row also
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
from _harness import Row, append_csv, device_name, fill_ratios, plot_sweeps, print_table, time_fn  # noqa: E402

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
    print(f"device: {device_name(device)}; dtype {args.dtype}; eps={EPS}, m={MASS}, {iters} iterations, tol=0")
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
    csv_path = append_csv(rows, "sinkhorn.csv", device, {"dtype": args.dtype, "eps": EPS, "mass": MASS,
                                                          "threads": torch.get_num_threads()})
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
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
