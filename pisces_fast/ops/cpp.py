"""The C++/OpenMP CPU backend (``backend="cpp"``): ``torch.library`` custom ops around ``pisces_fast._C``.

The kernels (``csrc/``) reproduce :mod:`pisces_fast.ops.reference` exactly (same Algorithm 3
stopping rule, masking, range normalization and fusion); they differ only in rounding.

* ``pisces_fast::cpp_sinkhorn`` — batched Sinkhorn on (P, N, M) costs. Per problem it runs the
  scaling-domain iteration (a precomputed kernel ``exp(-(C - min C)/eps)``, two matrix-vector
  products per iteration, no exp in the N x M loop) when the cost range over eps keeps every
  row/column sum a normal number at full precision, and the log domain otherwise (small eps); both
  give the log-domain answer to rounding. See ``csrc/sinkhorn.h``.
* ``pisces_fast::cpp_ot_attention`` — the fused forward (scores, softmax, tau/pi, cost, Sinkhorn,
  fusion, A~ V), one (batch, head) problem per OpenMP thread with its N x M intermediates in cache.
  Its backward (to q, k, v through A; the plan is a detached prior) is ``pisces_fast::
  cpp_ot_attention_backward``: per problem it recomputes A = exp(q kᵀ·scale - lse) from q, k and the
  forward's saved row statistics (lse, Z) in one pass, reuses the saved plan and forms dv, dq, dk with
  cache-resident GEMMs (the math: ``ot_attention_backward_reference_math``).

Both ops have fake (meta) implementations, so models calling them work under ``torch.compile``.
Work is split over ``torch.get_num_threads()`` threads, one problem per thread at a time, so the
results do not depend on the thread count.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from pisces_fast import _C  # noqa: F401 - ImportError here means "backend not built" (see backends.py)

from .reference import unbalanced_exponent

# OTConfig.domain -> the kernels' iteration code: "auto" decides per problem (see csrc/sinkhorn.h,
# scaling_domain_is_safe); "scaling" / "log" force one (for tests and benchmarks).
SINKHORN_DOMAINS = {"auto": 0, "scaling": 1, "log": 2}
# OTConfig.kernel_dtype -> the kernels' storage code for the scaling-domain kernel matrix (csrc/sinkhorn.h,
# KernelStorage): "float32" keeps the input's precision (float64 inputs stay float64); "bfloat16" /
# "float16" need float32 inputs and the scaling domain (else ValueError); "auto" stores float16 only where
# every entry is a normal float16 and the a-priori plan error bound <= KERNEL16_AUTO_PLAN_RTOL.
KERNEL_DTYPES = {"auto": 0, "float32": 1, "bfloat16": 2, "float16": 3}
KERNEL16_AUTO_PLAN_RTOL = float(_C.KERNEL16_AUTO_PLAN_RTOL)
KERNEL16_FLOAT16_MAX_RANGE = float(_C.KERNEL16_FLOAT16_MAX_RANGE)


def _domain_code(domain: str) -> int:
    try:
        return SINKHORN_DOMAINS[domain]
    except KeyError:
        raise ValueError(f"domain must be one of {tuple(SINKHORN_DOMAINS)}, got {domain!r}") from None


def _check_kernel_dtype(kernel_dtype: str) -> str:
    if kernel_dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"backend='cpp' cannot store the kernel matrix as kernel_dtype={kernel_dtype!r} in this build "
            f"(supported: {tuple(KERNEL_DTYPES)})"
        )
    return kernel_dtype


def scaling_domain_is_safe(cost_range: float, eps: float, n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``domain="auto"`` runs the scaling-domain iteration for a problem of this cost range."""
    return bool(_C.scaling_domain_is_safe(float(cost_range), float(eps), int(n), int(m), dtype == torch.float64))


def kernel16_plan_error_bound(mass: float, kernel_dtype: str, eps: float = 0.05) -> float:
    """A-priori bound on every plan entry's relative error from storing the kernel in ``kernel_dtype``.

    ``exp(2 tau delta / (1 - tau)) - 1`` with ``tau = unbalanced_exponent(eps, mass)`` and ``delta =
    -log(1 - u)`` for the format's unit roundoff u (2^-8 bfloat16, 2^-11 float16); 0 for "float32", inf
    for balanced OT. See docs/numerics.md ("16-bit kernel storage").
    """
    return float(_C.kernel16_plan_error_bound(float(unbalanced_exponent(eps, mass)), KERNEL_DTYPES[kernel_dtype]))


def kernel_storage(cost_range: float, eps: float, mass: float, n: int, m: int, dtype: torch.dtype,
                   kernel_dtype: str = "auto", domain: str = "auto") -> str:
    """How a problem whose valid costs span ``cost_range`` stores its kernel: "float32" (the input's
    precision, or no kernel matrix in the log domain), "bfloat16" or "float16". Raises ValueError where a
    requested 16-bit storage cannot be honoured, as the kernels do."""
    scaling = domain == "scaling" or (domain == "auto" and scaling_domain_is_safe(cost_range, eps, n, m, dtype))
    code = _C.resolve_kernel_storage(KERNEL_DTYPES[kernel_dtype], scaling, float(cost_range), float(eps),
                                     float(unbalanced_exponent(eps, mass)), dtype == torch.float64)
    return {1: "float32", 2: "bfloat16", 3: "float16"}[int(code)]


# ---------------------------------------------------------------------------------------------
# Sinkhorn


@torch.library.custom_op("pisces_fast::cpp_sinkhorn", mutates_args=(), device_types="cpu")
def _sinkhorn_op(
    cost: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    col_mask: Optional[torch.Tensor],
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    domain: str,
    kernel_dtype: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = row_mask.contiguous() if row_mask is not None else None
    cols = col_mask.contiguous() if col_mask is not None else None
    _check_kernel_dtype(kernel_dtype)
    tau = unbalanced_exponent(eps, mass)
    plan, n_iter, scaling = _C.sinkhorn(cost.contiguous(), rows, cols, eps, tau, max_iter, tol, _domain_code(domain),
                                        KERNEL_DTYPES[kernel_dtype])
    return plan, n_iter, scaling


@_sinkhorn_op.register_fake
def _sinkhorn_fake(cost, row_mask, col_mask, eps, mass, max_iter, tol, domain, kernel_dtype):
    p = cost.shape[0]
    return (
        torch.empty_like(cost, memory_format=torch.contiguous_format),
        cost.new_empty((p,), dtype=torch.int32),
        cost.new_empty((p,), dtype=torch.bool),
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
    return_info: bool = False,
):
    """Algorithm 3 on validated (P, N, M) float32/float64 CPU costs; masks (P, N) / (P, M) or None.

    ``domain`` / ``kernel_dtype`` as in :class:`~pisces_fast.ops.OTConfig` (a kernel dtype this
    build cannot honour is a ValueError). Returns the plan, or with ``return_info``
    ``(plan, n_iter, used_scaling)`` where ``n_iter`` (int32, per problem) counts the accepted
    updates as the reference does and ``used_scaling`` (bool) says which iteration ran.
    """
    _domain_code(domain)
    _check_kernel_dtype(kernel_dtype)
    plan, n_iter, scaling = torch.ops.pisces_fast.cpp_sinkhorn(
        cost.contiguous(),
        row_mask.contiguous() if row_mask is not None else None,
        col_mask.contiguous() if col_mask is not None else None,
        float(eps),
        float(mass),
        int(max_iter),
        float(tol),
        domain,
        kernel_dtype,
    )
    return (plan, n_iter, scaling) if return_info else plan


# ---------------------------------------------------------------------------------------------
# OT attention


@torch.library.custom_op("pisces_fast::cpp_ot_attention", mutates_args=(), device_types="cpu")
def _ot_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    query_padding_mask: Optional[torch.Tensor],
    gamma: float,
    eta: float,
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    fuse_eps: float,
    scale: float,
    domain: str,
    kernel_dtype: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_kernel_dtype(kernel_dtype)
    tau, path = unbalanced_exponent(eps, mass), _domain_code(domain)
    # Per query row (log-sum-exp of the scaled scores, sum Z of the fused (A+fe)(P+fe)): the backward
    # rebuilds A and F from them in one pass, as the Triton backward does.
    row_stats = q.new_empty(q.shape[:-1] + (2,))
    out, plan, _n_iter, _scaling = _C.ot_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), frame_idx.contiguous(), coords.contiguous(),
        key_padding_mask.contiguous() if key_padding_mask is not None else None,
        query_padding_mask.contiguous() if query_padding_mask is not None else None,
        gamma, eta, eps, tau, max_iter, tol, fuse_eps, scale, path, KERNEL_DTYPES[kernel_dtype], row_stats,
    )
    return out, plan, row_stats


@_ot_attention_op.register_fake
def _ot_attention_fake(q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask, gamma, eta, eps, mass,
                       max_iter, tol, fuse_eps, scale, domain, kernel_dtype):
    b, h, n, _ = q.shape
    m, dv = v.shape[-2], v.shape[-1]
    return q.new_empty((b, h, n, dv)), q.new_empty((b, h, n, m)), q.new_empty((b, h, n, 2))


@torch.library.custom_op("pisces_fast::cpp_ot_attention_backward", mutates_args=(), device_types="cpu")
def _ot_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: torch.Tensor,
    grad_out: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    query_padding_mask: Optional[torch.Tensor],
    scale: float,
    fuse_eps: float,
    row_stats: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _C.ot_attention_backward(
        q.contiguous(), k.contiguous(), v.contiguous(), plan.contiguous(), grad_out.contiguous(),
        key_padding_mask.contiguous() if key_padding_mask is not None else None,
        query_padding_mask.contiguous() if query_padding_mask is not None else None,
        scale, fuse_eps, row_stats.contiguous() if row_stats is not None else None,
    )
    return dq, dk, dv


@_ot_attention_backward_op.register_fake
def _ot_attention_backward_fake(q, k, v, plan, grad_out, key_padding_mask, query_padding_mask, scale, fuse_eps,
                                row_stats=None):
    # The kernel returns contiguous gradients whatever q/k/v's strides; the fake must say the same, or a
    # compiled backward plans views for strides the real tensors do not have.
    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous), torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous))


def ot_attention_backward_reference_math(q, k, v, plan, grad_out, key_padding_mask, query_padding_mask, scale,
                                         fuse_eps):
    """The backward kernel's math with torch ops (documentation, and an oracle for the tests).

    Forward: S = q kᵀ·scale (padded keys -inf), A = softmax(S), F̂ = (A+fe)(P+fe) (padded keys 0),
    F = F̂ / Z with Z = Σ_j F̂, out = F v (padded query rows 0); the plan P is held fixed.
    """
    col = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    scores = (q @ k.transpose(-1, -2)) * scale
    if col is not None:
        scores = scores.masked_fill(~col, -math.inf)
    attn = torch.softmax(scores, dim=-1)
    fused = (attn + fuse_eps) * (plan + fuse_eps)
    if col is not None:
        fused = fused.masked_fill(~col, 0.0)
    z = fused.sum(dim=-1, keepdim=True)
    f = fused / z
    if query_padding_mask is not None:
        grad_out = grad_out.masked_fill(~query_padding_mask[:, None, :, None], 0.0)
    grad_v = f.transpose(-1, -2) @ grad_out
    grad_f = grad_out @ v.transpose(-1, -2)
    grad_fused = (grad_f - (grad_f * f).sum(dim=-1, keepdim=True)) / z
    grad_attn = grad_fused * (plan + fuse_eps)
    if col is not None:
        grad_attn = grad_attn.masked_fill(~col, 0.0)
    grad_scores = attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True)) * scale
    grad_q = grad_scores @ k
    grad_k = grad_scores.transpose(-1, -2) @ q
    return grad_q, grad_k, grad_v


def _ot_attention_setup_context(ctx, inputs, output):
    q, k, v, _t, _s, key_padding_mask, query_padding_mask = inputs[:7]
    fuse_eps, scale = inputs[13], inputs[14]
    _out, plan, row_stats = output
    ctx.mark_non_differentiable(plan, row_stats)
    ctx.save_for_backward(q, k, v, plan, key_padding_mask, query_padding_mask, row_stats)
    ctx.scale = scale
    ctx.fuse_eps = fuse_eps


def _ot_attention_backward(ctx, grad_out, _grad_plan, _grad_row_stats):
    q, k, v, plan, key_padding_mask, query_padding_mask, row_stats = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    grad_q, grad_k, grad_v = torch.ops.pisces_fast.cpp_ot_attention_backward(
        q, k, v, plan, grad_out, key_padding_mask, query_padding_mask, ctx.scale, ctx.fuse_eps, row_stats
    )
    return (grad_q, grad_k, grad_v) + (None,) * 14


_ot_attention_op.register_autograd(_ot_attention_backward, setup_context=_ot_attention_setup_context)


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
    """Fused OT-attention on validated float32/float64 CPU inputs: returns ``(out, plan)``.

    q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); frame_idx (M,), coords (M, 2) in q's dtype;
    masks (B, M) / (B, N) bool or None. ``out`` is differentiable in q, k, v; ``plan`` is detached
    (computed anyway: the backward reuses it; returned as None with ``return_plan=False``).
    """
    _domain_code(domain)
    _check_kernel_dtype(kernel_dtype)
    out, plan, _row_stats = torch.ops.pisces_fast.cpp_ot_attention(
        q, k, v, frame_idx.to(q.dtype), coords.to(q.dtype),
        key_padding_mask.contiguous() if key_padding_mask is not None else None,
        query_padding_mask.contiguous() if query_padding_mask is not None else None,
        float(gamma), float(eta), float(eps), float(mass), int(max_iter), float(tol),
        float(fuse_eps), float(scale), domain, kernel_dtype,
    )
    return out, (plan.detach() if return_plan else None)
