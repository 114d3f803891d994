"""OT-attention (scores -> cost -> Sinkhorn -> fusion -> A~V), forward and forward+backward.

    python benchmarks/ot_attention_bench.py            # headline shape + sweeps over M and batch
    python benchmarks/ot_attention_bench.py --quick    # small sweep, < 1 minute on a 2-core CPU

Headline shape (InternVideo2 stage-2 cross-attention, see the kernels issue): N = 40 text tokens,
M = 8*16*16 + 1 = 2049 video tokens (a [CLS] prefix token), head dim 64, 16 heads; batch 2 on CPU
(32 problems), batch 40 on GPU (640 problems = 5 layers x 16 heads x batch 8). eps = 0.05, m = 0.9,
`--iters` Sinkhorn iterations with tol = 0.

Implementations, all in one run: the reference eager and under torch.compile (its pieces and
iteration body compiled, see _compiled_reference.py; not in --quick unless --compile), and every backend in
`pisces_fast.ops.available_backends(device)`, through the public `ot_attention` ("cpp-op-only": the
C++ op called without the API's input validation). "fwd" runs under
no_grad; "fwd+bwd" backpropagates a fixed random gradient of the output into q, k, v.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _compiled_reference  # noqa: E402
from _harness import (Row, append_csv, device_name, fill_ratios, load_average, plot_sweeps, print_table,  # noqa: E402
                      time_fn)

from pisces_fast import ot_attention, video_token_positions  # noqa: E402
from pisces_fast.ops import available_backends  # noqa: E402
from pisces_fast.ops.backends import triton_interpreter_enabled  # noqa: E402

EPS, MASS, N_TEXT, HEADS, HEAD_DIM, GRID = 0.05, 0.9, 40, 16, 64, 16


def implementations(device: torch.device, iters: int, with_compile: bool):
    impls = {}
    ref = functools.partial(ot_attention, eps=EPS, mass=MASS, max_iter=iters, tol=0.0, backend="reference")
    impls["reference-eager"] = ref
    if with_compile:
        impls["reference-compiled"] = functools.partial(_compiled_reference.ot_attention, eps=EPS, mass=MASS,
                                                        max_iter=iters)
    for backend in available_backends(device):
        if backend == "reference":
            continue
        if backend == "triton" and device.type == "cpu" and triton_interpreter_enabled():
            continue  # the Triton interpreter is a correctness tool, not something to time
        impls[backend] = functools.partial(ot_attention, eps=EPS, mass=MASS, max_iter=iters, tol=0.0, backend=backend)
        if backend == "cpp":
            # "auto" (above) stores the Sinkhorn kernel in float16 here; the full-precision kernel explicitly:
            impls["cpp-float32"] = functools.partial(ot_attention, eps=EPS, mass=MASS, max_iter=iters, tol=0.0,
                                                     backend=backend, kernel_dtype="float32")
            # The same op without the public API's input validation (NaN/Inf scans etc.).
            from pisces_fast.ops import cpp

            def cpp_op(q, k, v, t, s):
                return cpp.ot_attention(q, k, v, t, s, gamma=0.2, eta=0.2, eps=EPS, mass=MASS, max_iter=iters, tol=0.0,
                                        fuse_eps=1e-8, scale=HEAD_DIM ** -0.5)[0]

            impls["cpp-op-only"] = cpp_op
    return impls


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    if args.quick:
        headline = (1, 2)  # (batch, frames): 16 problems of 40 x 513
        frame_sweep = [1, 2]
        batch_sweep = [1]
        iters = args.iters or 20
    else:
        headline = (40, 8) if gpu else (2, 8)
        frame_sweep = [1, 2, 4, 8]
        batch_sweep = [8, 40, 160] if gpu else [1, 2, 8]
        iters = args.iters or 100
    with_compile = not args.no_compile and (args.compile or not args.quick)
    impls = implementations(device, iters, with_compile)
    print(f"device: {device_name(device)}; dtype {args.dtype}; eps={EPS}, m={MASS}, {iters} iterations, tol=0; "
          f"load average {load_average()}")
    print(f"implementations: {', '.join(impls)}")

    shapes = [headline] + [(headline[0], f) for f in frame_sweep] + [(b, headline[1]) for b in batch_sweep]
    shapes = [headline] if args.no_sweep else list(dict.fromkeys(shapes))
    modes = ["fwd", "fwd+bwd"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch, frames in shapes:
        t, s = video_token_positions(frames, GRID, GRID, prefix_tokens=1, dtype=dtype, device=device)
        m = t.shape[0]
        q = torch.randn(batch, HEADS, N_TEXT, HEAD_DIM, generator=gen, dtype=dtype).to(device)
        k = torch.randn(batch, HEADS, m, HEAD_DIM, generator=gen, dtype=dtype).to(device)
        v = torch.randn(batch, HEADS, m, HEAD_DIM, generator=gen, dtype=dtype).to(device)
        grad = torch.randn(batch, HEADS, N_TEXT, HEAD_DIM, generator=gen, dtype=dtype).to(device)
        shape = {"B": batch, "H": HEADS, "P": batch * HEADS, "N": N_TEXT, "M": m, "D": HEAD_DIM, "iters": iters}
        for mode in modes:
            expected = None
            for name, fn in impls.items():
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v, t, s)
                else:
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                    def call(fn=fn, qg=qg, kg=kg, vg=vg):
                        out = fn(qg, kg, vg, t, s)
                        dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), grad)
                        return torch.cat([dq.flatten(), dk.flatten(), dv.flatten()])

                out = call()
                heavy = name.startswith("reference")
                times = time_fn(call, device, warmup=0 if heavy else 1,
                                repeats=args.repeats if heavy or args.quick else 3 * args.repeats)
                if name == "reference-eager":
                    expected = out
                diff = "" if expected is None else (
                    f"max|diff| {float((out - expected).abs().max() / expected.abs().max()):.1e}")
                rows.append(Row("ot_attention", name, mode, dict(shape), times, note=diff))
                print(f"  B={batch:3d} M={m:5d} {mode:8s} {name:20s} median {rows[-1].median:9.2f} ms  {diff}",
                      flush=True)
    fill_ratios(rows)
    head = [r for r in rows if (r.shape["B"], r.shape["M"]) == (headline[0], headline[1] * GRID * GRID + 1)]
    print_table(head, f"OT attention, headline shape: {headline[0] * HEADS} problems of {N_TEXT} x "
                      f"{headline[1] * GRID * GRID + 1}, D={HEAD_DIM}, {iters} iterations")
    print_table(rows, "All shapes")
    print(f"load average at the end: {load_average()}")
    csv_path = append_csv(rows, "ot_attention.csv", device, {"dtype": args.dtype, "eps": EPS, "mass": MASS,
                                                              "threads": torch.get_num_threads(),
                                                              "load_avg": load_average()})
    sweeps = {
        f"batch {headline[0]} x {HEADS} heads, sweep over M": ("M", [r for r in rows if r.shape["B"] == headline[0]]),
        f"M = {headline[1] * GRID * GRID + 1}, sweep over problems": (
            "P", [r for r in rows if r.shape["M"] == headline[1] * GRID * GRID + 1]),
    }
    tag = ("_quick" if args.quick else "") + ("_headline" if args.no_sweep else "")
    png = plot_sweeps(rows, sweeps, f"ot_attention_{device.type}{tag}_{torch.get_num_threads()}t.png",
                      f"OT attention ({N_TEXT} x M, D={HEAD_DIM}, {iters} it., {args.dtype}) on {device_name(device)}")
    print(f"\nrows appended to {csv_path}; plot {png}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=None, help="Sinkhorn iterations (default 100, 20 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation, shape and mode")
    parser.add_argument("--no-sweep", action="store_true", help="only the headline shape")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small sweep, under a minute on a 2-core CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--compile", action="store_true",
                        help="with --quick: include the compiled reference (its compilation alone takes ~20-60 s)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
