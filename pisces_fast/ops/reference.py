"""The plain-PyTorch reference: the executable specification of the token-level partial OT.

Everything here follows the PISCES paper (§3.2, Appendix C, Algorithm 3) literally, batched over
any leading dimensions, in the caller's precision (float32 or float64). The fused backends
(``backend="cpp"``, ``backend="triton"``) are tested against these functions.

The functions assume validated arguments (see :mod:`pisces_fast.ops._checks`); the public entry
points in :mod:`pisces_fast.ops` validate and then call in here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# A component whose range over the valid entries is below this fraction of its magnitude is
# constant up to rounding; range-normalizing it would blow rounding noise up to [0, 1], so it
# contributes 0 instead (e.g. the temporal term of a single-frame clip).
DEGENERATE_RANGE = 1e-6

# m >= this is treated as balanced OT (tau = 1), as in Algorithm 3.
BALANCED_MASS = 0.999

# With tol > 0 the loop checks for "all problems converged" every this many iterations: one host
# sync per block instead of one per iteration.
CONVERGENCE_CHECK_EVERY = 16


def unbalanced_exponent(eps: float, mass: float) -> float:
    """tau = rho / (rho + eps) with rho = eps * m / (1 - m); balanced (tau = 1) for m >= 0.999.

    Algebraically tau == m: the paper's "fraction of mass" is exactly the damping exponent of the
    KL-relaxed marginal updates. We still compute it the way Algorithm 3 writes it.
    """
    if mass >= BALANCED_MASS:
        return 1.0
    rho = eps * mass / (1.0 - mass)
    return rho / (rho + eps)


def _log_marginal(mask: Optional[torch.Tensor], shape: Tuple[int, ...], n: int, dtype, device) -> torch.Tensor:
    """log of the uniform marginal over the valid entries (padding: 0, never read as a mass)."""
    if mask is None:
        return torch.full(shape, -math.log(n), dtype=dtype, device=device)
    count = mask.sum(dim=-1, keepdim=True).to(dtype)
    return torch.where(mask, -torch.log(count), torch.zeros((), dtype=dtype, device=device))


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
    return_potentials: bool = False,
):
    """Algorithm 3 in the log domain, batched over ``cost.shape[:-2]``.

    ``domain`` and ``kernel_dtype`` are accepted for the backends' common signature and ignored:
    the reference is the spec, and every domain / kernel storage a fused backend may pick is an
    exact reformulation of this log-domain iteration (to its documented tolerance).

    Returns the plan ``P = exp(log u + log K + log v)`` (padding rows/columns exactly 0) and,
    with ``return_potentials``, ``(log_u, log_v, n_iter)`` where ``n_iter`` counts, per problem,
    the iterations whose update was accepted.

    Stopping follows Algorithm 3 exactly: at iteration k the new potentials are computed, and if
    ``max(|Δlog u|, |Δlog v|) < tol`` the problem stops *keeping its previous potentials*;
    otherwise the update is accepted. ``tol = 0`` therefore runs exactly ``max_iter`` updates.
    Converged problems are frozen with ``torch.where`` so the batch never syncs with the host per
    iteration. Under ``torch.compile`` the "all converged" early exit (a host read) is skipped;
    frozen problems make the result the same.
    """
    *batch, n, m = cost.shape
    device, dtype = cost.device, cost.dtype
    tau = unbalanced_exponent(eps, mass)

    log_k = -cost / eps
    valid = None
    if row_mask is not None or col_mask is not None:
        rows = row_mask if row_mask is not None else torch.ones((*batch, n), dtype=torch.bool, device=device)
        cols = col_mask if col_mask is not None else torch.ones((*batch, m), dtype=torch.bool, device=device)
        valid = rows.unsqueeze(-1) & cols.unsqueeze(-2)
        log_k = log_k.masked_fill(~valid, -math.inf)
    log_mu = _log_marginal(row_mask, (*batch, n), n, dtype, device)
    log_nu = _log_marginal(col_mask, (*batch, m), m, dtype, device)

    log_u = torch.zeros((*batch, n), dtype=dtype, device=device)
    log_v = torch.zeros((*batch, m), dtype=dtype, device=device)
    done = torch.zeros(tuple(batch), dtype=torch.bool, device=device)
    n_iter = torch.zeros(tuple(batch), dtype=torch.int32, device=device)

    def masked_update(new, mask):
        # Padding potentials stay 0: their kernel entries are -inf, so they never carry mass.
        return new if mask is None else torch.where(mask, new, torch.zeros((), dtype=dtype, device=device))

    for it in range(max_iter):
        log_kv = torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
        log_u_new = masked_update(tau * (log_mu - log_kv), row_mask)
        log_ktu = torch.logsumexp(log_k + log_u_new.unsqueeze(-1), dim=-2)
        log_v_new = masked_update(tau * (log_nu - log_ktu), col_mask)

        if tol > 0:
            delta = torch.maximum(
                (log_u_new - log_u).abs().amax(dim=-1), (log_v_new - log_v).abs().amax(dim=-1)
            )
            done = done | (delta < tol)
        accept = ~done
        log_u = torch.where(accept.unsqueeze(-1), log_u_new, log_u)
        log_v = torch.where(accept.unsqueeze(-1), log_v_new, log_v)
        n_iter = n_iter + accept.to(torch.int32)
        if (tol > 0 and (it + 1) % CONVERGENCE_CHECK_EVERY == 0 and not torch.compiler.is_compiling()
                and bool(done.all())):
            break

    plan = torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))
    if not return_potentials:
        return plan
    if row_mask is not None:
        log_u = log_u.masked_fill(~row_mask, -math.inf)
    if col_mask is not None:
        log_v = log_v.masked_fill(~col_mask, -math.inf)
    return plan, log_u, log_v, n_iter


def _range_normalize(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(x - min) / (max - min) over each problem's valid entries; a constant component gives 0."""
    flat = x.flatten(-2)
    if valid is None:
        lo = flat.amin(dim=-1)
        hi = flat.amax(dim=-1)
    else:
        vflat = valid.flatten(-2)
        lo = flat.masked_fill(~vflat, math.inf).amin(dim=-1)
        hi = flat.masked_fill(~vflat, -math.inf).amax(dim=-1)
    span = hi - lo
    scale = torch.clamp(torch.maximum(hi.abs(), lo.abs()), min=1.0)
    degenerate = span <= DEGENERATE_RANGE * scale
    span = torch.where(degenerate, torch.ones_like(span), span)
    out = (x - lo[..., None, None]) / span[..., None, None]
    out = torch.where(degenerate[..., None, None], torch.zeros_like(out), out)
    if valid is not None:
        out = out.masked_fill(~valid, 0.0)
    return out


def spatiotemporal_cost(
    q: torch.Tensor,
    k: torch.Tensor,
    attn: torch.Tensor,
    frame_idx: torch.Tensor,
    coords: torch.Tensor,
    *,
    gamma: float,
    eta: float,
    row_mask: Optional[torch.Tensor] = None,
    col_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """C = norm(norm(sem) + γ·norm(tem) + η·norm(spa)), each norm a min-max over valid entries.

    sem_ij = 1 - cos(q_i, k_j); tem_ij = |τ_i - t_j| with τ = A t; spa_ij = ‖π_i - s_j‖₂ with
    π = A s. Padding entries of the returned cost are 0 (the solver ignores them given the masks).
    """
    dtype = q.dtype
    t = frame_idx.to(dtype)
    s = coords.to(dtype)
    # F.normalize's clamp: a zero vector has cosine 0 with everything, not NaN.
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sem = 1.0 - qn @ kn.transpose(-1, -2)

    tau_i = attn @ t  # (..., N): expected frame index of each query under its attention
    tem = (tau_i.unsqueeze(-1) - t).abs()

    pi_i = attn @ s  # (..., N, 2): expected (row, col) of each query
    diff = pi_i.unsqueeze(-2) - s  # (..., N, M, 2)
    spa = torch.sqrt((diff * diff).sum(dim=-1))

    valid = None
    if row_mask is not None or col_mask is not None:
        *batch, n, m = sem.shape
        rows = row_mask if row_mask is not None else torch.ones((*batch, n), dtype=torch.bool, device=q.device)
        cols = col_mask if col_mask is not None else torch.ones((*batch, m), dtype=torch.bool, device=q.device)
        valid = rows.unsqueeze(-1) & cols.unsqueeze(-2)

    total = _range_normalize(sem, valid) + gamma * _range_normalize(tem, valid) + eta * _range_normalize(spa, valid)
    return _range_normalize(total, valid)


def fuse_attention(
    attn: torch.Tensor, plan: torch.Tensor, *, eps: float, col_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Eq. 3: Ã ∝ exp(log(A + ε) + log(P + ε)) = (A + ε)(P + ε), row-normalized.

    The product form is the same number as the log-space form without a log/exp round trip.
    Padding columns get exactly 0 so they receive no attention.
    """
    fused = (attn + eps) * (plan + eps)
    if col_mask is not None:
        fused = fused.masked_fill(~col_mask.unsqueeze(-2), 0.0)
    return fused / fused.sum(dim=-1, keepdim=True)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """A = softmax(q kᵀ · scale) over the real keys."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    return torch.softmax(scores, dim=-1)


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
    """Cross-attention with the partial-OT plan fused in: returns ``(out, plan)``.

    q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); masks (B, N) / (B, M), True = real.
    ``domain`` / ``kernel_dtype`` are ignored (see :func:`sinkhorn_unbalanced`); ``plan`` is None
    with ``return_plan=False``.
    Gradients reach q, k, v through A only: the cost and the plan are computed from detached
    inputs (the plan is a structural prior, Appendix C). Padded query rows output 0.
    """
    b, h, n, _ = q.shape
    m = k.shape[-2]
    attn = attention_probs(q, k, scale, key_padding_mask)
    row_mask = query_padding_mask[:, None, :].expand(b, h, n) if query_padding_mask is not None else None
    col_mask = key_padding_mask[:, None, :].expand(b, h, m) if key_padding_mask is not None else None
    with torch.no_grad():
        cost = spatiotemporal_cost(
            q.detach(), k.detach(), attn.detach(), frame_idx, coords,
            gamma=gamma, eta=eta, row_mask=row_mask, col_mask=col_mask,
        )
        plan = sinkhorn_unbalanced(
            cost, eps=eps, mass=mass, max_iter=max_iter, tol=tol, row_mask=row_mask, col_mask=col_mask
        )
    fused = fuse_attention(attn, plan, eps=fuse_eps, col_mask=col_mask)
    out = fused @ v
    if row_mask is not None:
        out = out.masked_fill(~row_mask.unsqueeze(-1), 0.0)
    return out, (plan if return_plan else None)
