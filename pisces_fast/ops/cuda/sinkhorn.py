"""The on-chip Sinkhorn solve (``sinkhorn_onchip.cu``): the 16-bit scaling-domain kernel matrix held in shared
memory for the whole solve, one CTA per problem.

Used by the Triton backend's standalone solver (``pisces_fast.ops.triton.sinkhorn.sinkhorn_forward``) as its
first pass where ``sinkhorn_path`` picks it: a CUDA device, float32 costs with 16-bit kernel storage, at most
``MAX_ROWS`` rows, and a problem whose kernel fits the device's shared memory (``shared_bytes``). Problems it
cannot solve in 16 bits (the log domain, a float16 range exceeded) are deferred, exactly as the Triton first
pass defers them, to the Triton log-domain pass.

Floor (paper shape 40 x 2049, 640 problems, 100 iterations, H100/H200 132 SMs): per problem-iteration one read
of the 16-bit kernel from shared memory (160 KB) and 3 float32 operations per entry (widen, column FMA, row
FMA); 40 x 2049 x 3 / 128 lanes = 1.9 K cycles, ~1 us at 1.98 GHz, 5 rounds of 132 CTAs: ~5 us per iteration,
~0.5 ms per 100 iterations (issue 13's floor, 2 FMA per entry: 0.45 ms). As compiled: 162 SASS instructions per
column (4.05 per entry) plus ~390 per thread per iteration: 0.91 ms modelled; measured on an H200 1.43 ms per 100
iterations plus 0.49 ms for the range pass, the build and the plan (benchmarks/RESULTS.md, third GPU session).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

from . import nvrtc

SOURCE = "sinkhorn_onchip.cu"
THREADS = 256
MAX_ROWS = 64
ENV = "PISCES_FAST_CUDA_ONCHIP"  # "auto" (default), "0": never, "1": required where a problem fits


def rows_per_column(n: int) -> int:
    """R: the kernel's rows per column (N rounded up to 8: one 16-byte chunk holds 8 rows)."""
    return (n + 7) // 8 * 8


def shared_bytes(n: int, m: int, threads: int = THREADS) -> int:
    """Dynamic shared memory of one CTA: the 16-bit kernel (M x R), the per-warp row partials (warps x R float32),
    two per-row vectors (accepted log u, row weights), per-warp scratch (warps rounded up to 4), two 4-float slots
    (row-warp maxima), the log v ping-pong (2 x M)."""
    r, warps = rows_per_column(n), threads // 32
    return m * r * 2 + (warps * r + 2 * r + (warps + 3) // 4 * 4 + 8) * 4 + 2 * m * 4


def kernel_name(n: int, bf16: bool, threads: int = THREADS) -> str:
    return f"pisces::sinkhorn_onchip<{rows_per_column(n)}, {threads}, {'true' if bf16 else 'false'}>"


@functools.lru_cache(maxsize=None)
def _shared_limit(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


@functools.lru_cache(maxsize=None)
def _build_problem(n: int, index: int) -> Optional[str]:
    """Why the kernel for N rows cannot be built for device ``index`` (None: it can). Compiling is the only
    sure test (an NVRTC older than the GPU's architecture, say); the cubin is cached, so the launch reuses it."""
    try:
        for bf16 in (False, True):
            nvrtc.compile_cubin(SOURCE, kernel_name(n, bf16), nvrtc.device_arch(torch.device("cuda", index)))
    except nvrtc.NvrtcUnavailable as exc:
        return str(exc)
    except (RuntimeError, OSError) as exc:
        return f"NVRTC could not build it: {str(exc).splitlines()[0]}"
    return None


def mode() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV} must be 'auto', '0' or '1', got {value!r}")
    return value


def availability(n: int, m: int, device: torch.device) -> tuple:
    """(usable, reason): whether the shared-memory kernel can run an N x M float32 problem on ``device``, and
    if not, why (``sinkhorn_path`` reports it; ``PISCES_FAST_CUDA_ONCHIP=1`` turns a kernel that cannot be built
    into an error). The first call per row count compiles the kernel (cached in memory and on disk)."""
    if device.type != "cuda":
        return False, "not a CUDA device"
    if torch.version.hip:
        return False, "ROCm: the on-chip kernel is CUDA C++"
    if mode() == "0":
        return False, f"{ENV}=0"
    if n < 1 or m < 1:
        return False, "empty problem"
    if n > MAX_ROWS:
        return False, f"N = {n} > {MAX_ROWS} rows"
    index = device.index if device.index is not None else torch.cuda.current_device()
    need, limit = shared_bytes(n, m), _shared_limit(index)
    if need > limit:
        return False, f"needs {need} B of shared memory per CTA, the device allows {limit}"
    problem = _build_problem(rows_per_column(n), index)
    if problem is not None:
        if mode() == "1":
            raise RuntimeError(f"{ENV}=1 but the on-chip kernel cannot be built: {problem}")
        return False, problem
    return True, "shared memory"


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def sinkhorn_onchip(cost: torch.Tensor, plan: torch.Tensor, row_mask: Optional[torch.Tensor],
                    col_mask: Optional[torch.Tensor], params: torch.Tensor, n_iter: torch.Tensor, storage: torch.Tensor,
                    max_iter: int, bf16: bool, threads: int = THREADS) -> None:
    """Launch the solve over every problem of ``cost`` (P, N, M), float32, contiguous. Writes ``plan``, and per
    problem ``n_iter`` / ``storage`` (int32): the 16-bit code, or -1 where the problem is deferred (its plan is
    then left for the log-domain pass). ``row_mask`` / ``col_mask``: uint8 (P, N) / (P, M) or None; ``params``:
    ``sinkhorn.solver_params`` (float32). ``threads``: per CTA (benchmarks; registers cap it, see the tests)."""
    p, n, m = cost.shape
    if p == 0:
        return
    if threads % 32 or threads > 1024 or threads < (rows_per_column(n) + 31) // 32 * 32:
        raise ValueError(f"threads must be whole warps, at least one per row (N = {n}) and at most 1024, got {threads}")
    if not 0 <= max_iter < 2 ** 31:
        raise ValueError(f"max_iter must be in [0, 2**31), got {max_iter}")
    kernel = nvrtc.load_kernel(SOURCE, kernel_name(n, bf16, threads), cost.device)
    args = [_ptr(cost), _ptr(plan), _ptr(row_mask), _ptr(col_mask), _ptr(params), _ptr(n_iter), _ptr(storage),
            ctypes.c_int(n), ctypes.c_int(m), ctypes.c_int(max_iter)]
    kernel.launch(p, threads, shared_bytes(n, m, threads), args)
