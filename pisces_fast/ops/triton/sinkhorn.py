"""Fused batched Sinkhorn (PISCES Algorithm 3) in Triton: each solve runs start to finish inside one program.

Design (traffic model in the package docstring):

* One program owns one problem at a time: all ``N`` rows of a column block sit in one tile, so the
  column log-sum-exp of a block is exact inside the tile and an iteration is **one sweep** over the
  problem: for each column block the block's new ``log v`` comes from the column sums with the
  current ``log u``, and the same tile (still in registers) immediately feeds the *next* iteration's
  row sums, accumulated element-wise and reduced once per iteration (a shift known before the sweep
  in the scaling domain, an element-wise online log-sum-exp in the log domain; see ``_solve`` and
  docs/triton.md for the instruction counts). The operand is read once per iteration, not
  twice, and iterations never leave the program: no launch and no host sync per iteration, and a
  ``while`` loop gives each problem its own early stop.
* Persistent launch: one program per SM (no more than fit in L2 together, see
  ``_launch.solve_programs``) takes problems from an atomic counter, so the operands being iterated
  on stay in L2 and problems that stop early free their SM for the next one.
* Two numerically exact domains, chosen per problem from the cost's range ``T = (max C - min C)/ε``
  over the valid entries:

  - **scaling** (``T <= SCALING_MAX_EXPONENT`` and the ``SCALING_BUDGET`` condition): the shifted
    kernel ``K' = exp(-(C - min C)/ε)`` in ``[e^-T, 1]`` is precomputed once; the potentials stay in
    the log domain and every log-sum-exp becomes ``shift + log(K' · exp(potential - shift))``: a
    matrix-vector product with no exponential per entry (only ``N + M`` per iteration). The column
    sums contain the heaviest row's term (weight 1) times a kernel entry ``>= e^-T``; the row sums'
    shift is fixed from the bounds that implies, and the budget keeps what underflow drops below
    1e-8 relative (fp32) — the result is the log-domain answer.
  - **log** (larger ``T``, e.g. ε = 1e-3): the classical stabilized log-sum-exp, two exponentials per
    entry per iteration, on an aligned copy of the log-kernel ``-C/ε``.

* Algorithm 3's stopping rule is reproduced exactly: the new potentials are computed; if
  ``max(|Δlog u|, |Δlog v|) < tol`` the problem stops *keeping the previous potentials*. ``log v``
  lives in a small ping-pong buffer (2 x M per program) so the previous one is still there.
* Padding rows/columns: potentials 0, kernel entries excluded (``NEG`` in the log domain, 0 in the
  scaling domain), so they carry exactly zero mass; marginals are uniform over the valid entries.

``_solve`` is shared with the fused ``ot_attention`` (see :mod:`.attention`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..reference import unbalanced_exponent
from ._reduce import MAX, MIN, SUM
from ._launch import (
    check_problem_size,
    device_constants,
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
NEG_HALF = tl.constexpr(-5.0e29)  # below it a log-domain column max means "no valid entry"

# Scaling domain, fixed shift of the log v weights (see _solve): the weights exp(log v - c) are at most
# e^LOG_CEIL / (valid columns), so row sums stay below e^LOG_CEIL (float32 max ~ e^88.7, float64
# ~ e^709.8), and at least e^(LOG_CEIL - (1+τ)T - τ log N - log M). SCALING_BUDGET bounds
# (1+τ)T + τ log N + 2 log M so that this lower bound stays >= e^18 above the smallest normal
# number times M: what flushing/underflow drops is then < 1e-8 relative (float32) / 1e-16 (float64).
LOG_CEIL_FP32 = tl.constexpr(84.0)
LOG_CEIL_FP64 = tl.constexpr(700.0)
SCALING_BUDGET_FP32 = tl.constexpr(84.0 + 87.3 - 18.5)
SCALING_BUDGET_FP64 = tl.constexpr(700.0 + 708.3 - 37.0)

# Parameter slots of the per-launch params tensor (kept in the work dtype: Triton would pass Python
# floats as fp32, which is not good enough for float64 problems).
P_TAU = tl.constexpr(0)
P_INV_EPS = tl.constexpr(1)
P_TOL = tl.constexpr(2)
P_SCALING_MAX = tl.constexpr(3)
N_SOLVER_PARAMS = 4

DOMAIN_AUTO = tl.constexpr(0)
DOMAIN_LOG = tl.constexpr(1)
DOMAIN_SCALING = tl.constexpr(2)  # only valid when every problem's range / eps <= the scaling max


@triton.jit
def scaling_shift(T, tau, n_cols, log_ceil):
    """The constant s of the scaling domain's row-sum shift c = a0 + s (see _solve): the new log v
    exceeds a0 by at most τT, so weights exp(log v - c) <= e^(τT - s) = e^log_ceil / n_cols."""
    return tau * T + tl.log(n_cols) - log_ceil


@triton.jit
def _log(x, FAST_LOG: tl.constexpr):
    """ln x; with FAST_LOG (float32 on a GPU) the hardware's lg2.approx (one MUFU instruction instead
    of libdevice's ~25-instruction logf), absolute error < 2e-7: below the float32 rounding of the
    potentials it feeds (|log v| ~ 1-60, ulp >= 1.2e-7). The interpreter cannot run it."""
    if FAST_LOG:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def _sweep_tile(tile, offs_m, G, cur, MS, w, a0, c_v, log_nu, tau, dvv, acc, m2, SCALING: tl.constexpr,
                FAST_LOG: tl.constexpr):
    """One column block of the sweep (see _solve): its new log v from the column sums (the one
    cross-thread reduction per tile) into G[1-cur], |Δlog v| element-wise into ``dvv``, and the
    tile's contribution to the next row sums element-wise into ``acc`` (and ``m2``, the log
    domain's element-wise running max). ``w``: the row weights (scaling) or log u (log)."""
    if SCALING:
        col = tl.reduce(tile * w[:, None], 0, SUM)
        cv = col > 0.0
        gn = tl.where(cv, a0 - tau * _log(col, FAST_LOG), 0.0)
    else:
        a = tile + w[:, None]
        cmax = tl.reduce(a, 0, MAX)
        col = tl.reduce(tl.exp(a - cmax[None, :]), 0, SUM)
        cv = cmax > NEG_HALF
        gn = tl.where(cv, tau * (log_nu - (cmax + _log(col, FAST_LOG))), 0.0)
    go = tl.load(G + cur * MS + offs_m)
    tl.store(G + (1 - cur) * MS + offs_m, gn)
    dvv = tl.maximum(dvv, tl.abs(gn - go))
    if SCALING:
        acc += tile * tl.where(cv, tl.exp(gn - c_v), 0.0)[None, :]
    else:
        b = tile + gn[None, :]
        e = tl.exp(-tl.abs(b - m2))
        acc = tl.where(b > m2, acc * e + 1.0, acc + e)
        m2 = tl.maximum(m2, b)
    return dvv, acc, m2


@triton.jit
def _solve(KS, G, N, MS, offs_n, rv, log_mu, log_nu, row_lse, tau, LK, shift, tol, max_iter,
           SCALING: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, FAST_LOG: tl.constexpr):
    """Algorithm 3's loop for one problem; ``row_lse`` = LSE_j(log K_ij) (the row sums at log v = 0).

    ``KS`` (N x MS, row stride MS, a multiple of 2 * BM) holds the operand over the whole padded
    stride: the shifted kernel K' (log K = log K' + LK, 0 on padding) when SCALING, else
    log K = -C/ε itself (NEG on padding). Padding columns are recognised from the tile (a zero column
    sum / a NEG column max), so the sweep loads no masks and its tile loads are unmasked 16-byte loads. ``G`` (2 x MS) must hold zeros in its first row.
    ``shift`` (scaling domain) is the per-problem constant ``s`` of the row-sum shift (see
    ``scaling_shift``). Returns (log u, cur, n_iter): the accepted ``log v`` is ``G[cur]``; n_iter
    counts accepted updates. Padding potentials are 0.

    Per tile the sweep does one cross-thread reduction (the column sums, which the tile's new log v
    needs at once); the next iteration's row sums accumulate element-wise in a BN x BM register
    accumulator and are reduced once per iteration:

    * scaling: the column sums lie in [e^-T, N] (the largest-weight row has weight 1 and every valid
      kernel entry is >= e^-T), so the new log v = a0 - τ log(col) lies in [a0 - τ log N, a0 + τT]
      and a fixed shift c = a0 + s, known *before* the sweep, keeps every weight exp(log v - c) and
      every row sum inside the float range (no running max, no rescaling);
    * log: an element-wise online log-sum-exp (one exponential per entry), merged per row at the end.

    The next tile is loaded (into registers) before the current one is reduced: the loads of tile
    j+1 are in flight during the arithmetic of tile j, wrapping around to the next iteration's first
    tile. (``tl.reduce`` rather than ``tl.sum``: the Triton interpreter pays ~1 ms per device-function
    call; ``_sweep_tile`` costs two calls per pair of tiles.)
    """
    # Unmasked loads: padding rows re-read the last real row (their weights are 0 / NEG, so they add
    # nothing to the column sums, and their row sums are discarded), and MS is a multiple of 2 * BM.
    rows = (tl.minimum(offs_n, N - 1) * MS)[:, None]
    offs_b = tl.arange(0, BM)
    f = tl.full((BN,), 0.0, DT)
    fn = tl.where(rv, tau * (log_mu - row_lse), 0.0)
    cur = 0
    it = 0
    done = 0
    # Tiles are loaded one ahead, two per trip (t0 is loop-carried, t1 local), so no register copies.
    t0 = tl.load(KS + rows + offs_b[None, :])
    while (it < max_iter) & (done == 0):
        if SCALING:
            fmax = tl.reduce(tl.where(rv, fn, NEG), 0, MAX)
            w = tl.where(rv, tl.exp(fn - fmax), 0.0)  # the row weights of the column sums
            a0 = tau * (log_nu - LK - fmax)  # log v = a0 - τ log(col)
            c_v = a0 + shift  # the weights' fixed shift (see scaling_shift)
        else:
            w = tl.where(rv, fn, NEG)
            a0 = 0.0
            c_v = 0.0
        acc = tl.full((BN, BM), 0.0, DT)
        m2 = tl.full((BN, BM), NEG, DT)
        dvv = tl.full((BM,), 0.0, DT)
        for j0 in tl.range(0, MS, 2 * BM, num_stages=1):
            offs_1 = j0 + BM + offs_b
            t1 = tl.load(KS + rows + offs_1[None, :])
            dvv, acc, m2 = _sweep_tile(t0, j0 + offs_b, G, cur, MS, w, a0, c_v, log_nu, tau, dvv, acc, m2, SCALING, FAST_LOG)
            j2 = j0 + 2 * BM
            offs_2 = tl.where(j2 < MS, j2, 0) + offs_b  # wraps around to the next iteration's first tile
            t0 = tl.load(KS + rows + offs_2[None, :])
            dvv, acc, m2 = _sweep_tile(t1, offs_1, G, cur, MS, w, a0, c_v, log_nu, tau, dvv, acc, m2, SCALING, FAST_LOG)
        if SCALING:
            row_lse = LK + c_v + tl.log(tl.reduce(acc, 1, SUM))
        else:
            m_row = tl.reduce(m2, 1, MAX)
            row_lse = m_row + tl.log(tl.reduce(acc * tl.exp(m2 - m_row[:, None]), 1, SUM))
        dv = tl.reduce(dvv, 0, MAX)
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
    BN: tl.constexpr, BM: tl.constexpr, FAST_LOG: tl.constexpr,
):
    """Persistent solver: each program takes problems from an atomic counter until none is left.

    Per problem: range pre-pass, domain choice, the solve, the plan. The scratch (the aligned
    operand, written over the whole padded stride) and the log v ping-pong buffer belong to the
    program, so only as many operands as there are resident programs are live at a time.

    DOMAIN: DOMAIN_AUTO picks per problem from the cost range; DOMAIN_LOG / DOMAIN_SCALING force
    one path (tests exercise the log domain at moderate ε; the forced scaling variant is only for
    costs whose range is known to be small).
    """
    slot = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = COST.dtype.element_ty
    if DT == tl.float64:
        log_ceil = LOG_CEIL_FP64
        budget = SCALING_BUDGET_FP64
    else:
        log_ceil = LOG_CEIL_FP32
        budget = SCALING_BUDGET_FP32
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
        n_rows = tl.reduce(rv.to(DT), 0, SUM)
        log_mu = -tl.log(n_rows)

        # Pre-pass: valid-column count (uniform column marginal), the cost's range over the valid
        # entries (which picks the domain), and log v = 0 in the first half of the ping-pong buffer.
        n_cols = tl.full((BM,), 0.0, DT)
        lo = tl.full((), float("inf"), DT)
        hi = tl.full((), -float("inf"), DT)
        for j0 in range(0, MS, BM):
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
            tl.store(g_buf + offs_m, tl.full((BM,), 0.0, DT), mask=offs_m < MS)
        n_valid_cols = tl.reduce(n_cols, 0, SUM)
        log_nu = -tl.log(n_valid_cols)
        LK = -lo * inv_eps
        T = (hi - lo) * inv_eps
        shift = scaling_shift(T, tau, n_valid_cols, log_ceil)

        if DOMAIN == DOMAIN_LOG:
            use_scaling = False
        elif DOMAIN == DOMAIN_SCALING:
            use_scaling = True
        else:
            use_scaling = (T <= scaling_max) & ((1.0 + tau) * T + tau * tl.log(n_rows) + 2.0 * tl.log(n_valid_cols) <= budget)
        if use_scaling:
            # Shifted kernel K' = exp(-(C - min C)/eps) in [e^-T, 1] into the scratch (row stride MS,
            # a multiple of 16 elements, so the sweeps' loads vectorize), and the first row sums.
            r_sum = tl.full((BN,), 0.0, DT)
            for j0 in range(0, MS, BM):
                offs_m = j0 + tl.arange(0, BM)
                in_m = offs_m < M
                if HAS_CM:
                    cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
                else:
                    cv = in_m
                valid = rv[:, None] & cv[None, :]
                ct = tl.load(cost + offs_n[:, None] * M + offs_m[None, :], mask=valid, other=0.0)
                kt = tl.where(valid, tl.exp((lo - ct) * inv_eps), 0.0)
                tl.store(ks + offs_n[:, None] * MS + offs_m[None, :], kt, mask=in_n[:, None] & (offs_m < MS)[None, :])
                r_sum += tl.reduce(kt, 1, SUM)
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks, g_buf, N, MS, offs_n, rv, log_mu, log_nu, LK + tl.log(r_sum), tau,
                                    LK, shift, tol, max_iter, True, BN, BM, DT, FAST_LOG)
        else:
            m_run = tl.full((BN,), NEG, DT)
            s_run = tl.full((BN,), 0.0, DT)
            for j0 in range(0, MS, BM):
                offs_m = j0 + tl.arange(0, BM)
                in_m = offs_m < M
                if HAS_CM:
                    cv = in_m & (tl.load(cm + offs_m, mask=in_m, other=0) != 0)
                else:
                    cv = in_m
                valid = rv[:, None] & cv[None, :]
                ct = tl.load(cost + offs_n[:, None] * M + offs_m[None, :], mask=valid, other=0.0)
                lk = tl.where(valid, -ct * inv_eps, NEG)
                # An aligned copy of the log-kernel (NEG on padding): every sweep re-reads it.
                tl.store(ks + offs_n[:, None] * MS + offs_m[None, :], lk, mask=in_n[:, None] & (offs_m < MS)[None, :])
                m_new = tl.maximum(m_run, tl.reduce(lk, 1, MAX))
                s_run = s_run * tl.exp(m_run - m_new) + tl.reduce(tl.exp(lk - m_new[:, None]), 1, SUM)
                m_run = m_new
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks, g_buf, N, MS, offs_n, rv, log_mu, log_nu, m_run + tl.log(s_run), tau,
                                    LK, shift, tol, max_iter, False, BN, BM, DT, FAST_LOG)

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


def scaling_domain_ok(exponent_range: float, tau: float, n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether a problem of ``n`` x ``m`` valid entries whose kernel exponent range (max C - min C)/ε is
    ``exponent_range`` is solved exactly in the scaling domain (the kernels apply the same rule per
    problem): T <= SCALING_MAX_EXPONENT and (1+τ)T + τ log n + 2 log m <= SCALING_BUDGET."""
    fp64 = dtype == torch.float64
    t_max = SCALING_MAX_EXPONENT_FP64 if fp64 else SCALING_MAX_EXPONENT_FP32
    budget = (SCALING_BUDGET_FP64 if fp64 else SCALING_BUDGET_FP32).value
    t = exponent_range
    return t <= t_max and (1.0 + tau) * t + tau * math.log(max(n, 1)) + 2.0 * math.log(max(m, 1)) <= budget


def solver_params(eps: float, mass: float, tol: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The solver's scalars in the work dtype (see P_* slots), on ``device`` (cached: no per-call upload)."""
    return device_constants(solver_param_values(eps, mass, tol, dtype), dtype, device)


def solver_param_values(eps: float, mass: float, tol: float, dtype: torch.dtype) -> list:
    """The solver's scalars as Python floats, in P_* slot order."""
    scaling_max = SCALING_MAX_EXPONENT_FP64 if dtype == torch.float64 else SCALING_MAX_EXPONENT_FP32
    vals = [0.0] * N_SOLVER_PARAMS
    vals[P_TAU] = unbalanced_exponent(eps, mass)
    vals[P_INV_EPS] = 1.0 / eps
    vals[P_TOL] = tol
    vals[P_SCALING_MAX] = scaling_max
    return vals


def sinkhorn_blocks(n: int, m: int, dtype: torch.dtype, device: torch.device):
    """(BN, BM, num_warps) for the Sinkhorn sweeps: all rows in one tile.

    On GPU a tile holds 4K fp32 / 2K fp64 elements over 8 warps (16 registers per thread per tile):
    the sweep keeps two tiles in flight plus the element-wise row-sum accumulator (and, in the log
    domain, its running max), which at 64 x 64 (N = 40) is 174-225 registers without spills on
    sm_80 and sm_90a (persistent, one program per SM, so the whole register file is the
    program's; tests/test_triton_compile.py). The interpreter pays per op, not per element, so it
    gets whole-problem tiles.
    """
    bn = next_pow2(max(n, 16))
    if device.type == "cuda":
        tile = 2048 if dtype == torch.float64 else 4096
    else:
        tile = 16384
    # At least one 16-byte vector per row (4 fp32 / 2 fp64); many rows get narrow tiles.
    bm = max(16 // (8 if dtype == torch.float64 else 4), min(next_pow2(m), tile // bn))
    return bn, bm, 8


def fast_log(dtype: torch.dtype, device: torch.device) -> bool:
    """The sweeps' per-column logarithm in hardware approximation: float32 on a GPU (see ``_log``)."""
    return device.type == "cuda" and dtype == torch.float32


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
    bn, bm, num_warps = sinkhorn_blocks(n, m, cost.dtype, cost.device)
    ms = padded_stride(m, max(16, 2 * bm))
    programs = solve_programs(p, cost.device, (n + 2) * ms * cost.element_size())
    scratch = torch.empty((programs, n, ms), dtype=cost.dtype, device=cost.device)
    g_buf = torch.empty((programs, 2, ms), dtype=cost.dtype, device=cost.device)
    n_iter = torch.empty((p,), dtype=torch.int32, device=cost.device)
    counter = torch.zeros((1,), dtype=torch.int32, device=cost.device)
    params = solver_params(eps, mass, tol, cost.dtype, cost.device)
    rm, cm = _as_u8(row_mask), _as_u8(col_mask)
    with launch_device(cost.device):
        _sinkhorn_kernel[(programs,)](
            cost, plan, scratch, g_buf, rm if rm is not None else g_buf, cm if cm is not None else g_buf, params,
            n_iter, counter,
            p, n, m, ms, max_iter,
            HAS_RM=rm is not None, HAS_CM=cm is not None, DOMAIN=domain,
            BN=bn, BM=bm, FAST_LOG=fast_log(cost.dtype, cost.device), num_warps=num_warps, **persistent_launch_options(cost.device, num_warps),
        )
    return (plan, n_iter) if return_n_iter else plan
