"""Public entry points of the token-level partial OT: validate, pick a backend, run.

All backends implement the same two functions with the reference's signatures:
``sinkhorn_unbalanced(cost, *, eps, mass, max_iter, tol, row_mask, col_mask) -> plan`` and
``ot_attention(q, k, v, frame_idx, coords, *, gamma, eta, eps, mass, max_iter, tol, fuse_eps, scale,
key_padding_mask, query_padding_mask) -> (out, plan)``, on validated, contiguous inputs.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from . import reference
from ._checks import (
    check_mask,
    check_mass,
    check_max_iter,
    check_positive,
    check_same_device,
    check_tensor,
    compute_dtype,
)
from .backends import resolve_backend

# Measured in docs/numerics.md: at the paper's setting (eps=0.05, m=0.9, 40 x 2049) every problem
# we drew reached max |Δlog u|, |Δlog v| < 1e-5 within 60 iterations; 100 leaves headroom for
# harder (smaller-eps, larger) problems while bounding the cost of the non-converging ones.
DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-5

_BACKEND_MODULES = {
    "reference": "pisces_fast.ops.reference",
    "cpp": "pisces_fast.ops.cpp",
    "triton": "pisces_fast.ops.triton",
}


def _backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _check_solver_args(eps, mass, max_iter, tol):
    return check_positive("eps", eps), check_mass(mass), check_max_iter(max_iter), check_positive("tol", tol, allow_zero=True)


def sinkhorn_unbalanced(
    cost: torch.Tensor,
    *,
    eps: float = 0.05,
    mass: float = 0.9,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    row_mask: Optional[torch.Tensor] = None,
    col_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Partial OT plan of PISCES Algorithm 3 (entropic, KL-relaxed marginals, log domain).

    Args:
        cost: ``(..., N, M)`` cost matrices (any leading batch dims), normally in [0, 1].
        eps: entropic temperature ε > 0.
        mass: the paper's transported fraction m ∈ (0, 1]. It sets the KL relaxation
            ρ = ε·m/(1−m), i.e. the update exponent τ = ρ/(ρ+ε) (= m); m ≥ 0.999 is balanced OT.
            The plan's total mass is *not* m in general (see docs/numerics.md).
        max_iter: maximum number of (u, v) updates.
        tol: per-problem stop when max(|Δlog u|, |Δlog v|) < tol; 0 runs exactly ``max_iter``.
        row_mask, col_mask: bool ``(..., N)`` / ``(..., M)``, True = real. Marginals are uniform
            over the real rows/columns and padding carries exactly zero mass.
        backend: "auto" | "reference" | "cpp" | "triton".

    Returns:
        The plan, shape and dtype of ``cost``. Not differentiable (it is used as a detached prior).
    """
    check_tensor("cost", cost, min_rank=2)
    eps, mass, max_iter, tol = _check_solver_args(eps, mass, max_iter, tol)
    device = check_same_device(cost=cost, row_mask=row_mask, col_mask=col_mask)
    row_mask = check_mask("row_mask", row_mask, cost.shape[:-1], device)
    col_mask = check_mask("col_mask", col_mask, (*cost.shape[:-2], cost.shape[-1]), device)
    impl = resolve_backend(backend, device)

    work = compute_dtype(cost.dtype)
    batch = cost.shape[:-2]
    n, m = cost.shape[-2:]
    flat = cost.detach().to(work).reshape(-1, n, m).contiguous()
    rows = row_mask.reshape(-1, n).contiguous() if row_mask is not None else None
    cols = col_mask.reshape(-1, m).contiguous() if col_mask is not None else None
    with torch.no_grad():
        plan = _backend_module(impl).sinkhorn_unbalanced(
            flat, eps=eps, mass=mass, max_iter=max_iter, tol=tol, row_mask=rows, col_mask=cols
        )
    return plan.reshape(*batch, n, m).to(cost.dtype)


def _check_positions(frame_idx, coords, m: int, device):
    for name, t in (("frame_idx", frame_idx), ("coords", coords)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
        if t.numel() and not torch.isfinite(t.to(torch.float64)).all():
            raise ValueError(f"{name} contains NaN or Inf values")
    if frame_idx.shape != (m,):
        raise ValueError(
            f"frame_idx must have shape (M,) = ({m},) (one frame index per video token), got {tuple(frame_idx.shape)}"
        )
    if coords.shape != (m, 2):
        raise ValueError(
            f"coords must have shape (M, 2) = ({m}, 2) (one (row, col) per video token), got {tuple(coords.shape)}"
        )


def spatiotemporal_cost(
    q: torch.Tensor,
    k: torch.Tensor,
    attn: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    *,
    gamma: float = 0.2,
    eta: float = 0.2,
    row_mask: Optional[torch.Tensor] = None,
    col_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The spatio-temporal, semantics-aware cost of PISCES Appendix C, min-max normalized to [0, 1].

    ``C = norm(norm(1 - cos(q_i, k_j)) + γ·norm(|τ_i - t_j|) + η·norm(‖π_i - s_j‖₂))`` with
    ``τ = A t`` and ``π = A s`` the attention-weighted frame index and (row, col) of each query, and
    each ``norm`` a min-max over the problem's valid entries (a constant component contributes 0).

    Args:
        q: ``(..., N, D)`` text-token queries; k: ``(..., M, D)`` video-token keys.
        attn: ``(..., N, M)`` row-stochastic attention.
        frame_idx: ``(M,)`` frame index of each video token; coords: ``(M, 2)`` its (row, col).
        gamma, eta: weights of the temporal and spatial terms (≥ 0).
        row_mask, col_mask: bool ``(..., N)`` / ``(..., M)``, True = real; padding entries of the
            result are 0.
    """
    check_tensor("q", q, min_rank=2)
    check_tensor("k", k, min_rank=2)
    check_tensor("attn", attn, min_rank=2)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the feature dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    n, m = q.shape[-2], k.shape[-2]
    if attn.shape[-2:] != (n, m):
        raise ValueError(f"attn must end in (N, M) = ({n}, {m}), got {tuple(attn.shape)}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], attn.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch dims of q {tuple(q.shape)}, k {tuple(k.shape)} and attn {tuple(attn.shape)} do not broadcast"
        ) from None
    gamma = check_positive("gamma", gamma, allow_zero=True)
    eta = check_positive("eta", eta, allow_zero=True)
    device = check_same_device(q=q, k=k, attn=attn)
    _check_positions(frame_idx, coords, m, device)
    row_mask = check_mask("row_mask", row_mask, (*batch, n), device)
    col_mask = check_mask("col_mask", col_mask, (*batch, m), device)
    work = compute_dtype(torch.promote_types(q.dtype, torch.promote_types(k.dtype, attn.dtype)))
    out = reference.spatiotemporal_cost(
        q.to(work), k.to(work), attn.to(work), frame_idx, coords,
        gamma=gamma, eta=eta, row_mask=row_mask, col_mask=col_mask,
    )
    return out.to(attn.dtype)


def fuse_attention(
    attn: torch.Tensor,
    plan: torch.Tensor,
    *,
    eps: float = 1e-8,
    col_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log-space fusion (Eq. 3): ``Ã ∝ exp(log(A + ε) + log(P + ε))``, row-normalized.

    Differentiable in ``attn``; ``plan`` is treated as a detached prior. Columns where ``col_mask``
    is False get exactly 0.
    """
    check_tensor("attn", attn, min_rank=2)
    check_tensor("plan", plan, min_rank=2)
    if attn.shape != plan.shape:
        raise ValueError(f"attn and plan must have the same shape, got {tuple(attn.shape)} and {tuple(plan.shape)}")
    eps = check_positive("eps", eps)
    device = check_same_device(attn=attn, plan=plan)
    col_mask = check_mask("col_mask", col_mask, (*attn.shape[:-2], attn.shape[-1]), device)
    return reference.fuse_attention(attn, plan.detach().to(attn.dtype), eps=eps, col_mask=col_mask)


def ot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    *,
    gamma: float = 0.2,
    eta: float = 0.2,
    eps: float = 0.05,
    mass: float = 0.9,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    fuse_eps: float = 1e-8,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    return_plan: bool = False,
    backend: str = "auto",
):
    """Cross-attention with the PISCES partial-OT plan fused in: a drop-in for SDPA.

    ``A = softmax(q kᵀ · scale)``; the cost (Appendix C) and the plan (Algorithm 3) are computed
    per (batch, head) from A; ``Ã = norm((A + fuse_eps)(P + fuse_eps))`` (Eq. 3); ``out = Ã v``.
    Gradients reach q, k and v through A; the plan is a detached prior.

    Args:
        q: ``(B, H, N, D)`` queries (text tokens). k: ``(B, H, M, D)`` keys (video tokens).
        v: ``(B, H, M, Dv)`` values.
        frame_idx, coords: ``(M,)`` and ``(M, 2)`` video-token positions
            (see :func:`video_token_positions`).
        scale: score scale, default ``1/sqrt(D)``.
        key_padding_mask: bool ``(B, M)``, True = real video token.
        query_padding_mask: bool ``(B, N)``, True = real text token; padded rows output 0 and carry
            no mass in the plan.
        return_plan: also return the plan ``(B, H, N, M)``.
        backend: "auto" | "reference" | "cpp" | "triton".
        Other arguments: as in :func:`spatiotemporal_cost` and :func:`sinkhorn_unbalanced`.

    Returns:
        ``out (B, H, N, Dv)`` in q's dtype, or ``(out, plan)`` with ``return_plan=True``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4)
    b, h, n, d = q.shape
    m = k.shape[-2]
    if k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise ValueError(f"k must have shape (B, H, M, D) = ({b}, {h}, M, {d}) to match q, got {tuple(k.shape)}")
    if v.shape[:3] != (b, h, m):
        raise ValueError(f"v must have shape (B, H, M, Dv) = ({b}, {h}, {m}, Dv) to match k, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = check_same_device(q=q, k=k, v=v)
    _check_positions(frame_idx, coords, m, device)
    gamma = check_positive("gamma", gamma, allow_zero=True)
    eta = check_positive("eta", eta, allow_zero=True)
    eps, mass, max_iter, tol = _check_solver_args(eps, mass, max_iter, tol)
    fuse_eps = check_positive("fuse_eps", fuse_eps)
    scale = 1.0 / math.sqrt(d) if scale is None else check_positive("scale", scale)
    for name, mask, shape in (("key_padding_mask", key_padding_mask, (b, m)), ("query_padding_mask", query_padding_mask, (b, n))):
        if mask is not None and isinstance(mask, torch.Tensor) and mask.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (True = real token), got {tuple(mask.shape)}")
    key_padding_mask = check_mask("key_padding_mask", key_padding_mask, (b, m), device)
    query_padding_mask = check_mask("query_padding_mask", query_padding_mask, (b, n), device)
    impl = resolve_backend(backend, device)

    work = compute_dtype(q.dtype)
    # Only the Triton kernel can skip writing the (B, H, N, M) plan (its backward recomputes it from the
    # saved potentials); the reference and C++ paths keep the plan for their backward anyway.
    extra = {"return_plan": return_plan} if impl == "triton" else {}
    out, plan = _backend_module(impl).ot_attention(
        q.to(work), k.to(work), v.to(work),
        frame_idx.to(device=device, dtype=work), coords.to(device=device, dtype=work),
        gamma=gamma, eta=eta, eps=eps, mass=mass, max_iter=max_iter, tol=tol,
        fuse_eps=fuse_eps, scale=scale,
        key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, **extra,
    )
    out = out.to(q.dtype)
    return (out, plan.to(q.dtype)) if return_plan else out
