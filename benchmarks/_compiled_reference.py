"""The reference computation under torch.compile, for the benchmarks' "reference-compiled" rows.

`torch.compile(reference.sinkhorn_unbalanced)` unrolls the Python loop: at 100 iterations inductor
emits and C++-compiles hundreds of kernels, which took well over 6 CPU-minutes on the 2-core
benchmark machine without finishing. What a user would compile instead is the iteration body, so
that is what runs here: the reference's own functions (attention_probs, spatiotemporal_cost,
fuse_attention) and its Sinkhorn update, each under torch.compile(dynamic=True), driven by the
same loop as the reference (no masks, tol = 0). The benchmarks check every output against the
eager reference.
"""
from __future__ import annotations

import math

import torch

from pisces_fast.ops import reference


@torch.compile(dynamic=True)
def _sinkhorn_step(log_k, log_u, log_v, log_mu, log_nu, tau: float):
    log_kv = torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
    log_u = tau * (log_mu - log_kv)
    log_ktu = torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
    log_v = tau * (log_nu - log_ktu)
    return log_u, log_v


def sinkhorn(cost: torch.Tensor, *, eps: float, mass: float, max_iter: int) -> torch.Tensor:
    """reference.sinkhorn_unbalanced(cost, eps=eps, mass=mass, max_iter=max_iter, tol=0), unmasked."""
    *batch, n, m = cost.shape
    tau = reference.unbalanced_exponent(eps, mass)
    log_k = -cost / eps
    log_mu = torch.full((*batch, n), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_nu = torch.full((*batch, m), -math.log(m), dtype=cost.dtype, device=cost.device)
    log_u = torch.zeros_like(log_mu)
    log_v = torch.zeros_like(log_nu)
    for _ in range(max_iter):
        log_u, log_v = _sinkhorn_step(log_k, log_u, log_v, log_mu, log_nu, tau)
    return torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))


_attention_probs = torch.compile(reference.attention_probs, dynamic=True)
_cost = torch.compile(reference.spatiotemporal_cost, dynamic=True)


@torch.compile(dynamic=True)
def _fuse_and_apply(attn, plan, v, fuse_eps: float):
    return reference.fuse_attention(attn, plan, eps=fuse_eps) @ v


def ot_attention(q, k, v, frame_idx, coords, *, gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=100,
                 fuse_eps=1e-8, scale=None):
    """reference.ot_attention(...)[0] (no masks, tol = 0), its pieces compiled."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    attn = _attention_probs(q, k, scale, None)
    with torch.no_grad():
        cost = _cost(q.detach(), k.detach(), attn.detach(), frame_idx, coords, gamma=gamma, eta=eta)
        plan = sinkhorn(cost, eps=eps, mass=mass, max_iter=max_iter)
    return _fuse_and_apply(attn, plan, v, fuse_eps)
