"""Public entry points of the token-level partial OT: validate, pick a backend, run.

The hyper-parameters live in one frozen :class:`~pisces_fast.ops.OTConfig` (validated once, at
construction). Each public function takes ``config=`` and, for convenience, the config's fields as
keyword arguments (``eps=0.1`` overrides ``config.eps``; None means "from config").

All backends implement the same two functions with the same keyword names:
``sinkhorn_unbalanced(cost, *, eps, mass, max_iter, tol, domain, kernel_dtype, row_mask, col_mask)
-> plan`` and ``ot_attention(q, k, v, frame_idx, coords, *, gamma, eta, eps, mass, max_iter, tol,
fuse_eps, domain, kernel_dtype, scale, key_padding_mask, query_padding_mask, return_plan)
-> (out, plan or None)``, on validated, contiguous inputs.

Validation (see :mod:`._checks`): type, shape, dtype and device checks always run and read no data;
value checks (NaN/Inf, magnitudes inside the valid domain, all-padding masks) cost one fused
``aminmax`` pass per tensor and one host read, run by default on CPU tensors only
(``check_inputs=None``; True forces them, False skips them) and never inside ``torch.compile``.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from . import reference
from ._checks import (
    check_cost_scale,
    check_in_range,
    check_device,
    check_mask,
    check_positions_structure,
    check_positive,
    check_tensor,
    check_values,
    compute_dtype,
    value_checks_enabled,
)
from .backends import resolve_backend
from .config import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    FEATURE_MAX,
    FUSE_EPS_RANGE,
    POSITION_MAX,
    SCORE_MAX,
    WEIGHT_MAX,
    OTConfig,
    resolve_config,
)

__all__ = [
    "DEFAULT_MAX_ITER",  # re-exported for callers that imported it from here
    "DEFAULT_TOL",
    "fuse_attention",
    "ot_attention",
    "sinkhorn_unbalanced",
    "spatiotemporal_cost",
]

_BACKEND_MODULES = {
    "reference": "pisces_fast.ops.reference",
    "cpp": "pisces_fast.ops.cpp",
    "triton": "pisces_fast.ops.triton",
}
_LOADED = {}


def _backend_module(name: str):
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_BACKEND_MODULES[name])
    return module


def sinkhorn_unbalanced(
    cost: torch.Tensor,
    *,
    config: Optional[OTConfig] = None,
    eps: Optional[float] = None,
    mass: Optional[float] = None,
    max_iter: Optional[int] = None,
    tol: Optional[float] = None,
    domain: Optional[str] = None,
    kernel_dtype: Optional[str] = None,
    check_inputs: Optional[bool] = None,
    row_mask: Optional[torch.Tensor] = None,
    col_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Partial OT plan of PISCES Algorithm 3 (entropic, KL-relaxed marginals).

    Args:
        cost: ``(..., N, M)`` cost matrices (any leading batch dims), normally in [0, 1]; valid
            domain: finite with max |C| / eps <= 1e6 (``COST_OVER_EPS_MAX``).
        config: an :class:`OTConfig` (default ``OTConfig()``: eps=0.05, mass=0.9, max_iter=100,
            tol=1e-5); the keyword arguments below override its fields (None = from ``config``).
        eps: entropic temperature ε ∈ [1e-6, 1e3].
        mass: the paper's transported fraction m ∈ (0, 1]. It sets the KL relaxation
            ρ = ε·m/(1−m), i.e. the update exponent τ = ρ/(ρ+ε) (= m); m ≥ 0.999 is balanced OT.
            The plan's total mass is *not* m in general (see docs/numerics.md).
        max_iter: maximum number of (u, v) updates, in [1, 1e6].
        tol: per-problem stop when max(|Δlog u|, |Δlog v|) < tol; 0 runs exactly ``max_iter``.
        domain, kernel_dtype: which iteration / kernel storage a fused backend uses (see
            :class:`OTConfig`); every choice gives the same plan to its documented tolerance.
        check_inputs: value checks (NaN/Inf, valid domain, all-padding masks). Default None: on for
            CPU tensors, off for CUDA tensors (no host sync); never inside ``torch.compile``.
        row_mask, col_mask: bool ``(..., N)`` / ``(..., M)``, True = real. Marginals are uniform
            over the real rows/columns and padding carries exactly zero mass.
        backend: "auto" | "reference" | "cpp" | "triton".

    Returns:
        The plan, shape and dtype of ``cost``. Not differentiable (it is used as a detached prior).
    """
    check_tensor("cost", cost, min_rank=2)
    device = cost.device
    row_mask_in, col_mask_in = row_mask, col_mask
    row_mask = check_mask("row_mask", row_mask, cost.shape[:-1], device)
    col_mask = check_mask("col_mask", col_mask, (*cost.shape[:-2], cost.shape[-1]), device)
    cfg = resolve_config(config, eps=eps, mass=mass, max_iter=max_iter, tol=tol, domain=domain,
                         kernel_dtype=kernel_dtype, check_inputs=check_inputs)
    impl = resolve_backend(backend, device)
    if value_checks_enabled(cfg.check_inputs, device):
        (cost_absmax,) = check_values([("cost", cost, None)], [("row_mask", row_mask_in), ("col_mask", col_mask_in)])
        check_cost_scale("cost", cost_absmax, cfg.eps)

    work = compute_dtype(cost.dtype)
    batch = cost.shape[:-2]
    n, m = cost.shape[-2:]
    flat = cost.detach().to(work).reshape(-1, n, m).contiguous()
    rows = row_mask.reshape(-1, n).contiguous() if row_mask is not None else None
    cols = col_mask.reshape(-1, m).contiguous() if col_mask is not None else None
    with torch.no_grad():
        plan = _backend_module(impl).sinkhorn_unbalanced(flat, **cfg.solver_kwargs(), row_mask=rows, col_mask=cols)
    return plan.reshape(*batch, n, m).to(cost.dtype)


def _position_checks(frame_idx, coords):
    return [("frame_idx", frame_idx, POSITION_MAX), ("coords", coords, POSITION_MAX)]


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
    check_inputs: Optional[bool] = None,
) -> torch.Tensor:
    """The spatio-temporal, semantics-aware cost of PISCES Appendix C, min-max normalized to [0, 1].

    ``C = norm(norm(1 - cos(q_i, k_j)) + γ·norm(|τ_i - t_j|) + η·norm(‖π_i - s_j‖₂))`` with
    ``τ = A t`` and ``π = A s`` the attention-weighted frame index and (row, col) of each query, and
    each ``norm`` a min-max over the problem's valid entries (a constant component contributes 0).

    Args:
        q: ``(..., N, D)`` text-token queries; k: ``(..., M, D)`` video-token keys.
        attn: ``(..., N, M)`` row-stochastic attention.
        frame_idx: ``(M,)`` frame index of each video token; coords: ``(M, 2)`` its (row, col);
            magnitudes <= 1e6 (``POSITION_MAX``).
        gamma, eta: weights of the temporal and spatial terms, in [0, 1e3].
        row_mask, col_mask: bool ``(..., N)`` / ``(..., M)``, True = real; padding entries of the
            result are 0.
        check_inputs: value checks, as in :func:`sinkhorn_unbalanced` (default: on for CPU tensors).
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
    gamma = check_in_range("gamma", gamma, 0.0, WEIGHT_MAX, allow_zero=True)
    eta = check_in_range("eta", eta, 0.0, WEIGHT_MAX, allow_zero=True)
    device = q.device
    check_device("k", k, device)
    check_device("attn", attn, device)
    check_positions_structure(frame_idx, coords, m, device)
    row_mask_in, col_mask_in = row_mask, col_mask
    row_mask = check_mask("row_mask", row_mask, (*batch, n), device)
    col_mask = check_mask("col_mask", col_mask, (*batch, m), device)
    if value_checks_enabled(check_inputs, device):
        check_values(
            [("q", q, FEATURE_MAX), ("k", k, FEATURE_MAX), ("attn", attn, None), *_position_checks(frame_idx, coords)],
            [("row_mask", row_mask_in), ("col_mask", col_mask_in)],
        )
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
    check_inputs: Optional[bool] = None,
) -> torch.Tensor:
    """Log-space fusion (Eq. 3): ``Ã ∝ exp(log(A + ε) + log(P + ε))``, row-normalized.

    Differentiable in ``attn``; ``plan`` is treated as a detached prior. Columns where ``col_mask``
    is False get exactly 0. ``eps`` is ``OTConfig.fuse_eps``, in [1e-30, 1e3].
    """
    check_tensor("attn", attn, min_rank=2)
    check_tensor("plan", plan, min_rank=2)
    if attn.shape != plan.shape:
        raise ValueError(f"attn and plan must have the same shape, got {tuple(attn.shape)} and {tuple(plan.shape)}")
    eps = check_in_range("eps", eps, *FUSE_EPS_RANGE)
    device = attn.device
    check_device("plan", plan, device)
    col_mask_in = col_mask
    col_mask = check_mask("col_mask", col_mask, (*attn.shape[:-2], attn.shape[-1]), device)
    if value_checks_enabled(check_inputs, device):
        check_values([("attn", attn, None), ("plan", plan, None)], [("col_mask", col_mask_in)])
    return reference.fuse_attention(attn, plan.detach().to(attn.dtype), eps=eps, col_mask=col_mask)


def ot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    *,
    config: Optional[OTConfig] = None,
    gamma: Optional[float] = None,
    eta: Optional[float] = None,
    eps: Optional[float] = None,
    mass: Optional[float] = None,
    max_iter: Optional[int] = None,
    tol: Optional[float] = None,
    fuse_eps: Optional[float] = None,
    domain: Optional[str] = None,
    kernel_dtype: Optional[str] = None,
    check_inputs: Optional[bool] = None,
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
        v: ``(B, H, M, Dv)`` values. Valid domain: finite, |entries| <= 1e15 and
            max|q|·max|k|·D·scale <= 1e30 (scores finite in float32).
        frame_idx, coords: ``(M,)`` and ``(M, 2)`` video-token positions
            (see :func:`video_token_positions`), magnitudes <= 1e6.
        config: an :class:`OTConfig` (default ``OTConfig()``, the paper's setting); the keyword
            arguments gamma ... check_inputs override its fields (None = from ``config``). See
            :class:`OTConfig` for each one's meaning and valid domain.
        check_inputs: value checks (NaN/Inf, valid domain, all-padding masks). Default None: on for
            CPU tensors, off for CUDA tensors (no host sync on the hot path); never inside
            ``torch.compile``.
        scale: score scale, default ``1/sqrt(D)``.
        key_padding_mask: bool ``(B, M)``, True = real video token.
        query_padding_mask: bool ``(B, N)``, True = real text token; padded rows output 0 and carry
            no mass in the plan.
        return_plan: also return the plan ``(B, H, N, M)``.
        backend: "auto" | "reference" | "cpp" | "triton".

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
    device = q.device
    check_device("k", k, device)
    check_device("v", v, device)
    check_positions_structure(frame_idx, coords, m, device)
    for name, mask, shape in (("key_padding_mask", key_padding_mask, (b, m)), ("query_padding_mask", query_padding_mask, (b, n))):
        if isinstance(mask, torch.Tensor) and mask.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (True = real token), got {tuple(mask.shape)}")
        check_mask(name, mask, shape, device)
    cfg = resolve_config(config, gamma=gamma, eta=eta, eps=eps, mass=mass, max_iter=max_iter, tol=tol,
                         fuse_eps=fuse_eps, domain=domain, kernel_dtype=kernel_dtype, check_inputs=check_inputs)
    scale = 1.0 / math.sqrt(d) if scale is None else check_positive("scale", scale)
    if not isinstance(return_plan, bool):
        raise TypeError(f"return_plan must be a bool, got {type(return_plan).__name__}")
    impl = resolve_backend(backend, device)
    if value_checks_enabled(cfg.check_inputs, device):
        q_max, k_max, _v_max, _t, _s = check_values(
            [("q", q, FEATURE_MAX), ("k", k, FEATURE_MAX), ("v", v, FEATURE_MAX), *_position_checks(frame_idx, coords)],
            [("key_padding_mask", key_padding_mask), ("query_padding_mask", query_padding_mask)],
        )
        if q_max * k_max * d * scale > SCORE_MAX:
            raise ValueError(
                f"scores q·k·scale may reach {q_max * k_max * d * scale:.3g} > {SCORE_MAX:g} (max|q|={q_max:.3g}, "
                f"max|k|={k_max:.3g}, D={d}, scale={scale:.3g}); the valid domain keeps them finite in float32 "
                "(see docs/numerics.md)"
            )

    work = compute_dtype(q.dtype)
    out, plan = _backend_module(impl).ot_attention(
        q.to(work), k.to(work), v.to(work),
        frame_idx.to(device=device, dtype=work), coords.to(device=device, dtype=work),
        **cfg.attention_kwargs(), scale=scale,
        key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, return_plan=return_plan,
    )
    out = out.to(q.dtype)
    return (out, plan.to(q.dtype)) if return_plan else out
