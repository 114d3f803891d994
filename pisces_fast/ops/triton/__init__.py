"""Triton backend (``backend="triton"``): fused kernels for the Sinkhorn and for OT attention.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before this package is imported — that is how CI tests it). The entry points take the validated,
contiguous float32/float64 inputs that :mod:`pisces_fast.ops.api` prepares and go through the
``torch.library`` custom ops of :mod:`.ops`, so they work under ``torch.compile``.

Design: see :mod:`.sinkhorn` and :mod:`.attention`. Traffic model at the paper's scale (640 problems
of 40 x 2049, float32; H100: 3.35 TB/s HBM, ~67 TFLOP/s fp32 without tensor cores):

* Floor per Sinkhorn iteration: the N x M operand read once, 52.5 M entries x 4 B = 210 MB
  -> 63 us from HBM; 4 FLOP per entry (two multiply-adds) = 210 MFLOP -> 3 us. The iteration is
  memory-bound by ~20x, so the design goal is one read of the operand per iteration, from L2.
* This backend per iteration: one read of the padded operand (40 x 2176 x 4 B: the stride is a
  multiple of two 64-column tiles) plus the log v ping-pong (read + write) per problem: ~234 MB,
  1.11x the floor's bytes; compute on 64 padded rows (~360 MFLOP). The persistent solver runs one
  program per SM while the live operands fit L2 (132 on an H100's 50 MB), so iterations after the
  first are L2 reads when the cache holds them. The sweep issues ~5.4 K SASS instructions per thread
  per problem-iteration (sm_90a; 10.7 K before the restructuring), ~31 us per iteration for 640
  problems: below the 67 us of HBM traffic, so it is memory-bound (docs/triton.md).
* Once per forward: q/k/v reads, the scratch written and converted, out (and optionally the plan):
  ~2.0 GB (+0.2 GB plan) -> ~0.6 ms; backward ~2.0 GB -> ~0.6 ms; 5 + 7 GEMMs of 40 x 2049 x 64 per
  problem (81 GFLOP in all, x3 on tensor cores for 3xTF32).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops as _ops  # noqa: F401  (registers the custom ops)

_FLOAT_TYPES = (torch.float32, torch.float64)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"backend='triton' computes in float32/float64; {name} has dtype {t.dtype} "
            "(the public API upcasts half precision before dispatching)"
        )


def sinkhorn_unbalanced(
    cost: torch.Tensor,
    *,
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    domain: str = "auto",
    kernel_dtype: str = "auto",
    row_mask: Optional[torch.Tensor] = None,
    col_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Algorithm 3 on ``cost (P, N, M)`` (float32/float64): one fused program per problem.

    ``domain`` / ``kernel_dtype`` as in :class:`~pisces_fast.ops.OTConfig`; one this backend cannot
    honour is a ValueError."""
    _check_dtype("cost", cost)
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape (P, N, M), got {tuple(cost.shape)}")
    _ops.domain_code(domain)
    _ops.check_kernel_dtype(kernel_dtype)
    return torch.ops.pisces_fast.triton_sinkhorn(
        cost, row_mask, col_mask, float(eps), float(mass), int(max_iter), float(tol), domain, kernel_dtype
    )


def ot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    *,
    gamma: float,
    eta: float,
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    fuse_eps: float,
    scale: float,
    domain: str = "auto",
    kernel_dtype: str = "auto",
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    return_plan: bool = True,
):
    """Fused OT attention: returns ``(out, plan)``; ``plan`` is None when ``return_plan=False``
    (the kernel then never writes the N x M plan). Differentiable in q, k, v; the plan is detached."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, t)
    _ops.domain_code(domain)
    _ops.check_attention_kernel_dtype(kernel_dtype)
    out, plan, *_ = torch.ops.pisces_fast.triton_ot_attention(
        q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
        float(gamma), float(eta), float(eps), float(mass), int(max_iter), float(tol), float(fuse_eps), float(scale),
        bool(return_plan), domain, kernel_dtype,
    )
    return out, (plan.detach() if return_plan else None)


__all__ = ["ot_attention", "sinkhorn_unbalanced"]
