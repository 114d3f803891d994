"""Compile the Triton kernels for a GPU target without a GPU and read ptxas' and the SASS's verdict.

``python -m pisces_fast.ops.triton.compile_report [--arch 80 90] [--shape paper|max]`` prints, per kernel:
registers per thread, spill stores/loads (bytes), shared memory, and the SASS instruction count of
the kernel's innermost hot loop (the Sinkhorn sweep's per-tile body for the solvers) and, for the
on-chip 16-bit Sinkhorn, of the sweep whose loads keep the operand in L1 (``LDG.E.EL``). It is what
tests/test_triton_compile.py asserts on (no spills) and what benchmarks/RESULTS.md quotes. Where NVRTC is
found, the on-chip CUDA Sinkhorn (``sinkhorn_*_onchip_cuda``; pisces_fast/ops/cuda) is reported too, its
shared memory being the dynamic bytes a launch at the shape gives (tests/test_cuda_onchip.py checks it).

Must run **without** ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` does not build
kernels); the test runs it in a subprocess. Needs Triton's NVIDIA backend (its bundled ptxas and
cuobjdump); no GPU and no CUDA torch.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import torch

# Shapes the report covers. "paper": 640 problems of 40 x 2049 with D = 64 (PISCES' setting);
# "max": the largest problem the backend accepts (MAX_ROWS / MAX_QUERIES rows, MAX_HEAD_DIM-wide heads;
# the kernels' code does not depend on M beyond the tile width, which is capped well below 2049).
SHAPES = {
    "paper": dict(n=40, m=2049, d=64),
    "max": dict(n=1024, m=2049, d=128),
}


@dataclass
class KernelReport:
    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    loop_instructions: Optional[int]  # SASS instructions of the innermost hot loop body (one trip)
    # The on-chip Sinkhorn kernels: SASS instructions of one trip of the sweep whose tile loads carry the
    # L1 evict-last policy (``LDG.E.EL``): None where no loop has such loads.
    onchip_loop_instructions: Optional[int] = None
    # Local-memory instructions (LDL / STL: spill traffic) inside the hot loop or the on-chip sweep: what a
    # spill costs per iteration. Spills elsewhere (loop-invariant values reloaded once per sweep or per
    # problem) cost next to nothing.
    sweep_local_memory: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler

    return os.path.join(os.path.dirname(compiler.__file__), "bin", name)


def ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch) if "arch" in get_ptxas.__code__.co_varnames else get_ptxas()
    return getattr(tool, "path", tool)


def _ptxas_verbose(ptx: str, arch: int) -> dict:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    text = proc.stderr + proc.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=regs, spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")


def innermost_loop_instructions(cubin: bytes) -> Optional[int]:
    """Instructions in one trip of the SASS's hot loop: of the innermost loops (a body with no other
    backward branch, at least 32 instructions), the one with the most floating-point instructions.
    For the solvers this is the sweep (a trip covers two tiles), for the dot-product kernels their
    key / query loop."""
    return _loop_counts(cubin)[0]


_LOCAL_MEMORY = re.compile(r"^(LDL|STL)")


def _loop_counts(cubin: bytes):
    """(hot loop, on-chip sweep) instruction counts: the first as ``innermost_loop_instructions``; the
    second of the innermost loop whose global loads carry the L1 evict-last policy (``LDG.E.EL``), the
    on-chip Sinkhorn sweep (sinkhorn._load_tile with RESIDENT), None where there is none."""
    cuobjdump = _tool("cuobjdump")
    if not os.path.exists(cuobjdump):
        return None, None, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    code, loops = [], []
    for match in _SASS_LINE.finditer(text):
        addr, ins = int(match.group(1), 16), match.group(2).strip()
        code.append((addr, re.sub(r"^@!?U?P\w+\s+", "", ins).split(" ")[0]))
        br = _BRANCH.search(ins)
        if br and int(br.group(1), 16) <= addr:
            loops.append((int(br.group(1), 16), addr))

    def body(lp):
        return [op for x, op in code if lp[0] <= x <= lp[1]]

    loops = [lp for lp in loops if len(body(lp)) >= 32]
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        return None, None, 0
    hot = max(innermost, key=lambda lp: sum(op.startswith(("F", "MUFU", "HMMA", "DMMA", "DFMA", "DADD", "DMUL"))
                                            for op in body(lp)))
    resident = [lp for lp in innermost if any(op.startswith("LDG") and ".EL" in op for op in body(lp))]
    local = sum(bool(_LOCAL_MEMORY.match(op)) for lp in {hot, *resident[:1]} for op in body(lp))
    return len(body(hot)), (len(body(resident[0])) if resident else None), local


def _build(fn, args: dict, consts: dict, arch: int, num_warps: int, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(args)
    sig.update({c: "constexpr" for c in consts})
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if sig[a].startswith("*") or a == "MS"}
    options.update(num_warps=num_warps)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def kernel_specs(shape: str, dtype: torch.dtype = torch.float32) -> list:
    """(name, fn, signature, constexprs, num_warps, options) of every kernel at ``shape``, with the
    block sizes and launch options the host code picks for a CUDA device."""
    from . import attention as at
    from . import sinkhorn as sk
    from ._launch import next_pow2, persistent_launch_options

    dev = torch.device("cuda")
    n, m, d = (SHAPES[shape][k] for k in ("n", "m", "d"))
    dts = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    f = lambda *names: {x: "*" + dts for x in names}  # noqa: E731
    i32 = lambda *names: {x: "i32" for x in names}  # noqa: E731
    masks = {"KPM": "*u8", "QPM": "*u8"}
    common = dict(HAS_KPM=True, HAS_QPM=True)
    specs = []
    sbn, sbm, sw = sk.sinkhorn_blocks(n, m, dtype, dev)
    sk_sig = lambda scratch16: {**f("COST", "PLAN", "SCRATCH"), "SCRATCH16": scratch16, **f("GBUF"),  # noqa: E731
                                "RM": "*u8", "CM": "*u8", **f("PARAMS"), "N_ITER": "*i32", "STORAGE": "*i32",
                                "COUNTER": "*i32", **i32("P", "N", "M", "MS", "max_iter")}
    sk_consts = dict(HAS_RM=True, HAS_CM=True, DOMAIN=0, BN=sbn, BM=sbm, FAST_LOG=sk.fast_log(dtype, dev),
                     PASS=sk.PASS_ALL.value)
    specs.append(("sinkhorn", sk._sinkhorn_kernel, sk_sig("*" + dts), dict(sk_consts, K16=0, RESIDENT=False), sw,
                  persistent_launch_options(dev, sw)))
    # The 16-bit kernel storage (kernel_dtype="auto" picks float16 at the paper's m = 0.9), on chip
    # (L1-resident loads) as sinkhorn_path picks it for the paper shape on sm_90, and bfloat16.
    if dtype == torch.float32:
        for name, code, ty in (("sinkhorn_fp16_onchip", sk.KERNEL_FP16.value, "*fp16"),
                               ("sinkhorn_bf16_onchip", sk.KERNEL_BF16.value, "*bf16")):
            specs.append((name, sk._sinkhorn_kernel, sk_sig(ty), dict(sk_consts, K16=code, RESIDENT=True), sw,
                          persistent_launch_options(dev, sw)))
    # The two-pass launch of the standalone solver (sinkhorn_forward, where the scaling sweep has blocks of
    # its own): the scaling pass (float32 and float16 kernels) and the deferred log-domain pass.
    for code, ty in ((0, "*" + dts), (sk.KERNEL_FP16.value, "*fp16")):
        launches = sk.sinkhorn_launches(n, m, dtype, dev, k16=code)
        if len(launches) == 1 or (code and dtype != torch.float32):
            continue
        scaling, log = launches
        specs.append((f"sinkhorn{'_fp16_onchip' if code else ''}_scaling_pass", sk._sinkhorn_kernel, sk_sig(ty),
                      dict(sk_consts, RESIDENT=bool(code), **{k: v for k, v in scaling.items() if k != "num_warps"}),
                      scaling["num_warps"], persistent_launch_options(dev, scaling["num_warps"])))
        if not code:  # the log pass is the same kernel whatever the first pass stored
            specs.append(("sinkhorn_log_pass", sk._sinkhorn_kernel, sk_sig("*" + dts),
                          dict(sk_consts, RESIDENT=False, **{k: v for k, v in log.items() if k != "num_warps"}),
                          log["num_warps"], persistent_launch_options(dev, log["num_warps"])))
    cfg = at._blocks(n, m, d, d, dtype, dev)
    bn, stats_bn, bd = cfg["bn"], cfg["stats_bn"], cfg["bd"]
    n_blocks = -(-n // stats_bn)
    brb = next_pow2(n_blocks)  # as ot_attention_forward launches it
    dot = dict(DOT_PRECISION=at._dot_precision(dtype, dev))
    specs.append(("attn_stats", at._attn_stats_kernel,
                  {**f("Q", "K", "T", "S"), **masks, **f("ROWST", "PART", "PARAMS"), **i32("H", "N", "M", "D", "n_blocks")},
                  dict(common, BN=stats_bn, BM=cfg["stats"][0], BD=bd, **dot), cfg["stats"][1], {}))
    specs.append(("attn_cost", at._attn_cost_kernel,
                  {**f("Q", "K", "T", "S"), **masks, **f("ROWST", "PART", "SCRATCH", "PARAMS"),
                   **i32("H", "N", "M", "MS", "D", "n_blocks")},
                  dict(common, BN=stats_bn, BM=cfg["cost"][0], BD=bd, BRB=brb, **dot), cfg["cost"][1], {}))
    for scaling in (True, False):
        abn, abm, aw, _ = at.solve_layout(n, m, dtype, dev, scaling)  # as ot_attention_forward
        specs.append((f"attn_solve_{'scaling' if scaling else 'log'}", at._attn_solve_kernel,
                      {**f("SCRATCH", "GBUF", "ROWST", "PART", "RANGES", "LOGV"), **masks, **f("PARAMS"),
                       "COUNTER": "*i32", **i32("P", "H", "N", "M", "MS", "n_blocks", "max_iter")},
                      dict(common, SCALING=scaling, BN=abn, BM=abm, BRB=brb, FAST_LOG=sk.fast_log(dtype, dev)), aw,
                      persistent_launch_options(dev, aw)))
    specs.append(("attn_fuse", at._attn_fuse_kernel,
                  {**f("Q", "K", "V", "T", "S"), **masks, **f("OUT", "PLAN", "ROWST", "LOGV", "RANGES", "YBUF", "PARAMS"),
                   **i32("H", "N", "M", "D", "DV")},
                  dict(common, WRITE_PLAN=True, BN=bn, BM=cfg["fuse"][0], BD=bd, BDV=bd, **dot), cfg["fuse"][1],
                  dict(cfg.get("fuse_options", {}))))
    specs.append(("attn_bwd_dq", at._attn_bwd_dq_kernel,
                  {**f("Q", "K", "V", "T", "S"), **masks,
                   **f("DOUT", "OUT", "ROWST", "LOGV", "RANGES", "YBUF", "DE", "PARAMS", "DQ"), **i32("H", "N", "M", "D", "DV")},
                  dict(common, BN=bn, BM=cfg["dq"][0], BD=bd, BDV=bd, **dot), cfg["dq"][1], {}))
    specs.append(("attn_bwd_dkdv", at._attn_bwd_dkdv_kernel,
                  {**f("Q", "K", "V", "T", "S"), **masks,
                   **f("DOUT", "ROWST", "LOGV", "RANGES", "DE", "PARAMS", "DK", "DVAL"), **i32("H", "N", "M", "D", "DV")},
                  dict(common, BN=bn, BM=cfg["dkdv"][0], BD=bd, BDV=bd, **dot), cfg["dkdv"][1],
                  dict(cfg.get("dkdv_options", {}))))
    return specs


def report(arch: int, shape: str, only: Optional[List[str]] = None, sass: bool = True,
           dtype: torch.dtype = torch.float32) -> List[KernelReport]:
    rows = []
    for name, fn, sig, consts, warps, options in kernel_specs(shape, dtype):
        if only and name not in only:
            continue
        kernel = _build(fn, sig, consts, arch, warps, **options)
        stats = _ptxas_verbose(kernel.asm["ptx"], arch)
        loop, onchip, local = _loop_counts(kernel.asm["cubin"]) if sass else (None, None, 0)
        rows.append(KernelReport(name, f"sm_{arch}{'a' if arch >= 90 else ''}", shared=int(kernel.metadata.shared),
                                 loop_instructions=loop, onchip_loop_instructions=onchip,
                                 sweep_local_memory=local, **stats))
    return rows


def format_table(rows: List[KernelReport]) -> str:
    lines = ["| kernel | arch | registers | spill stores / loads (B) | shared memory (B) | hot-loop SASS instructions "
             "| on-chip sweep SASS instructions | spill instructions in the sweep |",
             "|---|---|---|---|---|---|---|---|"]
    dash = lambda x: "-" if x is None else x  # noqa: E731
    for r in rows:
        lines.append(f"| {r.name} | {r.arch} | {r.registers} | {r.spill_stores} / {r.spill_loads} | {r.shared} | "
                     f"{dash(r.loop_instructions)} | {dash(r.onchip_loop_instructions)} | {r.sweep_local_memory} |")
    return "\n".join(lines)


def cuda_report(arch: int, shape: str, sass: bool = True) -> List[KernelReport]:
    """The on-chip CUDA Sinkhorn (pisces_fast/ops/cuda, compiled with NVRTC) at ``shape``, float16 and bfloat16
    storage: ptxas' registers and spills, the dynamic shared memory the launch gives, and the SASS of its column
    loop (the on-chip sweep). Empty where the shape has more rows than the kernel serves or NVRTC is missing."""
    from ..cuda import nvrtc
    from ..cuda import sinkhorn as cuda_sinkhorn

    n, m = SHAPES[shape]["n"], SHAPES[shape]["m"]
    if n > cuda_sinkhorn.MAX_ROWS:
        return []
    try:
        nvrtc.nvrtc_library()
    except nvrtc.NvrtcUnavailable:
        return []
    target = f"sm_{arch}{'a' if arch >= 90 else ''}"
    rows = []
    for storage, bf16 in (("fp16", False), ("bf16", True)):
        cubin, _, log = nvrtc.compile_cubin(cuda_sinkhorn.SOURCE, cuda_sinkhorn.kernel_name(n, bf16), target)
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        loop, _, local = _loop_counts(cubin) if sass else (None, None, 0)
        rows.append(KernelReport(f"sinkhorn_{storage}_onchip_cuda", target, regs, int(spill.group(1)),
                                 int(spill.group(2)), cuda_sinkhorn.shared_bytes(n, m), loop, loop, local))
    return rows


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("compile_report: unset TRITON_INTERPRET (the interpreter builds no kernels)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    parser.add_argument("--shape", nargs="+", default=["paper", "max"], choices=sorted(SHAPES))
    parser.add_argument("--kernels", nargs="*", help="only these kernels (names as printed)")
    parser.add_argument("--no-sass", action="store_true", help="skip the SASS loop count (faster)")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shape:
        for arch in args.arch:
            got = report(arch, shape, args.kernels, sass=not args.no_sass)
            if not args.kernels or any("cuda" in k for k in args.kernels):
                got += cuda_report(arch, shape, sass=not args.no_sass)
            for r in got:
                r.name = f"{r.name} ({shape})"
                print(f"{r.name:32s} {r.arch:6s} regs={r.registers:3d} spill={r.spill_stores}/{r.spill_loads} "
                      f"smem={r.shared} loop={r.loop_instructions} onchip_loop={r.onchip_loop_instructions} "
                      f"sweep_local_memory={r.sweep_local_memory}",
                      flush=True)
            rows += got
    print(format_table(rows))
    return 1 if any(r.spills for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
