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


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def padded_stride(m: int) -> int:
    """Row stride of the on-device scratch copies: a multiple of 16 elements, so that every row
    starts 16-byte aligned and Triton can vectorize the tile loads (M = 2049 otherwise forbids it)."""
    return (m + 15) // 16 * 16


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


# Fraction of the L2 cache the persistent solvers' live operands may fill.
L2_BUDGET = 0.8


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 * 2**20))


def solve_programs(problems: int, device: torch.device, footprint_bytes: int) -> int:
    """Programs of the persistent Sinkhorn solvers.

    Each resident program keeps one problem's operand (``footprint_bytes``: N x M plus the log v
    buffer) hot while it iterates. On GPU: one program per SM, but no more than fit in 80% of L2
    together, so that every iteration after the first reads L2 rather than HBM (40 x 2049 fp32:
    ~347 KB each, 120 programs on an H100/H200's 50 MB L2; 132 SMs). ``PISCES_FAST_TRITON_SOLVE_PROGRAMS``
    overrides the count (benchmarks / tuning). The interpreter runs programs one after the other,
    so one program does.
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
        sms, l2 = _device_limits(device.index if device.index is not None else torch.cuda.current_device())
        count = min(sms, max(1, int(L2_BUDGET * l2) // max(1, footprint_bytes)))
    else:
        count = 1
    return max(1, min(problems, count))


def persistent_launch_options(device: torch.device) -> dict:
    """Extra launch options of the persistent solvers: they run one program per SM, so the register
    file is theirs; left alone, ptxas caps them at 128 registers (aiming at two programs per SM)
    and spills; with the whole register file (255 per thread at 8 warps) the fp32 solver at N = 40
    keeps its ~160 live values in registers (ptxas report for sm_90a)."""
    return {"maxnreg": 255} if device.type == "cuda" else {}
