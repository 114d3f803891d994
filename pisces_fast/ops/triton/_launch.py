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


# Fraction of the L2 cache the persistent solvers' live operands may fill. The whole of it: at the
# paper's shape one operand per SM (132 x 40 x 2176 x 4 B = 46 MB on an H100) fits its 50 MB L2, and
# capping lower (0.8 gave 120 programs) left 12 SMs idle and cost a sixth round of problems.
L2_BUDGET = 1.0


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 * 2**20))


def solve_programs(problems: int, device: torch.device, footprint_bytes: int) -> int:
    """Programs of the persistent Sinkhorn solvers.

    Each resident program keeps one problem's operand (``footprint_bytes``: N x M plus the log v
    buffer) hot while it iterates. On GPU: one program per SM, but no more than fit in L2 together,
    so that every iteration after the first reads L2 rather than HBM (40 x 2049 fp32 at the padded
    stride 2176: ~365 KB each, all 132 SMs of an H100/H200 with its 50 MB L2). ``PISCES_FAST_TRITON_SOLVE_PROGRAMS``
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


def persistent_launch_options(device: torch.device, num_warps: int = 8) -> dict:
    """Extra launch options of the persistent solvers: they run one program per SM, so the register
    file (64K 32-bit registers) is theirs: 255 per thread at 8 warps, 128 at 16. Left alone, ptxas
    aims at two programs per SM and caps them lower, which spills (``python -m
    pisces_fast.ops.triton.compile_report`` shows registers and spills per kernel)."""
    if device.type != "cuda":
        return {}
    return {"maxnreg": min(255, 65536 // (32 * num_warps) // 8 * 8)}
