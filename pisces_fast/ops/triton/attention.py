"""Fused OT-attention forward and backward in Triton (PISCES Appendix C, Eq. 3).

A problem is one (batch, head): N text-token queries against M video-token keys. The forward is
four launches (never one per Sinkhorn iteration):

  1. stats  (grid: problem x row block) — scores -> online softmax statistics (lse) and, in the same
     sweep, τ = A t, π = A s and the range of the semantic term 1 - cos(q_i, k_j); a second, dot-free
     sweep gives the ranges of |τ_i - t_j| and ‖π_i - s_j‖. Ranges are per-row-block partials.
  2. cost   (problem x row block) — the range-normalized weighted sum sem' + γ tem' + η spa'
     (recomputed from the scores), written once to an aligned N x M scratch, with its partial range.
  3. solve  (one program per problem) — the final normalization turns the scratch in place into the
     Sinkhorn operand (K' = exp(-C/ε) in the scaling domain, C itself in the log domain), then the
     solve of :mod:`.sinkhorn` (one sweep per iteration, per-problem early stop) gives log u, log v.
  4. fuse   (problem x row block) — scores -> A (from lse), the cost recomputed from the scores and
     the saved ranges, P = exp(log u + log K + log v), Ã ∝ (A + ε)(P + ε), out = Ã v, and the two row
     sums the backward needs (X = Σ (P+ε), Y = Σ (P+ε) v). The plan is written only when asked for.

Global memory beyond q, k, v and out: the N x M scratch (the Sinkhorn's operand, which every
iteration re-reads: recomputing it would cost a D-long dot product per entry per iteration) and the
optional plan; the rest is O(N + M) per problem. A, the three components and Ã never leave the chip.

Backward (FlashAttention-2 style, deterministic, no atomics): a dq kernel (problem x row block,
looping over key blocks) and a dk/dv kernel (problem x key block, looping over row blocks) both
recompute A from lse, the cost from the scores and the saved τ, π and ranges, and P from the saved
potentials. With D_i = dout_i·out_i and E_i = Σ_l A_il dA_il:

  dÃ = dout vᵀ,   dA = (P + ε)/Z ⊙ (dÃ - D),   dS = A ⊙ (dA - E),
  dv = Ãᵀ dout,   dk = scale · dSᵀ q,   dq = scale · dS k.

Since A (P+ε) = (A+ε)(P+ε) - ε(P+ε) and Σ_l Ã_il (dÃ_il - D_i) = 0, the softmax-backward row term is
E_i = -ε (dout_i·Y_i - D_i X_i) / Z_i with X = Σ_l (P+ε), Y = Σ_l (P+ε) v_l: computed this way it has
no cancellation (the direct Σ A dA subtracts two O(1) numbers to get an O(ε) one).
P is a detached prior (no gradient through the cost or the Sinkhorn), as in the reference.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import DEGENERATE_RANGE, unbalanced_exponent
from ._launch import (
    check_problem_size,
    device_constants,
    launch_device,
    next_pow2,
    persistent_launch_options,
    solve_programs,
)
from ._reduce import MAX, MIN, SUM
from .sinkhorn import (
    LOG_CEIL_FP32,
    LOG_CEIL_FP64,
    NEG,
    P_INV_EPS,
    P_TAU,
    P_TOL,
    _solve,
    scaling_domain_ok,
    scaling_shift,
    fast_log,
    operand_stride,
    sinkhorn_blocks,
    solver_param_values,
)

# Params slots after the solver's (see sinkhorn.P_*).
P_SCALE = tl.constexpr(4)
P_GAMMA = tl.constexpr(5)
P_ETA = tl.constexpr(6)
P_FUSE_EPS = tl.constexpr(7)

# Rows of the per-row statistics saved for the backward: (P, ROW_STATS, N).
R_LSE, R_TAU, R_PI0, R_PI1, R_LOGU, R_Z, R_X = (tl.constexpr(i) for i in range(7))
ROW_STATS = tl.constexpr(7)
# Per-problem ranges: (lo, span) of sem, tem, spa and of their weighted sum; span = inf encodes a
# degenerate (constant) component, which then contributes exactly 0 like in the reference.
N_RANGES = tl.constexpr(8)
# Per-row-block partial ranges: (lo, hi) of sem, tem, spa, total.
N_PARTIALS = tl.constexpr(8)

DEGENERATE = tl.constexpr(DEGENERATE_RANGE)
TINY_NORM = tl.constexpr(1e-12)  # F.normalize's clamp, as in the reference
INF = tl.constexpr(float("inf"))

# Text-token queries per problem: the solve holds all of them in one tile (see sinkhorn.py).
MAX_QUERIES = 1024
# Head dims up to 128 (ModelScope/CogVideoX 64, Wan/HunyuanVideo 128): at 256 the fuse and backward
# kernels spilled 200-900 B per thread on sm_90a with every tile shape tried (compile_report).
MAX_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _span(lo, hi):
    """The reference's range rule: a component whose range is below DEGENERATE x its magnitude is
    constant up to rounding; an infinite span makes (x - lo) / span exactly 0 for it."""
    span = hi - lo
    mag = tl.maximum(tl.maximum(tl.abs(hi), tl.abs(lo)), 1.0)
    return tl.where(span <= DEGENERATE * mag, INF, span)


@triton.jit
def _combined_span(PART, n_blocks, slot, BRB: tl.constexpr):
    """(lo, span) of one component from the per-row-block partial (lo, hi) pairs."""
    offs = tl.arange(0, BRB)
    ok = offs < n_blocks
    lo = tl.reduce(tl.load(PART + offs * N_PARTIALS + slot, mask=ok, other=INF), 0, MIN)
    hi = tl.reduce(tl.load(PART + offs * N_PARTIALS + slot + 1, mask=ok, other=-INF), 0, MAX)
    return lo, _span(lo, hi)


@triton.jit
def _components(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, IS_FP64: tl.constexpr):
    """sem = 1 - cos(q_i, k_j) from the raw score, tem = |τ_i - t_j|, spa = ‖π_i - s_j‖₂."""
    sem = 1.0 - s_raw * inv_nq[:, None] * inv_nk[None, :]
    tem = tl.abs(tau_i[:, None] - t[None, :])
    d0 = pi0[:, None] - s0[None, :]
    d1 = pi1[:, None] - s1[None, :]
    if IS_FP64:
        spa = tl.sqrt(d0 * d0 + d1 * d1)
    else:
        spa = tl.sqrt_rn(d0 * d0 + d1 * d1)
    return sem, tem, spa


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, IS_FP64: tl.constexpr):
    """``a @ b``. float64 as an explicit broadcast-multiply-reduce (float64 products and sums): Triton 3.6, the
    one torch 2.11 ships, fails to lower float64 ``tl.dot`` in the backward kernels and every accumulating one
    on sm_80 / sm_90 (ConvertTritonGPUToLLVM), and float64 is a verification path here, not a fast one."""
    if IS_FP64:
        return tl.reduce(a[:, :, None] * b[None, :, :], 1, SUM)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, IS_FP64: tl.constexpr):
    """``acc + a @ b`` (see ``_dot``)."""
    if IS_FP64:
        return acc + _dot(a, b, DOT_PRECISION, IS_FP64)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cost_from_scores(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, RG, gamma, eta, IS_FP64: tl.constexpr):
    """The normalized cost C in [0, 1] of a tile, from the raw scores and the saved ranges."""
    sem, tem, spa = _components(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, IS_FP64)
    total = ((sem - tl.load(RG + 0)) / tl.load(RG + 1)
             + gamma * ((tem - tl.load(RG + 2)) / tl.load(RG + 3))
             + eta * ((spa - tl.load(RG + 4)) / tl.load(RG + 5)))
    return (total - tl.load(RG + 6)) / tl.load(RG + 7)


# ------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_stats_kernel(
    Q, K, T, S, KPM, QPM, ROWST, PART, PARAMS,
    H, N, M, D, n_blocks,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Softmax statistics, τ, π and the partial ranges of the three components for one row block."""
    pid = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    bid = pid // H
    DT: tl.constexpr = Q.dtype.element_ty
    IS_FP64: tl.constexpr = DT == tl.float64
    k_ptr = K + pid * M * D
    kpm = KPM + bid * M
    rowst = ROWST + pid * ROW_STATS * N
    part = PART + (pid * n_blocks + rb) * N_PARTIALS
    scale = tl.load(PARAMS + P_SCALE)

    offs_n = rb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    in_n = offs_n < N
    in_d = offs_d < D
    if HAS_QPM:
        rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
    else:
        rv = in_n
    q = tl.load(Q + pid * N * D + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None] & in_d[None, :],
                other=0.0)
    inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.reduce(q * q, 1, SUM)), TINY_NORM)

    # Online softmax; τ = A t and π = A s accumulate like an attention output; the semantic range
    # needs only the scores, so it comes from the same sweep.
    m_i = tl.full((BN,), NEG, DT)
    l_i = tl.full((BN,), 0.0, DT)
    t_acc = tl.full((BN,), 0.0, DT)
    p0_acc = tl.full((BN,), 0.0, DT)
    p1_acc = tl.full((BN,), 0.0, DT)
    lo_s = tl.full((), INF, DT)
    hi_s = tl.full((), -INF, DT)
    for j0 in range(0, M, BM):
        offs_m = j0 + tl.arange(0, BM)
        in_m = offs_m < M
        if HAS_KPM:
            cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
        else:
            cv = in_m
        kt = tl.load(k_ptr + offs_m[None, :] * D + offs_d[:, None], mask=in_m[None, :] & in_d[:, None], other=0.0)
        s_raw = _dot(q, kt, DOT_PRECISION, IS_FP64)
        s = tl.where(cv[None, :], s_raw * scale, NEG)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(cv[None, :], tl.exp(s - m_new[:, None]), 0.0)
        t = tl.load(T + offs_m, mask=in_m, other=0.0)
        s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
        s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        t_acc = t_acc * alpha + tl.reduce(p * t[None, :], 1, SUM)
        p0_acc = p0_acc * alpha + tl.reduce(p * s0[None, :], 1, SUM)
        p1_acc = p1_acc * alpha + tl.reduce(p * s1[None, :], 1, SUM)
        m_i = m_new
        inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.reduce(kt * kt, 0, SUM)), TINY_NORM)
        sem = 1.0 - s_raw * inv_nq[:, None] * inv_nk[None, :]
        valid = rv[:, None] & cv[None, :]
        lo_s = tl.minimum(lo_s, tl.reduce(tl.where(valid, sem, INF), None, MIN))
        hi_s = tl.maximum(hi_s, tl.reduce(tl.where(valid, sem, -INF), None, MAX))
    tau_i = t_acc / l_i
    pi0 = p0_acc / l_i
    pi1 = p1_acc / l_i

    # Ranges of |τ_i - t_j| and ‖π_i - s_j‖: positions only, no dot products.
    lo_t = tl.full((), INF, DT)
    hi_t = tl.full((), -INF, DT)
    lo_p = tl.full((), INF, DT)
    hi_p = tl.full((), -INF, DT)
    for j0 in range(0, M, BM):
        offs_m = j0 + tl.arange(0, BM)
        in_m = offs_m < M
        if HAS_KPM:
            cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
        else:
            cv = in_m
        valid = rv[:, None] & cv[None, :]
        t = tl.load(T + offs_m, mask=in_m, other=0.0)
        s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
        s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
        tem = tl.abs(tau_i[:, None] - t[None, :])
        d0 = pi0[:, None] - s0[None, :]
        d1 = pi1[:, None] - s1[None, :]
        if IS_FP64:
            spa = tl.sqrt(d0 * d0 + d1 * d1)
        else:
            spa = tl.sqrt_rn(d0 * d0 + d1 * d1)
        lo_t = tl.minimum(lo_t, tl.reduce(tl.where(valid, tem, INF), None, MIN))
        hi_t = tl.maximum(hi_t, tl.reduce(tl.where(valid, tem, -INF), None, MAX))
        lo_p = tl.minimum(lo_p, tl.reduce(tl.where(valid, spa, INF), None, MIN))
        hi_p = tl.maximum(hi_p, tl.reduce(tl.where(valid, spa, -INF), None, MAX))

    tl.store(rowst + R_LSE * N + offs_n, m_i + tl.log(l_i), mask=in_n)
    tl.store(rowst + R_TAU * N + offs_n, tau_i, mask=in_n)
    tl.store(rowst + R_PI0 * N + offs_n, pi0, mask=in_n)
    tl.store(rowst + R_PI1 * N + offs_n, pi1, mask=in_n)
    tl.store(part + 0, lo_s)
    tl.store(part + 1, hi_s)
    tl.store(part + 2, lo_t)
    tl.store(part + 3, hi_t)
    tl.store(part + 4, lo_p)
    tl.store(part + 5, hi_p)


@triton.jit
def _attn_cost_kernel(
    Q, K, T, S, KPM, QPM, ROWST, PART, SCRATCH, PARAMS,
    H, N, M, MS, D, n_blocks,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BRB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """sem' + γ tem' + η spa' (each range-normalized) for one row block -> scratch, and its range."""
    pid = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    bid = pid // H
    DT: tl.constexpr = Q.dtype.element_ty
    IS_FP64: tl.constexpr = DT == tl.float64
    k_ptr = K + pid * M * D
    kpm = KPM + bid * M
    rowst = ROWST + pid * ROW_STATS * N
    parts = PART + pid * n_blocks * N_PARTIALS
    ks = SCRATCH + pid * N * MS
    gamma = tl.load(PARAMS + P_GAMMA)
    eta = tl.load(PARAMS + P_ETA)
    lo_s, sp_s = _combined_span(parts, n_blocks, 0, BRB)
    lo_t, sp_t = _combined_span(parts, n_blocks, 2, BRB)
    lo_p, sp_p = _combined_span(parts, n_blocks, 4, BRB)

    offs_n = rb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    in_n = offs_n < N
    in_d = offs_d < D
    if HAS_QPM:
        rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
    else:
        rv = in_n
    q = tl.load(Q + pid * N * D + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None] & in_d[None, :],
                other=0.0)
    inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.reduce(q * q, 1, SUM)), TINY_NORM)
    tau_i = tl.load(rowst + R_TAU * N + offs_n, mask=in_n, other=0.0)
    pi0 = tl.load(rowst + R_PI0 * N + offs_n, mask=in_n, other=0.0)
    pi1 = tl.load(rowst + R_PI1 * N + offs_n, mask=in_n, other=0.0)

    lo_c = tl.full((), INF, DT)
    hi_c = tl.full((), -INF, DT)
    for j0 in range(0, M, BM):
        offs_m = j0 + tl.arange(0, BM)
        in_m = offs_m < M
        if HAS_KPM:
            cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
        else:
            cv = in_m
        valid = rv[:, None] & cv[None, :]
        kt = tl.load(k_ptr + offs_m[None, :] * D + offs_d[:, None], mask=in_m[None, :] & in_d[:, None], other=0.0)
        s_raw = _dot(q, kt, DOT_PRECISION, IS_FP64)
        inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.reduce(kt * kt, 0, SUM)), TINY_NORM)
        t = tl.load(T + offs_m, mask=in_m, other=0.0)
        s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
        s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
        sem, tem, spa = _components(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, IS_FP64)
        total = (sem - lo_s) / sp_s + gamma * ((tem - lo_t) / sp_t) + eta * ((spa - lo_p) / sp_p)
        tl.store(ks + offs_n[:, None] * MS + offs_m[None, :], total, mask=in_n[:, None] & in_m[None, :])
        lo_c = tl.minimum(lo_c, tl.reduce(tl.where(valid, total, INF), None, MIN))
        hi_c = tl.maximum(hi_c, tl.reduce(tl.where(valid, total, -INF), None, MAX))
    part = parts + rb * N_PARTIALS
    tl.store(part + 6, lo_c)
    tl.store(part + 7, hi_c)


@triton.jit
def _attn_solve_kernel(
    SCRATCH, GBUF, ROWST, PART, RANGES, LOGV, KPM, QPM, PARAMS, COUNTER,
    P, H, N, M, MS, n_blocks, max_iter,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr, SCALING: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BRB: tl.constexpr, FAST_LOG: tl.constexpr,
):
    """Persistent: each program takes problems from an atomic counter; per problem the final
    normalization turns the scratch into the Sinkhorn operand in place, then Algorithm 3 runs."""
    slot = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = SCRATCH.dtype.element_ty
    g_buf = GBUF + slot * 2 * MS
    tau = tl.load(PARAMS + P_TAU)
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    tol = tl.load(PARAMS + P_TOL)
    offs_n = tl.arange(0, BN)
    in_n = offs_n < N

    prob = tl.atomic_add(COUNTER, 1)
    while prob < P:
        pid = prob.to(tl.int64)
        bid = pid // H
        ks = SCRATCH + pid * N * MS
        kpm = KPM + bid * M
        rowst = ROWST + pid * ROW_STATS * N
        parts = PART + pid * n_blocks * N_PARTIALS
        rg = RANGES + pid * N_RANGES

        # The problem's ranges, saved for the fuse kernel and the backward.
        for c in tl.static_range(4):
            lo, sp = _combined_span(parts, n_blocks, 2 * c, BRB)
            tl.store(rg + 2 * c, lo)
            tl.store(rg + 2 * c + 1, sp)
        lo_c, sp_c = _combined_span(parts, n_blocks, 6, BRB)

        if HAS_QPM:
            rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
        else:
            rv = in_n
        log_mu = -tl.log(tl.reduce(rv.to(DT), 0, SUM))

        # C = (total - lo) / span lies in [0, 1] with min exactly 0, so log K = -C/ε needs no shift.
        # The scratch is rewritten over the whole padded stride (the sweeps' loads are bounded by it).
        n_cols = tl.full((BM,), 0.0, DT)
        r_max = tl.full((BN,), NEG, DT)
        r_sum = tl.full((BN,), 0.0, DT)
        for j0 in range(0, MS, BM):
            offs_m = j0 + tl.arange(0, BM)
            in_m = offs_m < M
            if HAS_KPM:
                cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
            else:
                cv = in_m
            n_cols += cv.to(DT)
            valid = rv[:, None] & cv[None, :]
            ptrs = ks + offs_n[:, None] * MS + offs_m[None, :]
            in_ms = in_n[:, None] & (offs_m < MS)[None, :]
            cost = (tl.load(ptrs, mask=valid, other=0.0) - lo_c) / sp_c
            if SCALING:
                kern = tl.where(valid, tl.exp(-cost * inv_eps), 0.0)
                tl.store(ptrs, kern, mask=in_ms)
                r_sum += tl.reduce(kern, 1, SUM)
            else:
                lk = tl.where(valid, -cost * inv_eps, NEG)
                tl.store(ptrs, lk, mask=in_ms)
                m_new = tl.maximum(r_max, tl.reduce(lk, 1, MAX))
                r_sum = r_sum * tl.exp(r_max - m_new) + tl.reduce(tl.exp(lk - m_new[:, None]), 1, SUM)
                r_max = m_new
            tl.store(g_buf + offs_m, tl.full((BM,), 0.0, DT), mask=offs_m < MS)  # log v = 0
        if SCALING:
            row_lse = tl.log(r_sum)
        else:
            row_lse = r_max + tl.log(r_sum)
        n_valid_cols = tl.reduce(n_cols, 0, SUM)
        log_nu = -tl.log(n_valid_cols)
        if DT == tl.float64:
            log_ceil = LOG_CEIL_FP64
        else:
            log_ceil = LOG_CEIL_FP32
        # The exponent range of K = exp(-C/ε) with C in [0, 1] is at most 1/ε.
        shift = scaling_shift(inv_eps, tau, n_valid_cols, log_ceil)
        # The sweeps read scratch entries that other threads of this program converted.
        tl.debug_barrier()

        log_u, cur, _ = _solve(ks, g_buf, N, MS, offs_n, rv, log_mu, log_nu, row_lse, tau, 0.0, shift, tol,
                               max_iter, SCALING, BN, BM, DT, FAST_LOG)
        tl.store(rowst + R_LOGU * N + offs_n, log_u, mask=in_n)
        for j0 in range(0, M, BM):
            offs_m = j0 + tl.arange(0, BM)
            in_m = offs_m < M
            tl.store(LOGV + pid * M + offs_m, tl.load(g_buf + cur * MS + offs_m, mask=in_m, other=0.0), mask=in_m)
        # The next problem reuses this program's log v buffer.
        tl.debug_barrier()
        prob = tl.atomic_add(COUNTER, 1)


@triton.jit
def _attn_fuse_kernel(
    Q, K, V, T, S, KPM, QPM, OUT, PLAN, ROWST, LOGV, RANGES, YBUF, PARAMS,
    H, N, M, D, DV,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr, WRITE_PLAN: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One row block: A and P recomputed per tile, Ã = norm((A+ε)(P+ε)), out = Ã v, and X, Y."""
    pid = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    bid = pid // H
    DT: tl.constexpr = Q.dtype.element_ty
    IS_FP64: tl.constexpr = DT == tl.float64
    k_ptr = K + pid * M * D
    v_ptr = V + pid * M * DV
    kpm = KPM + bid * M
    rowst = ROWST + pid * ROW_STATS * N
    rg = RANGES + pid * N_RANGES
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    scale = tl.load(PARAMS + P_SCALE)
    gamma = tl.load(PARAMS + P_GAMMA)
    eta = tl.load(PARAMS + P_ETA)
    fuse_eps = tl.load(PARAMS + P_FUSE_EPS)

    offs_n = rb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_n = offs_n < N
    in_d = offs_d < D
    in_dv = offs_dv < DV
    if HAS_QPM:
        rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
    else:
        rv = in_n
    q = tl.load(Q + pid * N * D + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None] & in_d[None, :],
                other=0.0)
    inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.reduce(q * q, 1, SUM)), TINY_NORM)
    lse = tl.load(rowst + R_LSE * N + offs_n, mask=in_n, other=0.0)
    tau_i = tl.load(rowst + R_TAU * N + offs_n, mask=in_n, other=0.0)
    pi0 = tl.load(rowst + R_PI0 * N + offs_n, mask=in_n, other=0.0)
    pi1 = tl.load(rowst + R_PI1 * N + offs_n, mask=in_n, other=0.0)
    log_u = tl.load(rowst + R_LOGU * N + offs_n, mask=in_n, other=0.0)

    z_i = tl.full((BN,), 0.0, DT)
    x_i = tl.full((BN,), 0.0, DT)
    acc = tl.full((BN, BDV), 0.0, DT)
    y_acc = tl.full((BN, BDV), 0.0, DT)
    for j0 in range(0, M, BM):
        offs_m = j0 + tl.arange(0, BM)
        in_m = offs_m < M
        if HAS_KPM:
            cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
        else:
            cv = in_m
        valid = rv[:, None] & cv[None, :]
        kt = tl.load(k_ptr + offs_m[None, :] * D + offs_d[:, None], mask=in_m[None, :] & in_d[:, None], other=0.0)
        s_raw = _dot(q, kt, DOT_PRECISION, IS_FP64)
        a = tl.where(cv[None, :], tl.exp(s_raw * scale - lse[:, None]), 0.0)
        inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.reduce(kt * kt, 0, SUM)), TINY_NORM)
        t = tl.load(T + offs_m, mask=in_m, other=0.0)
        s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
        s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
        cost = _cost_from_scores(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, rg, gamma, eta, IS_FP64)
        log_v = tl.load(LOGV + pid * M + offs_m, mask=in_m, other=0.0)
        plan = tl.where(valid, tl.exp(log_u[:, None] + log_v[None, :] - cost * inv_eps), 0.0)
        if WRITE_PLAN:
            tl.store(PLAN + pid * N * M + offs_n[:, None] * M + offs_m[None, :], plan,
                     mask=in_n[:, None] & in_m[None, :])
        pe = tl.where(cv[None, :], plan + fuse_eps, 0.0)
        w = (a + fuse_eps) * pe
        vt = tl.load(v_ptr + offs_m[:, None] * DV + offs_dv[None, :], mask=in_m[:, None] & in_dv[None, :], other=0.0)
        z_i += tl.reduce(w, 1, SUM)
        x_i += tl.reduce(pe, 1, SUM)
        acc = _dot_acc(w, vt, acc, DOT_PRECISION, IS_FP64)
        y_acc = _dot_acc(pe, vt, y_acc, DOT_PRECISION, IS_FP64)

    out = tl.where(rv[:, None], acc / z_i[:, None], 0.0)
    o_off = pid * N * DV + offs_n[:, None] * DV + offs_dv[None, :]
    o_mask = in_n[:, None] & in_dv[None, :]
    tl.store(OUT + o_off, out, mask=o_mask)
    tl.store(YBUF + o_off, y_acc, mask=o_mask)
    tl.store(rowst + R_Z * N + offs_n, z_i, mask=in_n)
    tl.store(rowst + R_X * N + offs_n, x_i, mask=in_n)


# ------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, T, S, KPM, QPM, DOUT, OUT, ROWST, LOGV, RANGES, YBUF, DE, PARAMS, DQ,
    H, N, M, D, DV,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one row block (looping over key blocks); also writes the rows' D and E for dk/dv."""
    pid = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    bid = pid // H
    DT: tl.constexpr = Q.dtype.element_ty
    IS_FP64: tl.constexpr = DT == tl.float64
    kpm = KPM + bid * M
    rowst = ROWST + pid * ROW_STATS * N
    rg = RANGES + pid * N_RANGES
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    scale = tl.load(PARAMS + P_SCALE)
    gamma = tl.load(PARAMS + P_GAMMA)
    eta = tl.load(PARAMS + P_ETA)
    fuse_eps = tl.load(PARAMS + P_FUSE_EPS)

    offs_n = rb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_n = offs_n < N
    in_d = offs_d < D
    in_dv = offs_dv < DV
    if HAS_QPM:
        rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
    else:
        rv = in_n
    q = tl.load(Q + pid * N * D + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None] & in_d[None, :],
                other=0.0)
    inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.reduce(q * q, 1, SUM)), TINY_NORM)
    o_off = pid * N * DV + offs_n[:, None] * DV + offs_dv[None, :]
    # Padded query rows output a constant 0: no gradient flows back from them.
    o_mask = rv[:, None] & in_dv[None, :]
    dout = tl.load(DOUT + o_off, mask=o_mask, other=0.0)
    out = tl.load(OUT + o_off, mask=o_mask, other=0.0)
    y = tl.load(YBUF + o_off, mask=o_mask, other=0.0)
    lse = tl.load(rowst + R_LSE * N + offs_n, mask=in_n, other=0.0)
    tau_i = tl.load(rowst + R_TAU * N + offs_n, mask=in_n, other=0.0)
    pi0 = tl.load(rowst + R_PI0 * N + offs_n, mask=in_n, other=0.0)
    pi1 = tl.load(rowst + R_PI1 * N + offs_n, mask=in_n, other=0.0)
    log_u = tl.load(rowst + R_LOGU * N + offs_n, mask=in_n, other=0.0)
    inv_z = 1.0 / tl.load(rowst + R_Z * N + offs_n, mask=in_n, other=1.0)
    x_i = tl.load(rowst + R_X * N + offs_n, mask=in_n, other=0.0)
    # D_i = Σ_l Ã_il dÃ_il = dout_i · out_i;  E_i = Σ_l A_il dA_il = -ε (dout_i · Y_i - D_i X_i) / Z_i.
    d_i = tl.reduce(dout * out, 1, SUM)
    e_i = -fuse_eps * (tl.reduce(dout * y, 1, SUM) - d_i * x_i) * inv_z
    tl.store(DE + pid * 2 * N + offs_n, d_i, mask=in_n)
    tl.store(DE + pid * 2 * N + N + offs_n, e_i, mask=in_n)

    dq = tl.full((BN, BD), 0.0, DT)
    for j0 in range(0, M, BM):
        offs_m = j0 + tl.arange(0, BM)
        in_m = offs_m < M
        if HAS_KPM:
            cv = in_m & (tl.load(kpm + offs_m, mask=in_m, other=0) != 0)
        else:
            cv = in_m
        valid = rv[:, None] & cv[None, :]
        kb = tl.load(K + pid * M * D + offs_m[:, None] * D + offs_d[None, :], mask=in_m[:, None] & in_d[None, :],
                     other=0.0)
        vt = tl.load(V + pid * M * DV + offs_m[None, :] * DV + offs_dv[:, None], mask=in_m[None, :] & in_dv[:, None],
                     other=0.0)
        kt = tl.trans(kb)
        s_raw = _dot(q, kt, DOT_PRECISION, IS_FP64)
        a = tl.where(cv[None, :], tl.exp(s_raw * scale - lse[:, None]), 0.0)
        inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.reduce(kt * kt, 0, SUM)), TINY_NORM)
        t = tl.load(T + offs_m, mask=in_m, other=0.0)
        s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
        s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
        cost = _cost_from_scores(s_raw, inv_nq, inv_nk, tau_i, pi0, pi1, t, s0, s1, rg, gamma, eta, IS_FP64)
        log_v = tl.load(LOGV + pid * M + offs_m, mask=in_m, other=0.0)
        plan = tl.where(valid, tl.exp(log_u[:, None] + log_v[None, :] - cost * inv_eps), 0.0)
        pe = tl.where(cv[None, :], plan + fuse_eps, 0.0) * inv_z[:, None]
        d_fused = _dot(dout, vt, DOT_PRECISION, IS_FP64)
        d_s = a * (pe * (d_fused - d_i[:, None]) - e_i[:, None])
        dq = _dot_acc(d_s, kb, dq, DOT_PRECISION, IS_FP64)
    tl.store(DQ + pid * N * D + offs_n[:, None] * D + offs_d[None, :], dq * scale, mask=in_n[:, None] & in_d[None, :])


@triton.jit
def _cost_from_scores_t(s_raw_t, inv_nk, inv_nq, t, s0, s1, tau_i, pi0, pi1, RG, gamma, eta, IS_FP64: tl.constexpr):
    """:func:`_cost_from_scores` on a transposed tile (keys as rows, queries as columns)."""
    sem = 1.0 - s_raw_t * inv_nq[None, :] * inv_nk[:, None]
    tem = tl.abs(tau_i[None, :] - t[:, None])
    d0 = pi0[None, :] - s0[:, None]
    d1 = pi1[None, :] - s1[:, None]
    if IS_FP64:
        spa = tl.sqrt(d0 * d0 + d1 * d1)
    else:
        spa = tl.sqrt_rn(d0 * d0 + d1 * d1)
    total = ((sem - tl.load(RG + 0)) / tl.load(RG + 1)
             + gamma * ((tem - tl.load(RG + 2)) / tl.load(RG + 3))
             + eta * ((spa - tl.load(RG + 4)) / tl.load(RG + 5)))
    return (total - tl.load(RG + 6)) / tl.load(RG + 7)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, T, S, KPM, QPM, DOUT, ROWST, LOGV, RANGES, DE, PARAMS, DK, DVAL,
    H, N, M, D, DV,
    HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk and dv of one key block (looping over row blocks): one writer per block, no atomics.

    Tiles are transposed (keys x queries) so that the loop-invariant k and v blocks are the
    register operands of the dots and q, dout stream through shared memory; dk += dSᵀ q and
    dv += Ãᵀ dout then need no transposition.
    """
    pid = tl.program_id(0).to(tl.int64)
    kb_id = tl.program_id(1)
    bid = pid // H
    DT: tl.constexpr = Q.dtype.element_ty
    IS_FP64: tl.constexpr = DT == tl.float64
    rowst = ROWST + pid * ROW_STATS * N
    rg = RANGES + pid * N_RANGES
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    scale = tl.load(PARAMS + P_SCALE)
    gamma = tl.load(PARAMS + P_GAMMA)
    eta = tl.load(PARAMS + P_ETA)
    fuse_eps = tl.load(PARAMS + P_FUSE_EPS)

    offs_m = kb_id * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_m = offs_m < M
    in_d = offs_d < D
    in_dv = offs_dv < DV
    if HAS_KPM:
        cv = in_m & (tl.load(KPM + bid * M + offs_m, mask=in_m, other=0) != 0)
    else:
        cv = in_m
    kb = tl.load(K + pid * M * D + offs_m[:, None] * D + offs_d[None, :], mask=in_m[:, None] & in_d[None, :],
                 other=0.0)
    vb = tl.load(V + pid * M * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=in_m[:, None] & in_dv[None, :],
                 other=0.0)
    inv_nk = 1.0 / tl.maximum(tl.sqrt(tl.reduce(kb * kb, 1, SUM)), TINY_NORM)
    t = tl.load(T + offs_m, mask=in_m, other=0.0)
    s0 = tl.load(S + 2 * offs_m, mask=in_m, other=0.0)
    s1 = tl.load(S + 2 * offs_m + 1, mask=in_m, other=0.0)
    log_v = tl.load(LOGV + pid * M + offs_m, mask=in_m, other=0.0)

    dk = tl.full((BM, BD), 0.0, DT)
    dv = tl.full((BM, BDV), 0.0, DT)
    for i0 in range(0, N, BN):
        offs_n = i0 + tl.arange(0, BN)
        in_n = offs_n < N
        if HAS_QPM:
            rv = in_n & (tl.load(QPM + bid * N + offs_n, mask=in_n, other=0) != 0)
        else:
            rv = in_n
        valid_t = cv[:, None] & rv[None, :]
        q = tl.load(Q + pid * N * D + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None] & in_d[None, :],
                    other=0.0)
        inv_nq = 1.0 / tl.maximum(tl.sqrt(tl.reduce(q * q, 1, SUM)), TINY_NORM)
        dout = tl.load(DOUT + pid * N * DV + offs_n[:, None] * DV + offs_dv[None, :],
                       mask=rv[:, None] & in_dv[None, :], other=0.0)
        lse = tl.load(rowst + R_LSE * N + offs_n, mask=in_n, other=0.0)
        tau_i = tl.load(rowst + R_TAU * N + offs_n, mask=in_n, other=0.0)
        pi0 = tl.load(rowst + R_PI0 * N + offs_n, mask=in_n, other=0.0)
        pi1 = tl.load(rowst + R_PI1 * N + offs_n, mask=in_n, other=0.0)
        log_u = tl.load(rowst + R_LOGU * N + offs_n, mask=in_n, other=0.0)
        inv_z = 1.0 / tl.load(rowst + R_Z * N + offs_n, mask=in_n, other=1.0)
        d_i = tl.load(DE + pid * 2 * N + offs_n, mask=in_n, other=0.0)
        e_i = tl.load(DE + pid * 2 * N + N + offs_n, mask=in_n, other=0.0)

        s_raw_t = _dot(kb, tl.trans(q), DOT_PRECISION, IS_FP64)
        a_t = tl.where(cv[:, None], tl.exp(s_raw_t * scale - lse[None, :]), 0.0)
        cost_t = _cost_from_scores_t(s_raw_t, inv_nk, inv_nq, t, s0, s1, tau_i, pi0, pi1, rg, gamma, eta, IS_FP64)
        plan_t = tl.where(valid_t, tl.exp(log_u[None, :] + log_v[:, None] - cost_t * inv_eps), 0.0)
        pe_t = tl.where(cv[:, None], plan_t + fuse_eps, 0.0) * inv_z[None, :]
        d_fused_t = _dot(vb, tl.trans(dout), DOT_PRECISION, IS_FP64)
        d_s_t = a_t * (pe_t * (d_fused_t - d_i[None, :]) - e_i[None, :])
        dv = _dot_acc((a_t + fuse_eps) * pe_t, dout, dv, DOT_PRECISION, IS_FP64)
        dk = _dot_acc(d_s_t, q, dk, DOT_PRECISION, IS_FP64)
    tl.store(DK + pid * M * D + offs_m[:, None] * D + offs_d[None, :], dk * scale, mask=in_m[:, None] & in_d[None, :])
    tl.store(DVAL + pid * M * DV + offs_m[:, None] * DV + offs_dv[None, :], dv, mask=in_m[:, None] & in_dv[None, :])


# ------------------------------------------------------------------------------------------------
# Host side

# Tests force small blocks so that the row-block / key-block loops run more than once under the
# interpreter (which otherwise gets whole-problem tiles). {"rows": BN, "cols": BM, "stats_rows": the stats /
# cost kernels' BN} or None.
_BLOCK_OVERRIDE: Optional[dict] = None


@contextlib.contextmanager
def force_blocks(rows: int, cols: int, stats_rows: Optional[int] = None):
    """Use ``rows`` x ``cols`` tiles in the dot-product kernels, ``stats_rows`` (default ``rows``) rows in
    the stats and cost kernels (testing aid; powers of two >= 16)."""
    global _BLOCK_OVERRIDE
    previous, _BLOCK_OVERRIDE = _BLOCK_OVERRIDE, {"rows": rows, "cols": cols, "stats_rows": stats_rows or rows}
    try:
        yield
    finally:
        _BLOCK_OVERRIDE = previous


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 on tensor cores as 3xTF32 (~fp32 accuracy, error ~1e-6 of |q||k|) rather than plain TF32,
    # whose 1e-3 error would move the cost (and through exp(-C/ε) the plan) visibly.
    return "tf32x3" if (device.type == "cuda" and dtype == torch.float32) else "ieee"


def _blocks(n: int, m: int, d: int, dv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes and warps of the dot-product kernels.

    GPU choices: the fastest configuration timed on an H200 (benchmarks/triton_tuning.py, RESULTS.md "GPU")
    that ptxas compiles without spills for sm_80 and sm_90a (tests/test_triton_compile.py): fuse, dq and dk/dv
    on 32-row blocks (two at the paper's N = 40; 64-row blocks there, 13 % faster in total together with
    64-row stats / cost, spilled 60-272 B), stats and cost on 64-row blocks (``stats_bn``; their partials
    set the solve's row blocks), 8 warps; wider heads get shorter row blocks so the tf32x3 operand copies
    stay within registers and shared memory. float64 (a verification path: its products are
    broadcast-multiply-reduce, see ``_dot``) gets 16 x 16 tiles everywhere. The interpreter pays per op, so
    it gets whole-problem tiles.
    """
    bd, bdv = next_pow2(max(d, 16)), next_pow2(max(dv, 16))
    if _BLOCK_OVERRIDE is not None:
        bn, bm = _BLOCK_OVERRIDE["rows"], _BLOCK_OVERRIDE["cols"]
        return dict(bn=bn, stats_bn=_BLOCK_OVERRIDE["stats_rows"], bd=bd, bdv=bdv, stats=(bm, 4), cost=(bm, 4),
                    fuse=(bm, 4), dq=(bm, 4), dkdv=(bm, 4))
    if device.type != "cuda":
        bn = next_pow2(max(n, 16))
        bm = max(16, min(next_pow2(m), 16384 // bn))
        return dict(bn=bn, stats_bn=bn, bd=bd, bdv=bdv, stats=(bm, 4), cost=(bm, 4), fuse=(bm, 4), dq=(bm, 4),
                    dkdv=(bm, 4))
    wide = max(bd, bdv)
    cap = 32 if wide <= 64 else 16  # 128-wide heads at 32 rows spilled 220 B in dq (sm_90a)
    if dtype == torch.float64:
        cap = 16
    bn = min(next_pow2(max(n, 16)), cap)
    # 32-column tiles where heads are <= 64 wide (timed on an H200 at the paper's shape): fuse 5.16 -> 2.88 ms,
    # dq 4.79 -> 2.66, dk/dv 5.25 -> 3.80 from 16 to 32 columns, fwd+bwd 26.7 -> 20.8 ms. fuse and dk/dv
    # without software pipelining of their streamed loads (num_stages=1): pipelined, their extra buffers
    # spilled (fuse 16 B inside its loop, dk/dv 12-20 B on sm_90a, Triton 3.6 and 3.9) and ran 1-4 % slower.
    # dk/dv with 128-wide heads likewise (8-12 B on sm_80 otherwise).
    cols = 32 if (wide <= 64 and dtype != torch.float64) else 16
    unpipelined = {"num_stages": 1}
    # stats and cost (and so the solve's per-row-block partials): 64-row x 32-column tiles where heads are
    # <= 64 wide, one row block at the paper's N = 40 (at 64 columns they spilled ~400 B on sm_80).
    if cols == 32:
        stats_bn, stats_cols = min(next_pow2(max(n, 16)), 64), 32
    else:
        stats_bn, stats_cols = bn, (16 if dtype == torch.float64 else 64)
    return dict(bn=bn, stats_bn=stats_bn, bd=bd, bdv=bdv, stats=(stats_cols, 8), cost=(stats_cols, 8),
                fuse=(cols, 8), dq=(cols, 8), dkdv=(cols, 8), fuse_options=unpipelined if cols == 32 else {},
                dkdv_options=unpipelined)


def _as_u8(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _check_sizes(n: int, d: int, dv: int) -> None:
    check_problem_size("ot_attention", n, MAX_QUERIES)
    for name, size in (("D (head dim of q, k)", d), ("Dv (head dim of v)", dv)):
        if size > MAX_HEAD_DIM:
            raise ValueError(
                f"backend='triton' ot_attention supports head dims up to {MAX_HEAD_DIM}, got {name} = {size}"
            )


def forward_params(eps, mass, tol, scale, gamma, eta, fuse_eps, dtype, device) -> torch.Tensor:
    # One cached device tensor per parameter set (see _launch.device_constants): no upload per call.
    values = solver_param_values(eps, mass, tol, dtype) + [scale, gamma, eta, fuse_eps]
    return device_constants(values, dtype, device)


def solve_layout(n: int, m: int, dtype: torch.dtype, device: torch.device, scaling: bool):
    """(BN, BM, num_warps, padded row stride) of the fused solve: its blocks (``sinkhorn_blocks``) and the
    stride of the cost operand the cost kernel writes for it (a multiple of two tile widths: no column masks)."""
    bn, bm, warps = sinkhorn_blocks(n, m, dtype, device, scaling_only=scaling)
    return bn, bm, warps, operand_stride(m, bm)


def ot_attention_forward(
    q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
    gamma, eta, eps, mass, max_iter, tol, fuse_eps, scale, return_plan, domain=0,
):
    """Launch the fused forward (stats -> cost -> solve -> fuse).

    Returns (out, plan, row_stats, log_v, ranges, y): plan is ``(B, H, N, M)`` when ``return_plan``
    else an empty tensor; the rest is what the backward recomputes from. ``domain=1`` forces the
    log-domain solve (tests).
    """
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    _check_sizes(n, d, dv)
    dtype, device = q.dtype, q.device
    p = b * h
    # The normalized cost spans [0, 1], so the kernel's exponent range is at most 1/eps: the host knows
    # the domain, and a scaling-only launch gets the faster blocks (sinkhorn_blocks).
    scaling = domain != 1 and scaling_domain_ok(1.0 / eps, unbalanced_exponent(eps, mass), n, m, dtype)
    solve_bn, solve_bm, solve_warps, ms = solve_layout(n, m, dtype, device, scaling)
    cfg = _blocks(n, m, d, dv, dtype, device)
    bn, stats_bn = cfg["bn"], cfg["stats_bn"]
    n_blocks = triton.cdiv(n, stats_bn)  # the row blocks of stats / cost, whose partials the solve combines
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    frame_idx = frame_idx.to(dtype).contiguous()
    coords = coords.to(dtype).contiguous()
    out = torch.empty((b, h, n, dv), dtype=dtype, device=device)
    plan = torch.empty((b, h, n, m) if return_plan else (0,), dtype=dtype, device=device)
    scratch = torch.empty((p, n, ms), dtype=dtype, device=device)
    programs = solve_programs(p, device, solve_warps)
    g_buf = torch.empty((programs, 2, ms), dtype=dtype, device=device)
    counter = torch.zeros((1,), dtype=torch.int32, device=device)
    row_stats = torch.empty((p, ROW_STATS.value, n), dtype=dtype, device=device)
    partials = torch.empty((p, n_blocks, N_PARTIALS.value), dtype=dtype, device=device)
    ranges = torch.empty((p, N_RANGES.value), dtype=dtype, device=device)
    log_v = torch.empty((p, m), dtype=dtype, device=device)
    y = torch.empty((b, h, n, dv), dtype=dtype, device=device)
    params = forward_params(eps, mass, tol, scale, gamma, eta, fuse_eps, dtype, device)
    kpm, qpm = _as_u8(key_padding_mask), _as_u8(query_padding_mask)
    kpm_arg = kpm if kpm is not None else g_buf  # never dereferenced when HAS_KPM is False
    qpm_arg = qpm if qpm is not None else g_buf
    flags = dict(HAS_KPM=kpm is not None, HAS_QPM=qpm is not None)
    dot = dict(DOT_PRECISION=_dot_precision(dtype, device))
    brb = next_pow2(n_blocks)
    with launch_device(device):
        _attn_stats_kernel[(p, n_blocks)](
            q, k, frame_idx, coords, kpm_arg, qpm_arg, row_stats, partials, params,
            h, n, m, d, n_blocks,
            BN=stats_bn, BM=cfg["stats"][0], BD=cfg["bd"], num_warps=cfg["stats"][1], **flags, **dot,
        )
        _attn_cost_kernel[(p, n_blocks)](
            q, k, frame_idx, coords, kpm_arg, qpm_arg, row_stats, partials, scratch, params,
            h, n, m, ms, d, n_blocks,
            BN=stats_bn, BM=cfg["cost"][0], BD=cfg["bd"], BRB=brb, num_warps=cfg["cost"][1], **flags, **dot,
        )
        _attn_solve_kernel[(programs,)](
            scratch, g_buf, row_stats, partials, ranges, log_v, kpm_arg, qpm_arg, params, counter,
            p, h, n, m, ms, n_blocks, max_iter,
            SCALING=scaling, BN=solve_bn, BM=solve_bm, BRB=brb, FAST_LOG=fast_log(dtype, device),
            num_warps=solve_warps,
            **flags,
            **persistent_launch_options(device, solve_warps),
        )
        _attn_fuse_kernel[(p, triton.cdiv(n, bn))](
            q, k, v, frame_idx, coords, kpm_arg, qpm_arg, out, plan if return_plan else g_buf, row_stats, log_v,
            ranges, y, params,
            h, n, m, d, dv,
            WRITE_PLAN=bool(return_plan), BN=bn, BM=cfg["fuse"][0], BD=cfg["bd"], BDV=cfg["bdv"],
            num_warps=cfg["fuse"][1], **flags, **dot, **cfg.get("fuse_options", {}),
        )
    return out, plan, row_stats, log_v, ranges, y


def ot_attention_backward(
    dout, q, k, v, frame_idx, coords, key_padding_mask, query_padding_mask,
    out, row_stats, log_v, ranges, y, gamma, eta, eps, fuse_eps, scale,
):
    """Launch the fused backward (dq kernel, then dk/dv kernel); returns (dq, dk, dv)."""
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    dtype, device = q.dtype, q.device
    p = b * h
    cfg = _blocks(n, m, d, dv, dtype, device)
    bn = cfg["bn"]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(dtype).contiguous()
    frame_idx = frame_idx.to(dtype).contiguous()
    coords = coords.to(dtype).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dval = torch.empty_like(v)
    de = torch.empty((p, 2, n), dtype=dtype, device=device)
    # mass and tol do not enter the backward; the slots are filled for the shared layout.
    params = forward_params(eps, 0.5, 0.0, scale, gamma, eta, fuse_eps, dtype, device)
    kpm, qpm = _as_u8(key_padding_mask), _as_u8(query_padding_mask)
    kpm_arg = kpm if kpm is not None else de
    qpm_arg = qpm if qpm is not None else de
    flags = dict(HAS_KPM=kpm is not None, HAS_QPM=qpm is not None, DOT_PRECISION=_dot_precision(dtype, device))
    with launch_device(device):
        _attn_bwd_dq_kernel[(p, triton.cdiv(n, bn))](
            q, k, v, frame_idx, coords, kpm_arg, qpm_arg, dout, out.contiguous(), row_stats, log_v, ranges,
            y.contiguous(), de, params, dq,
            h, n, m, d, dv,
            BN=bn, BM=cfg["dq"][0], BD=cfg["bd"], BDV=cfg["bdv"], num_warps=cfg["dq"][1], **flags,
        )
        bm = cfg["dkdv"][0]
        _attn_bwd_dkdv_kernel[(p, triton.cdiv(m, bm))](
            q, k, v, frame_idx, coords, kpm_arg, qpm_arg, dout, row_stats, log_v, ranges, de, params, dk, dval,
            h, n, m, d, dv,
            BN=bn, BM=bm, BD=cfg["bd"], BDV=cfg["bdv"], num_warps=cfg["dkdv"][1], **flags,
            **cfg.get("dkdv_options", {}),
        )
    return dq, dk, dval
