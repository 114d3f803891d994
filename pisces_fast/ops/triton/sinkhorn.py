"""Fused batched Sinkhorn (PISCES Algorithm 3) in Triton: each solve runs start to finish inside one program.

Design (traffic model in the package docstring):

* One program owns one problem at a time: all ``N`` rows of a column block sit in one tile, so the
  column log-sum-exp of a block is exact inside the tile and an iteration is **one sweep** over the
  problem: for each column block the block's new ``log v`` comes from the column sums with the
  current ``log u``, and the same tile (still in registers) immediately feeds the *next* iteration's
  row sums with an online (flash-style) running max. The operand is read once per iteration, not
  twice, and iterations never leave the program: no launch and no host sync per iteration, and a
  ``while`` loop gives each problem its own early stop.
* Persistent launch: one program per SM (no more than fit in L2 together, see
  ``_launch.solve_programs``) takes problems from an atomic counter, so the operands being iterated
  on stay in L2 and problems that stop early free their SM for the next one.
* Two numerically exact domains, chosen per problem from the cost's range ``T = (max C - min C)/ε``
  over the valid entries:

  - **scaling** (``T <= SCALING_MAX_EXPONENT``): the shifted kernel ``K' = exp(-(C - min C)/ε)``
    in ``[e^-T, 1]`` is precomputed once; the potentials stay in the log domain and every
    log-sum-exp becomes ``max + log(K' · exp(potential - max))``: a matrix-vector product with no
    exponential per entry (only ``N + M`` per iteration). Because the sum always contains the term
    of the largest potential times a kernel entry ``>= e^-T``, it never underflows, and terms lost to
    underflow are below ``e^-(87-T)`` relative (fp32) — the result is the log-domain answer.
  - **log** (larger ``T``, e.g. ε = 1e-3): the classical stabilized log-sum-exp, two exponentials per
    entry per iteration, on an aligned copy of the cost.

* Algorithm 3's stopping rule is reproduced exactly: the new potentials are computed; if
  ``max(|Δlog u|, |Δlog v|) < tol`` the problem stops *keeping the previous potentials*. ``log v``
  lives in a small ping-pong buffer (2 x M per program) so the previous one is still there.
* Padding rows/columns: potentials 0, kernel entries excluded (``-inf`` in the log domain, 0 in the
  scaling domain), so they carry exactly zero mass; marginals are uniform over the valid entries.

``_solve`` is shared with the fused ``ot_attention`` (see :mod:`.attention`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import unbalanced_exponent
from ._reduce import MAX, MIN, SUM
from ._launch import (
    check_problem_size,
    launch_device,
    next_pow2,
    padded_stride,
    persistent_launch_options,
    solve_programs,
)

# Largest kernel exponent range (max C - min C) / eps solved in the scaling domain. The shifted
# kernel then lies in [e^-T, 1]; every row/column sum is >= e^-T and individual terms underflow only
# below ~e^-87 (fp32) / e^-708 (fp64), so what underflow drops is < 2049 * e^-(87-60) ~ 4e-9
# relative in fp32. Above it the log domain runs (two exps per entry per iteration).
SCALING_MAX_EXPONENT_FP32 = 60.0
SCALING_MAX_EXPONENT_FP64 = 600.0

# A finite "minus infinity": keeps max/exp arithmetic NaN-free where a block is entirely padding
# (NEG - NEG = 0, never inf - inf); values computed for padding lanes (exp(NEG - NEG) = 1, or an
# overflow to inf) are always discarded by a tl.where, never multiplied into a sum.
NEG = tl.constexpr(-1.0e30)

# Parameter slots of the per-launch params tensor (kept in the work dtype: Triton would pass Python
# floats as fp32, which is not good enough for float64 problems).
P_TAU = tl.constexpr(0)
P_INV_EPS = tl.constexpr(1)
P_TOL = tl.constexpr(2)
P_SCALING_MAX = tl.constexpr(3)
N_SOLVER_PARAMS = 4

# Software-pipelining depth of the sweep's tile loads (global -> shared memory, asynchronously), so
# the next column block is in flight while the current one is reduced.
SWEEP_STAGES = tl.constexpr(2)

DOMAIN_AUTO = tl.constexpr(0)
DOMAIN_LOG = tl.constexpr(1)
DOMAIN_SCALING = tl.constexpr(2)  # only valid when every problem's range / eps <= the scaling max


@triton.jit
def _solve(KS, G, CM, M, MS, offs_n, rv, log_mu, log_nu, row_lse, tau, inv_eps, LK, tol, max_iter,
           SCALING: tl.constexpr, HAS_CM: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr):
    """Algorithm 3's loop for one problem; ``row_lse`` = LSE_j(log K_ij) (the row sums at log v = 0).

    ``KS`` (N x M, row stride MS) holds the shifted kernel K' (log K = log K' + LK) when SCALING,
    else the cost C (log K = -C/ε). ``G`` (2 x MS) must hold zeros in its first row. Returns
    (log u, cur, n_iter): the accepted ``log v`` is ``G[cur]``; n_iter counts accepted updates.
    Padding potentials are 0.

    Each iteration is one sweep over the column blocks: the block's candidate ``log v`` comes from
    its column sums with the candidate ``log u`` (``fn``), goes to ``G[1-cur]``, and the same tile
    feeds the next iteration's row sums with an online running max. (Written inline, with
    ``tl.reduce``: the Triton interpreter pays ~1 ms per device-function call.)
    """
    f = tl.full((BN,), 0.0, DT)
    fn = tl.where(rv, tau * (log_mu - row_lse), 0.0)
    cur = 0
    it = 0
    done = 0
    while (it < max_iter) & (done == 0):
        if SCALING:
            fmax = tl.reduce(tl.where(rv, fn, NEG), 0, MAX)
            wu = tl.where(rv, tl.exp(fn - fmax), 0.0)
        m_run = tl.full((BN,), NEG, DT)  # log domain: running row max of the next row log-sum-exp
        g_run = tl.full((), NEG, DT)  # scaling domain: running max of the new log v
        s_run = tl.full((BN,), 0.0, DT)
        dv = tl.full((), 0.0, DT)
        for j0 in tl.range(0, M, BM, num_stages=SWEEP_STAGES):
            offs_m = j0 + tl.arange(0, BM)
            in_m = offs_m < M
            if HAS_CM:
                cv = in_m & (tl.load(CM + offs_m, mask=in_m, other=0) != 0)
            else:
                cv = in_m
            valid = rv[:, None] & cv[None, :]
            tile = tl.load(KS + offs_n[:, None] * MS + offs_m[None, :], mask=valid, other=0.0)
            if SCALING:
                col = tl.reduce(tile * wu[:, None], 0, SUM)
                gn = tl.where(cv, tau * (log_nu - (LK + fmax + tl.log(col))), 0.0)
            else:
                lk = tl.where(valid, -tile * inv_eps, NEG)
                a = lk + fn[:, None]
                cmax = tl.reduce(a, 0, MAX)
                col = tl.reduce(tl.exp(a - cmax[None, :]), 0, SUM)
                gn = tl.where(cv, tau * (log_nu - (cmax + tl.log(col))), 0.0)
            go = tl.load(G + cur * MS + offs_m, mask=in_m, other=0.0)
            tl.store(G + (1 - cur) * MS + offs_m, gn, mask=in_m)
            dv = tl.maximum(dv, tl.reduce(tl.abs(gn - go), 0, MAX))
            if SCALING:
                g_new = tl.maximum(g_run, tl.reduce(tl.where(cv, gn, NEG), 0, MAX))
                wv = tl.where(cv, tl.exp(gn - g_new), 0.0)
                s_run = s_run * tl.exp(g_run - g_new) + tl.reduce(tile * wv[None, :], 1, SUM)
                g_run = g_new
            else:
                b = lk + gn[None, :]
                m_new = tl.maximum(m_run, tl.reduce(b, 1, MAX))
                s_run = s_run * tl.exp(m_run - m_new) + tl.reduce(tl.exp(b - m_new[:, None]), 1, SUM)
                m_run = m_new
        if SCALING:
            row_lse = LK + g_run + tl.log(s_run)
        else:
            row_lse = m_run + tl.log(s_run)
        delta = tl.maximum(dv, tl.reduce(tl.where(rv, tl.abs(fn - f), 0.0), 0, MAX))
        # Algorithm 3: converged -> stop and keep the previous potentials (tol = 0 never stops).
        stop = delta < tol
        f = tl.where(stop, f, fn)
        fn = tl.where(rv, tau * (log_mu - row_lse), 0.0)
        cur = tl.where(stop, cur, 1 - cur)
        it = tl.where(stop, it, it + 1)
        done = stop.to(tl.int32)
        # The next sweep reads G[cur], written by other threads of this program in this sweep.
        tl.debug_barrier()
    return f, cur, it


@triton.jit
def _sinkhorn_kernel(
    COST, PLAN, SCRATCH, GBUF, RM, CM, PARAMS, N_ITER, COUNTER,
    P, N, M, MS, max_iter,
    HAS_RM: tl.constexpr, HAS_CM: tl.constexpr, DOMAIN: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr,
):
    """Persistent solver: each program takes problems from an atomic counter until none is left.

    Per problem: range pre-pass, domain choice, the solve, the plan. The scratch (the aligned
    operand) and the log v ping-pong buffer belong to the program, so only as many operands as
    there are resident programs are live at a time — sized to stay in L2 across iterations.

    DOMAIN: DOMAIN_AUTO picks per problem from the cost range; DOMAIN_LOG / DOMAIN_SCALING force
    one path (tests exercise the log domain at moderate ε; the forced scaling variant is only for
    costs whose range is known to be small).
    """
    slot = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = COST.dtype.element_ty
    ks = SCRATCH + slot * N * MS
    g_buf = GBUF + slot * 2 * MS
    tau = tl.load(PARAMS + P_TAU)
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    tol = tl.load(PARAMS + P_TOL)
    scaling_max = tl.load(PARAMS + P_SCALING_MAX)
    offs_n = tl.arange(0, BN)
    in_n = offs_n < N

    prob = tl.atomic_add(COUNTER, 1)
    while prob < P:
        pid = prob.to(tl.int64)
        cost = COST + pid * N * M
        plan = PLAN + pid * N * M
        cm = CM + pid * M
        if HAS_RM:
            rv = in_n & (tl.load(RM + pid * N + offs_n, mask=in_n, other=0) != 0)
        else:
            rv = in_n
        log_mu = -tl.log(tl.reduce(rv.to(DT), 0, SUM))

        # Pre-pass: valid-column count (uniform column marginal), the cost's range over the valid
        # entries (which picks the domain), and log v = 0 in the first half of the ping-pong buffer.
        n_cols = tl.full((BM,), 0.0, DT)
        lo = tl.full((), float("inf"), DT)
        hi = tl.full((), -float("inf"), DT)
        for j0 in range(0, M, BM):
            offs_m = j0 + tl.arange(0, BM)
            in_m = offs_m < M
            if HAS_CM:
                cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
            else:
                cv = in_m
            n_cols += cv.to(DT)
            valid = rv[:, None] & cv[None, :]
            ct = tl.load(cost + offs_n[:, None] * M + offs_m[None, :], mask=valid, other=0.0)
            lo = tl.minimum(lo, tl.reduce(tl.where(valid, ct, float("inf")), None, MIN))
            hi = tl.maximum(hi, tl.reduce(tl.where(valid, ct, -float("inf")), None, MAX))
            tl.store(g_buf + offs_m, tl.full((BM,), 0.0, DT), mask=in_m)
        log_nu = -tl.log(tl.reduce(n_cols, 0, SUM))
        LK = -lo * inv_eps

        if DOMAIN == DOMAIN_LOG:
            use_scaling = False
        elif DOMAIN == DOMAIN_SCALING:
            use_scaling = True
        else:
            use_scaling = (hi - lo) * inv_eps <= scaling_max
        if use_scaling:
            # Shifted kernel K' = exp(-(C - min C)/eps) in [e^-T, 1] into the scratch (row stride MS,
            # a multiple of 16 elements, so the sweeps' loads vectorize), and the first row sums.
            r_sum = tl.full((BN,), 0.0, DT)
            for j0 in range(0, M, BM):
                offs_m = j0 + tl.arange(0, BM)
                in_m = offs_m < M
                if HAS_CM:
                    cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
                else:
                    cv = in_m
                valid = rv[:, None] & cv[None, :]
                ct = tl.load(cost + offs_n[:, None] * M + offs_m[None, :], mask=valid, other=0.0)
                kt = tl.where(valid, tl.exp((lo - ct) * inv_eps), 0.0)
                tl.store(ks + offs_n[:, None] * MS + offs_m[None, :], kt, mask=in_n[:, None] & in_m[None, :])
                r_sum += tl.reduce(kt, 1, SUM)
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks, g_buf, cm, M, MS, offs_n, rv, log_mu, log_nu, LK + tl.log(r_sum), tau,
                                    inv_eps, LK, tol, max_iter, True, HAS_CM, BN, BM, DT)
        else:
            m_run = tl.full((BN,), NEG, DT)
            s_run = tl.full((BN,), 0.0, DT)
            for j0 in range(0, M, BM):
                offs_m = j0 + tl.arange(0, BM)
                in_m = offs_m < M
                if HAS_CM:
                    cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
                else:
                    cv = in_m
                valid = rv[:, None] & cv[None, :]
                ct = tl.load(cost + offs_n[:, None] * M + offs_m[None, :], mask=valid, other=0.0)
                # An aligned copy of the cost: every sweep re-reads it.
                tl.store(ks + offs_n[:, None] * MS + offs_m[None, :], ct, mask=in_n[:, None] & in_m[None, :])
                lk = tl.where(valid, -ct * inv_eps, NEG)
                m_new = tl.maximum(m_run, tl.reduce(lk, 1, MAX))
                s_run = s_run * tl.exp(m_run - m_new) + tl.reduce(tl.exp(lk - m_new[:, None]), 1, SUM)
                m_run = m_new
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks, g_buf, cm, M, MS, offs_n, rv, log_mu, log_nu, m_run + tl.log(s_run), tau,
                                    inv_eps, LK, tol, max_iter, False, HAS_CM, BN, BM, DT)

        tl.store(N_ITER + pid, n_iter)
        # plan = exp(log u + log K + log v), as the reference writes it; padding exactly 0 (the
        # solve's last barrier made the final log v writes visible).
        for j0 in range(0, M, BM):
            offs_m = j0 + tl.arange(0, BM)
            in_m = offs_m < M
            if HAS_CM:
                cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
            else:
                cv = in_m
            valid = rv[:, None] & cv[None, :]
            ptrs = offs_n[:, None] * M + offs_m[None, :]
            ct = tl.load(cost + ptrs, mask=valid, other=0.0)
            g = tl.load(g_buf + cur * MS + offs_m, mask=in_m, other=0.0)
            p = tl.where(valid, tl.exp(f[:, None] + g[None, :] - ct * inv_eps), 0.0)
            tl.store(plan + ptrs, p, mask=in_n[:, None] & in_m[None, :])
        # The next problem reuses this program's scratch and log v buffer.
        tl.debug_barrier()
        prob = tl.atomic_add(COUNTER, 1)


def solver_params(eps: float, mass: float, tol: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The solver's scalars in the work dtype (see P_* slots)."""
    scaling_max = SCALING_MAX_EXPONENT_FP64 if dtype == torch.float64 else SCALING_MAX_EXPONENT_FP32
    vals = [0.0] * N_SOLVER_PARAMS
    vals[P_TAU] = unbalanced_exponent(eps, mass)
    vals[P_INV_EPS] = 1.0 / eps
    vals[P_TOL] = tol
    vals[P_SCALING_MAX] = scaling_max
    return torch.tensor(vals, dtype=dtype, device=device)


def sinkhorn_blocks(n: int, m: int, dtype: torch.dtype, device: torch.device):
    """(BN, BM, num_warps) for the Sinkhorn sweeps: all rows in one tile.

    On GPU a tile holds ~8K fp32 / 4K fp64 elements over 8 warps (32 / 16 per thread): the solvers
    are persistent with one program per SM (see ``solve_programs``), so a program may use the whole
    register file; at 64 x 128 fp32 (N = 40) that is ~190 registers without spills on sm_90a, and
    half the column blocks (hence half the cross-warp reductions and barriers) of 64 x 64. The
    interpreter pays per op, not per element, so it gets whole-problem tiles.
    """
    bn = next_pow2(max(n, 16))
    if device.type == "cuda":
        tile = 4096 if dtype == torch.float64 else 8192
    else:
        tile = 16384
    bm = max(16, min(next_pow2(m), tile // bn))
    return bn, bm, 8


def _as_u8(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def sinkhorn_forward(
    cost: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    col_mask: Optional[torch.Tensor],
    eps: float,
    mass: float,
    max_iter: int,
    tol: float,
    domain: int = 0,
    return_n_iter: bool = False,
):
    """Launch the fused solver on ``cost (P, N, M)``; returns the plan (same dtype), and with
    ``return_n_iter`` also the per-problem count of accepted updates (int32, like the reference's).

    ``domain``: 0 = per-problem choice (default), 1 = force the log domain (tests).
    """
    if domain not in (0, 1):
        raise ValueError(f"domain must be 0 (auto) or 1 (log), got {domain!r}")
    p, n, m = cost.shape
    check_problem_size("sinkhorn_unbalanced", n)
    cost = cost.contiguous()
    plan = torch.empty_like(cost)
    ms = padded_stride(m)
    programs = solve_programs(p, cost.device, (n + 2) * ms * cost.element_size())
    scratch = torch.empty((programs, n, ms), dtype=cost.dtype, device=cost.device)
    g_buf = torch.empty((programs, 2, ms), dtype=cost.dtype, device=cost.device)
    n_iter = torch.empty((p,), dtype=torch.int32, device=cost.device)
    counter = torch.zeros((1,), dtype=torch.int32, device=cost.device)
    params = solver_params(eps, mass, tol, cost.dtype, cost.device)
    rm, cm = _as_u8(row_mask), _as_u8(col_mask)
    bn, bm, num_warps = sinkhorn_blocks(n, m, cost.dtype, cost.device)
    with launch_device(cost.device):
        _sinkhorn_kernel[(programs,)](
            cost, plan, scratch, g_buf, rm if rm is not None else g_buf, cm if cm is not None else g_buf, params,
            n_iter, counter,
            p, n, m, ms, max_iter,
            HAS_RM=rm is not None, HAS_CM=cm is not None, DOMAIN=domain,
            BN=bn, BM=bm, num_warps=num_warps, **persistent_launch_options(cost.device),
        )
    return (plan, n_iter) if return_n_iter else plan
