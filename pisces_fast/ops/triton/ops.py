"""``torch.library`` custom ops around the Triton kernels, so that models using them compile.

* ``pisces_fast::triton_sinkhorn`` — the fused batched solver (no autograd: the plan is a prior).
* ``pisces_fast::triton_ot_attention`` — the fused forward; besides ``out`` and the (optional) plan
  it returns the per-row statistics the backward recomputes from (lse, τ, π, log u, Z, X), log v,
  the per-problem cost ranges and Y. Only ``out`` is differentiable.
* ``pisces_fast::triton_ot_attention_backward`` — the fused backward (dq, dk, dv).

Each op has a fake (meta) implementation for ``torch.compile`` / FakeTensor tracing.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention import N_RANGES, ROW_STATS, ot_attention_backward, ot_attention_forward
from .sinkhorn import sinkhorn_forward

# OTConfig.domain -> the kernels' code (0 = per-problem choice, 1 = force the log domain). The kernels
# cannot force the scaling domain: "scaling" is refused, never silently replaced.
DOMAIN_CODES = {"auto": 0, "log": 1}
# OTConfig.kernel_dtype values the kernels honour (storage of the scaling-domain operand): the standalone
# solver stores it in 16 bits too (sinkhorn.sinkhorn_path); the fused attention's solve keeps float32
# ("auto" = float32 there).
KERNEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_KERNEL_DTYPES = ("auto", "float32")


def domain_code(domain: str) -> int:
    """The kernel code of ``domain``; ValueError naming what this backend supports."""
    try:
        return DOMAIN_CODES[domain]
    except KeyError:
        raise ValueError(
            f"backend='triton' cannot run domain={domain!r} (supported: {tuple(DOMAIN_CODES)})"
        ) from None


def check_kernel_dtype(kernel_dtype: str, supported: tuple = KERNEL_DTYPES, op: str = "sinkhorn_unbalanced") -> str:
    if kernel_dtype not in supported:
        raise ValueError(
            f"backend='triton' {op} cannot store the kernel matrix as kernel_dtype={kernel_dtype!r} "
            f"(supported: {supported})"
        )
    return kernel_dtype


def check_attention_kernel_dtype(kernel_dtype: str) -> str:
    return check_kernel_dtype(kernel_dtype, ATTENTION_KERNEL_DTYPES, "ot_attention")


@torch.library.custom_op("pisces_fast::triton_sinkhorn", mutates_args=())
def triton_sinkhorn(
    cost: Tensor,
    row_mask: Optional[Tensor],
    col_mask: Optional[Tensor],
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    domain: str = "auto",
    kernel_dtype: str = "auto",
) -> Tensor:
    check_kernel_dtype(kernel_dtype)
    return sinkhorn_forward(cost, row_mask, col_mask, eps, mass, max_iter, tol, domain_code(domain),
                            kernel_dtype=kernel_dtype)


@triton_sinkhorn.register_fake
def _(cost, row_mask, col_mask, eps, mass, max_iter, tol, domain="auto", kernel_dtype="auto"):
    return torch.empty_like(cost, memory_format=torch.contiguous_format)


@torch.library.custom_op("pisces_fast::triton_ot_attention", mutates_args=())
def triton_ot_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    frame_idx: Tensor,
    coords: Tensor,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    gamma: float,
    eta: float,
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    fuse_eps: float,
    scale: float,
    return_plan: bool,
    domain: str = "auto",
    kernel_dtype: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_attention_kernel_dtype(kernel_dtype)
    return ot_attention_forward(
        q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
        gamma, eta, eps, mass, max_iter, tol, fuse_eps, scale, return_plan, domain_code(domain),
    )


@triton_ot_attention.register_fake
def _(q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask, gamma, eta, eps, mass, max_iter, tol,
      fuse_eps, scale, return_plan, domain="auto", kernel_dtype="auto"):
    b, h, n, _ = q.shape
    m, dv = k.shape[2], v.shape[3]
    out = q.new_empty((b, h, n, dv))
    plan = q.new_empty((b, h, n, m) if return_plan else (0,))
    row_stats = q.new_empty((b * h, ROW_STATS.value, n))
    log_v = q.new_empty((b * h, m))
    ranges = q.new_empty((b * h, N_RANGES.value))
    y = q.new_empty((b, h, n, dv))
    return out, plan, row_stats, log_v, ranges, y


@torch.library.custom_op("pisces_fast::triton_ot_attention_backward", mutates_args=())
def triton_ot_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    frame_idx: Tensor,
    coords: Tensor,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    out: Tensor,
    row_stats: Tensor,
    log_v: Tensor,
    ranges: Tensor,
    y: Tensor,
    gamma: float,
    eta: float,
    eps: float,
    fuse_eps: float,
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    return ot_attention_backward(
        dout, q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
        out, row_stats, log_v, ranges, y, gamma, eta, eps, fuse_eps, scale,
    )


@triton_ot_attention_backward.register_fake
def _(dout, q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask, out, row_stats, log_v, ranges, y,
      gamma, eta, eps, fuse_eps, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    (q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
     gamma, eta, eps, _mass, _max_iter, _tol, fuse_eps, scale, _return_plan, _domain, _kernel_dtype) = inputs
    out, plan, row_stats, log_v, ranges, y = output
    ctx.save_for_backward(q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
                          out, row_stats, log_v, ranges, y)
    ctx.scalars = (gamma, eta, eps, fuse_eps, scale)
    # The plan is a detached prior; the statistics are bookkeeping for the backward.
    ctx.mark_non_differentiable(plan, row_stats, log_v, ranges, y)


def _backward(ctx, dout, _dplan, _drow_stats, _dlog_v, _dranges, _dy):
    q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask, out, row_stats, log_v, ranges, y = (
        ctx.saved_tensors
    )
    gamma, eta, eps, fuse_eps, scale = ctx.scalars
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.pisces_fast.triton_ot_attention_backward(
        dout, q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
        out, row_stats, log_v, ranges, y, gamma, eta, eps, fuse_eps, scale,
    )
    # Gradients for q, k, v; none for the positions, masks and scalars.
    return (dq, dk, dv) + (None,) * 15


triton_ot_attention.register_autograd(_backward, setup_context=_setup_context)
