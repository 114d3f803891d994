"""Launch helpers shared by the Triton kernels: block sizes, size limits, device context."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# One program holds all N rows of a column block (that is what makes the column log-sum-exp exact
# inside a tile and an iteration a single sweep). Past this many rows the tile no longer fits a
# program's registers; such problems must use backend="cpp" or "reference".
MAX_ROWS = 1024


# Device copies of the kernels' scalar parameters, keyed by (values, dtype, device). Uploading a Python
# list with torch.tensor(..., device="cuda") per call is a blocking host-to-device copy on the hot path
# (and a break for CUDA graphs); a training run uses a handful of distinct parameter sets, so each is
# uploaded once and reused. Read-only for the kernels.
_DEVICE_CONSTANTS: dict = {}
_DEVICE_CONSTANTS_MAX = 256


def device_constants(values, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, uploaded once per distinct set and cached."""
    key = (tuple(float(v) for v in values), dtype, torch.device(device))
    cached = _DEVICE_CONSTANTS.get(key)
    if cached is None:
        if len(_DEVICE_CONSTANTS) >= _DEVICE_CONSTANTS_MAX:
            _DEVICE_CONSTANTS.clear()
        host = torch.tensor(key[0], dtype=dtype)
        if key[2].type == "cuda":
            host = host.pin_memory()  # pinned + non_blocking: an asynchronous copy on the stream
        cached = _DEVICE_CONSTANTS[key] = host.to(key[2], non_blocking=True)
    return cached


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def padded_stride(m: int, multiple: int = 16) -> int:
    """Row stride of the on-device scratch copies: a multiple of ``multiple`` (a multiple of 16)
    elements, so that every row starts 16-byte aligned and Triton can vectorize the tile loads
    (M = 2049 otherwise forbids it); the Sinkhorn sweeps pass two tile widths, so that they need no
    column masks at all."""
    return (m + multiple - 1) // multiple * multiple


def check_problem_size(op: str, n: int, limit: int = MAX_ROWS) -> None:
    if n > limit:
        raise ValueError(
            f"backend='triton' {op} supports at most {limit} rows (N, text tokens) per problem, got N={n}; "
            "use backend='cpp' or backend='reference' for larger N"
        )


def launch_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device); a no-op for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_per_sm(num_warps: int) -> int:
    """Persistent programs that fit one SM together: the register file (64K 32-bit registers) holds
    ``65536 / (32 num_warps maxnreg)`` of them at the cap ``persistent_launch_options`` sets (255,
    allocated as 256): two 4-warp programs, one 8-warp program."""
    return max(1, 65536 // (32 * num_warps * 256))


def solve_programs(problems: int, device: torch.device, num_warps: int) -> int:
    """Programs of the persistent Sinkhorn solvers: as many as fit on the GPU at once
    (``programs_per_sm`` per SM), each taking problems from an atomic counter.

    Measured on an H200 at the paper's shape (benchmarks/RESULTS.md, ``benchmarks/triton_tuning.py``):
    the sweep is bound by its per-tile reductions and issue rate, not by memory: two 4-warp programs
    per SM with 32 elements per thread ran 1.8x faster than one 8-warp program with 16, and the float32
    operands of 264 programs (96 MB, beyond the 60 MB L2) ran as fast as the float16 ones (48 MB, in
    L2), so the count is no longer capped to what fits in L2 (which left large-N problems a handful of
    programs: 6 at N = 1024). The per-program scratch (programs x N x padded M) is never more than the
    padded cost itself, since programs <= problems. ``PISCES_FAST_TRITON_SOLVE_PROGRAMS``
    overrides the count (benchmarks / tuning). The interpreter runs programs one after the other, so
    one program does.
    """
    override = os.environ.get("PISCES_FAST_TRITON_SOLVE_PROGRAMS")
    if override:
        try:
            count = int(override)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"PISCES_FAST_TRITON_SOLVE_PROGRAMS must be a positive int, got {override!r}")
    elif device.type == "cuda":
        sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
        count = sms * programs_per_sm(num_warps)
    else:
        count = 1
    return max(1, min(problems, count))


def persistent_launch_options(device: torch.device, num_warps: int = 8) -> dict:
    """Extra launch options of the persistent solvers: the register file (64K 32-bit registers) is
    theirs (``programs_per_sm``): 255 per thread at 4 and 8 warps, 128 at 16. Left alone, ptxas aims at
    more programs per SM and caps them lower, which spills (``python -m
    pisces_fast.ops.triton.compile_report`` shows registers and spills per kernel)."""
    if device.type != "cuda":
        return {}
    return {"maxnreg": min(255, 65536 // (32 * num_warps) // 8 * 8)}
