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

# Kernel storage codes (as pisces_fast.ops.cpp.KERNEL_DTYPES / csrc KernelStorage): what STORAGE records.
KERNEL_NATIVE = tl.constexpr(1)
KERNEL_BF16 = tl.constexpr(2)
KERNEL_FP16 = tl.constexpr(3)
KERNEL_CODES = {"float32": 1, "bfloat16": 2, "float16": 3}
# float16 storage (as the cpp backend, docs/numerics.md "16-bit kernel storage"): K' in [e^-T, 1] times
# 65504 stays >= 2^-14, the smallest normal float16, iff T <= ln(65504 * 2^14) = 20.79.
FLOAT16_SCALE = tl.constexpr(65504.0)
LOG_FLOAT16_SCALE = tl.constexpr(11.089866488461016)  # ln 65504
FLOAT16_MAX_RANGE = tl.constexpr(20.79)
# kernel_dtype="auto" stores float16 only where the a-priori plan error bound is <= this.
KERNEL16_AUTO_PLAN_RTOL = 1e-2

# Two-pass launch of the standalone solver (see sinkhorn_forward): DEFER_LOG solves the scaling-domain
# problems and marks the others STORAGE_DEFERRED; ONLY_DEFERRED then solves exactly those, in the log
# domain, each pass compiled with only its own sweep (and so with its own blocks).
PASS_ALL = tl.constexpr(0)
PASS_DEFER_LOG = tl.constexpr(1)
PASS_ONLY_DEFERRED = tl.constexpr(2)
STORAGE_DEFERRED = tl.constexpr(-1)

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
def _load_tile(KS, rows, offs, RESIDENT: tl.constexpr, OFFSETS_LAST: tl.constexpr):
    """The sweep tile ``KS[rows + offs]``; RESIDENT: kept in the SM's L1 across sweeps: a plain global
    load (cached in L1 on sm_70+) with the ``L1::evict_last`` policy (ptxas refuses it together with an
    explicit ``.ca``). OFFSETS_LAST (the 16-bit kernels): the int32 offsets go onto the base pointer
    last; otherwise the compiler hoists a 64-bit pointer per tile row out of the persistent loop,
    which spilled 24 B on sm_80 there (two sweeps, each with its own hoisted pointers). The float32
    kernels keep the hoisted pointers: 3 % fewer instructions per sweep trip, and no spills."""
    if OFFSETS_LAST:
        ptrs = KS + (rows + offs[None, :])
    else:
        ptrs = KS + rows + offs[None, :]
    if RESIDENT:
        return tl.load(ptrs, eviction_policy="evict_last")
    else:
        return tl.load(ptrs)


@triton.jit
def _sweep_tile(tile, offs_m, G, cur, MS, w, a0, c_v, log_nu, tau, dvv, acc, m2, SCALING: tl.constexpr,
                FAST_LOG: tl.constexpr):
    """One column block of the sweep (see _solve): its new log v from the column sums (the one
    cross-thread reduction per tile) into G[1-cur], |Δlog v| element-wise into ``dvv``, and the
    tile's contribution to the next row sums element-wise into ``acc`` (and ``m2``, the log
    domain's element-wise running max). ``w``: the row weights (scaling) or log u (log). A 16-bit
    tile (the on-chip kernel storage) is widened here, at use: sums and potentials stay in DT."""
    tile = tile.to(acc.dtype)
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
           SCALING: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, FAST_LOG: tl.constexpr,
           RESIDENT: tl.constexpr = False, OFFSETS_LAST: tl.constexpr = False):
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
    j+1 are in flight during the arithmetic of tile j. (``tl.reduce`` rather than ``tl.sum``: the Triton
    interpreter pays ~1 ms per device-function call; ``_sweep_tile`` costs two calls per pair of tiles.)

    ``RESIDENT`` (the on-chip 16-bit path, see ``_sinkhorn_kernel``): the operand's loads are cached in
    the SM's L1 with the ``L1::evict_last`` policy, so that once the first sweep has brought
    the program's operand in, every later sweep reads it from the SM instead of L2/HBM.
    """
    # Unmasked loads: padding rows re-read the last real row (their weights are 0 / NEG, so they add
    # nothing to the column sums, and their row sums are discarded), and MS is a multiple of 2 * BM.
    rows = (tl.minimum(offs_n, N - 1) * MS)[:, None]
    offs_b = tl.arange(0, BM)
    if KS.dtype.element_ty.primitive_bitwidth == 16:
        # 16-bit operand: 4 elements (8 bytes) per load, so the tiles get float32's register layout
        # (with 16-byte loads Triton lays 8 per thread and the column sums need 2.5x the shuffles).
        offs_b = tl.max_contiguous(offs_b, 4)
    f = tl.full((BN,), 0.0, DT)
    fn = tl.where(rv, tau * (log_mu - row_lse), 0.0)
    cur = 0
    it = 0
    done = 0
    # Tiles are loaded one ahead, two per trip (t0 carried by the sweep loop, t1 local), so no register
    # copies. t0 is loaded afresh at the top of each sweep, not carried over from the previous one: a tile
    # carried through both the while and the for loop crashes Triton 3.6's RemoveLayoutConversions pass
    # (the Triton that torch 2.11 ships; tests/test_triton_compile.py builds with it in CI). The last
    # trip's load (wrapped to the first tile) is then unused: one L1/L2 hit per sweep.
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
        t0 = _load_tile(KS, rows, offs_b, RESIDENT, OFFSETS_LAST)
        for j0 in tl.range(0, MS, 2 * BM, num_stages=1):
            offs_1 = j0 + BM + offs_b
            t1 = _load_tile(KS, rows, offs_1, RESIDENT, OFFSETS_LAST)
            dvv, acc, m2 = _sweep_tile(t0, j0 + offs_b, G, cur, MS, w, a0, c_v, log_nu, tau, dvv, acc, m2, SCALING, FAST_LOG)
            j2 = j0 + 2 * BM
            offs_2 = tl.where(j2 < MS, j2, 0) + offs_b
            t0 = _load_tile(KS, rows, offs_2, RESIDENT, OFFSETS_LAST)
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
def _prepare_scaling(cost, ks, cm, rv, offs_n, in_n, lo, inv_eps, M, MS, HAS_CM: tl.constexpr,
                     BN: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, K16: tl.constexpr):
    """Writes the shifted kernel K' = exp(-(C - min C)/ε) in [e^-T, 1] (0 on padding) over the whole
    padded stride of ``ks`` and returns its row sums (of the *stored* values, so that the first row
    sums and the sweeps see the same operator). K16: 0 = stored in DT; KERNEL_BF16 = bfloat16
    (rounded to nearest even, explicitly: the interpreter's cast truncates); KERNEL_FP16 = float16
    times FLOAT16_SCALE, so every entry of a T <= FLOAT16_MAX_RANGE problem is a normal float16."""
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
        st_m = offs_m
        if K16 != 0:
            st_m = tl.max_contiguous(offs_m, 4)  # float32's layout for the stores too (see _solve)
        if K16 == KERNEL_BF16:
            bits = kt.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round to nearest even; kt >= 0, finite
            kq = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: already a bfloat16 value
        elif K16 == KERNEL_FP16:
            kq = (kt.to(tl.float32) * FLOAT16_SCALE).to(tl.float16)
        else:
            kq = kt
        tl.store(ks + offs_n[:, None] * MS + st_m[None, :], kq, mask=in_n[:, None] & (offs_m < MS)[None, :])
        r_sum += tl.reduce(kq.to(DT), 1, SUM)
    return r_sum


@triton.jit
def _next_problem(COUNTER, STORAGE, P, PASS: tl.constexpr):
    """The next problem index from the atomic counter (>= P: none left); PASS_ONLY_DEFERRED skips the
    problems the first pass solved (STORAGE written by the previous launch, so it is visible here)."""
    prob = tl.atomic_add(COUNTER, 1)
    if PASS == PASS_ONLY_DEFERRED:
        flag = tl.load(STORAGE + prob, mask=prob < P, other=STORAGE_DEFERRED)
        while flag != STORAGE_DEFERRED:
            prob = tl.atomic_add(COUNTER, 1)
            flag = tl.load(STORAGE + prob, mask=prob < P, other=STORAGE_DEFERRED)
    return prob


@triton.jit
def _sinkhorn_kernel(
    COST, PLAN, SCRATCH, SCRATCH16, GBUF, RM, CM, PARAMS, N_ITER, STORAGE, COUNTER,
    P, N, M, MS, max_iter,
    HAS_RM: tl.constexpr, HAS_CM: tl.constexpr, DOMAIN: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, FAST_LOG: tl.constexpr,
    K16: tl.constexpr = 0, RESIDENT: tl.constexpr = False, PASS: tl.constexpr = 0,
):
    """Persistent solver: each program takes problems from an atomic counter until none is left.

    Per problem: range pre-pass, domain choice, the solve, the plan. The scratch (the aligned
    operand, written over the whole padded stride) and the log v ping-pong buffer belong to the
    program, so only as many operands as there are resident programs are live at a time.

    DOMAIN: DOMAIN_AUTO picks per problem from the cost range; DOMAIN_LOG / DOMAIN_SCALING force
    one path (tests exercise the log domain at moderate ε; the forced scaling variant is only for
    costs whose range is known to be small).

    K16 (0, KERNEL_BF16 or KERNEL_FP16): the 16-bit kernel storage. A scaling-domain problem (and,
    for float16, one with T <= FLOAT16_MAX_RANGE) stores K' in 16 bits in ``SCRATCH16`` and sweeps it
    widened to float32 (sums and potentials float32, the plan from the exact cost); the others take
    the exact log domain. ``STORAGE[p]`` records what problem p used (KERNEL_NATIVE / KERNEL_BF16 /
    KERNEL_FP16), so that the host can refuse a requested 16-bit storage that was not honoured.

    PASS (see sinkhorn_forward): PASS_ALL solves every problem; PASS_DEFER_LOG compiles no log-domain
    sweep and records STORAGE_DEFERRED for the problems that need it; PASS_ONLY_DEFERRED (launched with
    DOMAIN_LOG) takes only those from the counter.

    Traffic model of the 16-bit path (paper shape 40 x 2049, padded stride 2176, H100 SXM, 132 SMs,
    1.755 GHz; written before a GPU was lent — measured on an H200 the sweep is latency-bound per tile,
    ~4x slower than this model, see benchmarks/RESULTS.md "GPU"):

    * bytes per problem-iteration: the operand once, 40 x 2176 x 2 B = 174 KB (float32: 348 KB), plus
      the log v ping-pong (read + write of 2176 x 4 B, 17 KB);
    * streaming (``RESIDENT`` off): 640 x 191 KB = 122 MB per iteration for 640 problems, 37 us from
      HBM at 3.35 TB/s (float32: 223 MB, 67 us); the floor (one 16-bit read of the 52.5 M entries)
      is 105 MB, 31 us;
    * on chip (``RESIDENT``, picked when the 191 KB fit ``ONCHIP_BYTES`` of the SM's L1/shared SRAM):
      after the first sweep nothing comes from L2/HBM; the floor is the issue rate of 2 FMA per entry,
      40 x 2049 x 2 / 128 lanes = 1.28 K cycles per problem-iteration, 5 rounds of 132 programs =
      3.6 us per iteration, 0.36 ms per 100 iterations (issue 13 estimates 0.45 ms);
    * as compiled (compile_report, sm_90a, float16): 374 SASS instructions per thread per 128
      columns, 17 trips = 6.4 K per problem-iteration; 8 warps on 4 schedulers issue one per cycle
      each, so ~12.7 K cycles = 7.2 us per problem-iteration, 5 rounds of 132 programs = 36 us per
      iteration, 3.6 ms per 100 iterations: issue-bound, ~8x the 0.45 ms floor (float32 from HBM:
      67 us per iteration; from L2 ~40 us). docs/triton.md says where the instructions go.
    """
    slot = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = COST.dtype.element_ty
    if DT == tl.float64:
        log_ceil = LOG_CEIL_FP64
        budget = SCALING_BUDGET_FP64
    else:
        log_ceil = LOG_CEIL_FP32
        budget = SCALING_BUDGET_FP32
    tau = tl.load(PARAMS + P_TAU)
    inv_eps = tl.load(PARAMS + P_INV_EPS)
    tol = tl.load(PARAMS + P_TOL)

    prob = _next_problem(COUNTER, STORAGE, P, PASS)
    while prob < P:
        pid = prob.to(tl.int64)
        # Per-program values (the scratch operand, the log v buffer, the row offsets, the domain limit) are
        # derived per problem, through a value the compiler cannot see is constant (prob >= 0 always holds
        # here): computed once at entry, they are loop-invariant over the whole persistent loop and were kept
        # in local memory across the pre-pass and the plan (64 B on sm_80 float32, 44-56 B on sm_90a float16:
        # the sweep's per-row tile pointers); this way they live only where they are used. The 16-bit launch
        # keeps its row offsets hoisted: per problem there, ptxas spilled 8-12 B elsewhere (register pressure
        # sits at the cap either way; compile_report shows both launches spill-free as written).
        live = (prob >= 0).to(tl.int32)
        if K16 == 0:
            offs_n = tl.arange(0, BN) * live
        else:
            offs_n = tl.arange(0, BN)
        in_n = offs_n < N
        slot_rows = slot * N * live
        ks = SCRATCH + slot_rows * MS
        ks16 = SCRATCH16 + slot_rows * MS
        g_buf = GBUF + slot * live * 2 * MS
        scaling_max = tl.load(PARAMS + P_SCALING_MAX)
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
        # A 16-bit launch has no float32 scaling sweep: a problem the 16-bit storage does not apply to
        # takes the exact log domain (rare: T in (20.79, 60] for float16), which keeps the kernel at
        # two sweeps and ptxas from spilling (a third spilled 24 B on sm_80).
        if K16 == KERNEL_FP16:
            use16 = use_scaling & (T <= FLOAT16_MAX_RANGE)
            log_s = LOG_FLOAT16_SCALE
            use_scaling32 = False
        elif K16 == KERNEL_BF16:
            use16 = use_scaling
            log_s = 0.0
            use_scaling32 = False
        else:
            use16 = False
            log_s = 0.0
            use_scaling32 = use_scaling
        if use16:
            # 16-bit K'' = s K' (row stride MS, so the sweeps' loads vectorize). log K = log K'' + LK - log s;
            # the weights' shift grows by log s so the row sums of K'' stay where those of K' were
            # (T <= FLOAT16_MAX_RANGE leaves the SCALING_BUDGET ~90 to spare for the s^-(1+τ) below).
            r_sum = _prepare_scaling(cost, ks16, cm, rv, offs_n, in_n, lo, inv_eps, M, MS,
                                     HAS_CM, BN, BM, DT, K16)
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks16, g_buf, N, MS, offs_n, rv, log_mu, log_nu,
                                    LK - log_s + tl.log(r_sum), tau, LK - log_s, shift + log_s, tol, max_iter,
                                    True, BN, BM, DT, FAST_LOG, RESIDENT, True)
            tl.store(STORAGE + pid, K16)
        elif use_scaling32:
            # Shifted kernel K' = exp(-(C - min C)/eps) in [e^-T, 1] into the scratch (row stride MS,
            # a multiple of 16 elements, so the sweeps' loads vectorize), and the first row sums.
            r_sum = _prepare_scaling(cost, ks, cm, rv, offs_n, in_n, lo, inv_eps, M, MS, HAS_CM, BN, BM, DT, 0)
            tl.debug_barrier()
            f, cur, n_iter = _solve(ks, g_buf, N, MS, offs_n, rv, log_mu, log_nu, LK + tl.log(r_sum), tau,
                                    LK, shift, tol, max_iter, True, BN, BM, DT, FAST_LOG)
            tl.store(STORAGE + pid, KERNEL_NATIVE)
        elif PASS == PASS_DEFER_LOG:
            # Left to the log-domain pass: no plan, no iteration count written here.
            tl.store(STORAGE + pid, STORAGE_DEFERRED)
            f = tl.full((BN,), 0.0, DT)
            cur = pid.to(tl.int32) * 0  # int32 tensors, as _solve returns them (the branches must agree)
            n_iter = cur - 1
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
                                    LK, shift, tol, max_iter, False, BN, BM, DT, FAST_LOG, False, K16 != 0)
            tl.store(STORAGE + pid, KERNEL_NATIVE)

        tl.store(N_ITER + pid, n_iter)
        if PASS == PASS_DEFER_LOG:
            m_out = tl.where(n_iter < 0, 0, M)  # a deferred problem's plan is the log pass's to write
        else:
            m_out = M
        # plan = exp(log u + log K + log v), as the reference writes it; padding exactly 0 (the
        # solve's last barrier made the final log v writes visible).
        for j0 in range(0, m_out, BM):
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
        prob = _next_problem(COUNTER, STORAGE, P, PASS)


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


def sinkhorn_blocks(n: int, m: int, dtype: torch.dtype, device: torch.device, scaling_only: bool = False):
    """(BN, BM, num_warps) for the Sinkhorn sweeps: all rows in one tile.

    On GPU a tile holds 4K fp32 / 2K fp64 elements. ``scaling_only`` (a launch whose every problem runs
    the scaling-domain sweep: the fused ot_attention's, whose domain the host knows, and the standalone
    solver's first pass, which defers the others to a second, log-domain launch), float32 and
    N <= 128: over 4 warps (32 elements per thread), two persistent programs per SM
    (``_launch.programs_per_sm``). Timed on an H200 at the paper's shape (benchmarks/RESULTS.md,
    benchmarks/triton_tuning.py): 84.5 us per iteration for 640 problems against 155 us with 8 warps
    (16 per thread, one program per SM) and 132 us with 4 warps at 2048-element tiles: the sweep pays
    per tile (the column reduction, the per-column log v update), so more elements per tile, with a
    second program per SM to overlap the reductions, is what counts. Otherwise 8 warps (16 registers
    per thread per tile): a kernel that may also run the log-domain sweep (its element-wise running max
    besides the accumulator) spills at 32 per thread (64-420 B on sm_80 / sm_90a), as do N > 128 tiles.
    No spills at the paper and largest shapes on sm_80 / sm_90a (Triton 3.9; tests/test_triton_compile.py;
    the per-program values are derived per problem in ``_sinkhorn_kernel`` for that). Four 2-warp or eight
    1-warp programs per SM (same or fewer elements per thread) were timed 11-54 % slower in the fused solve. With two
    programs per SM the two 16-bit operands of the paper's shape no longer fit one SM's L1 together, so
    the "on-chip" evict-last policy is then a cache hint only (float16 measured 3 % faster than float32).
    The interpreter pays per op, not per element, so it gets whole-problem tiles.
    """
    bn = next_pow2(max(n, 16))
    if device.type == "cuda":
        tile = 2048 if dtype == torch.float64 else 4096
        warps = 4 if (scaling_only and dtype == torch.float32 and bn <= 128) else 8
    else:
        tile, warps = 16384, 8
    # At least one 16-byte vector per row (4 fp32 / 2 fp64); many rows get narrow tiles.
    bm = max(16 // (8 if dtype == torch.float64 else 4), min(next_pow2(m), tile // bn))
    return bn, bm, warps


def sinkhorn_launches(n: int, m: int, dtype: torch.dtype, device: torch.device, domain: int = 0, k16: int = 0,
                      two_pass: Optional[bool] = None) -> list:
    """The standalone solver's launches: per launch the kernel's PASS, DOMAIN, K16 and num_warps.

    Two passes where the scaling sweep has faster blocks of its own (``sinkhorn_blocks``, ``scaling_only``):
    the first runs the scaling-domain problems with them and defers the rest, the second only the deferred
    ones, in the log domain. Both are queued at once: no host sync, every problem solved exactly once.
    ``two_pass``: None = that rule, True / False force it (tests)."""
    warps = sinkhorn_blocks(n, m, dtype, device)[2]
    warps_scaling = sinkhorn_blocks(n, m, dtype, device, scaling_only=True)[2]
    if two_pass is None:
        two_pass = domain == 0 and warps_scaling != warps
    if not two_pass:
        return [dict(PASS=PASS_ALL.value, DOMAIN=domain, K16=k16, num_warps=warps)]
    if domain != 0:
        raise ValueError("two_pass needs domain=0 (the per-problem choice)")
    return [dict(PASS=PASS_DEFER_LOG.value, DOMAIN=DOMAIN_AUTO.value, K16=k16, num_warps=warps_scaling),
            dict(PASS=PASS_ONLY_DEFERRED.value, DOMAIN=DOMAIN_LOG.value, K16=0, num_warps=warps)]


def fast_log(dtype: torch.dtype, device: torch.device) -> bool:
    """The sweeps' per-column logarithm in hardware approximation: float32 on a GPU (see ``_log``)."""
    return device.type == "cuda" and dtype == torch.float32


def _as_u8(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def kernel16_plan_error_bound(tau: float, kernel_dtype: str) -> float:
    """A-priori bound on every plan entry's relative error from storing the kernel in ``kernel_dtype``:
    ``exp(2 tau delta / (1 - tau)) - 1``, delta = -log(1 - u), u = 2^-8 (bfloat16) / 2^-11 (float16);
    0 for "float32", inf for balanced OT (tau >= 1). The cpp backend's bound (csrc/sinkhorn.cpp,
    docs/numerics.md "16-bit kernel storage"), restated here so this backend does not need the C++
    extension; tests/test_triton_backend.py checks that the two agree."""
    u = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}.get(kernel_dtype)
    if u is None:
        return 0.0
    if not tau < 1.0:
        return math.inf
    return math.expm1(2.0 * tau * -math.log1p(-u) / (1.0 - tau))


def kernel16_code(kernel_dtype: str, dtype: torch.dtype, tau: float) -> int:
    """The launch's 16-bit storage (0 = none, KERNEL_BF16, KERNEL_FP16) for ``kernel_dtype``.

    "auto": float16 for float32 inputs where ``kernel16_plan_error_bound(tau, "float16") <=
    KERNEL16_AUTO_PLAN_RTOL`` (the cpp backend's rule; the kernel adds the per-problem range check
    T <= FLOAT16_MAX_RANGE and the scaling domain), else none. An explicit 16-bit request on float64
    inputs is a ValueError (16-bit storage keeps float32 potentials)."""
    if kernel_dtype == "float32":
        return 0
    if kernel_dtype == "auto":
        ok = dtype == torch.float32 and kernel16_plan_error_bound(tau, "float16") <= KERNEL16_AUTO_PLAN_RTOL
        return KERNEL_FP16.value if ok else 0
    if kernel_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"kernel_dtype must be one of ('auto', 'float32', 'bfloat16', 'float16'), "
                         f"got {kernel_dtype!r}")
    if dtype != torch.float32:
        raise ValueError(f"kernel_dtype={kernel_dtype!r} needs float32 inputs (16-bit kernel storage keeps float32 "
                         f"potentials); got {dtype}: use kernel_dtype='float32' or 'auto'")
    return KERNEL_CODES[kernel_dtype]


# Bytes of a program's working set (16-bit operand + float32 log v ping-pong) that the on-chip path
# keeps in the SM's L1, per compute capability major. L1 and shared memory are one SRAM per SM: 256 KB
# on sm_90 (H100/H200), 192 KB on sm_80 (A100). The solver needs 4 KB of shared memory (compile_report)
# and runs one program per SM, so the driver's 8 KB carveout leaves ~248 / ~184 KB of L1; the budget
# keeps ~15 % of that for the other traffic through L1 (cost reads, plan writes, mask bytes). The paper
# shape needs 191 KB: on chip on sm_90, streamed (16-bit, from L2) on sm_80.
#
# Why L1 and not an explicit shared-memory buffer: Triton's language has no shared-memory allocation
# (only Gluon does, and Gluon kernels do not run under the interpreter, which is how CI checks every
# kernel against the float64 reference: "0 active drivers"); CUDA C++ would live in csrc/. A working set
# below the L1 capacity swept cyclically with evict-last loads is not evicted, so after the first sweep
# the operand is served by the SM. What is not guaranteed (and cannot be checked without a GPU) is the
# carveout the driver picks; compile_report checks that the loads carry the policy (LDG.E.EL).
ONCHIP_BYTES = {9: 208 * 1024, 8: 136 * 1024}


def operand_stride(m: int, bm: int) -> int:
    """Row stride of the sweeps' operand copy (scratch): a multiple of two tile widths, since a sweep trip
    reads two tiles unmasked (and of 16 elements, so rows start 16-byte aligned)."""
    return padded_stride(m, max(16, 2 * bm))


def onchip_footprint(n: int, m: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one program keeps live while it sweeps a 16-bit operand (n x padded stride x 2 + log v), at
    the block sizes of a GPU launch (the interpreter's whole-problem tiles pad differently)."""
    _, bm, _ = sinkhorn_blocks(n, m, dtype, torch.device("cuda"))
    ms = operand_stride(m, bm)
    return n * ms * 2 + 2 * ms * 4


def onchip_capacity(device: torch.device) -> int:
    """ONCHIP_BYTES of ``device``'s architecture (0 where unknown). The interpreter models sm_90."""
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return ONCHIP_BYTES.get(major, ONCHIP_BYTES[9] if major > 9 else 0)
    return ONCHIP_BYTES[9]


SWEEPS = ("shared", "l1", "stream")


def sinkhorn_path(n: int, m: int, dtype: torch.dtype, kernel_dtype: str, mass: float, eps: float,
                  device: torch.device) -> dict:
    """How ``sinkhorn_forward`` runs a launch, decided on the host (no data read):

    * ``kernel16``: the 16-bit storage the scaling-domain problems get ("bfloat16", "float16" or None);
      per problem the kernel still falls back to float32 where the storage does not apply (log domain,
      float16 range), and records it (``return_storage``);
    * ``sweep``: where the 16-bit operand lives during the solve (None without 16-bit storage):

      - "shared": the CUDA kernel ``pisces_fast/ops/cuda/sinkhorn_onchip.cu`` (compiled with NVRTC) holds it
        in shared memory, one CTA per problem (``cuda.sinkhorn.availability``: a CUDA device, N <= 64, the
        kernel fits the device's shared memory, NVRTC found; ``PISCES_FAST_CUDA_ONCHIP=0`` turns it off);
      - "l1": the Triton sweep with L1-resident (evict-last) loads, where the operand and log v fit
        ``onchip_capacity``;
      - "stream": the Triton sweep from L2/HBM;
    * ``footprint``: the bytes the "l1" decision compared; ``why``: why "shared" was not chosen (or "").
    """
    code = kernel16_code(kernel_dtype, dtype, unbalanced_exponent(eps, mass))
    name = {0: None, KERNEL_BF16.value: "bfloat16", KERNEL_FP16.value: "float16"}[code]
    foot = onchip_footprint(n, m, dtype)
    sweep, why = None, "no 16-bit kernel storage"
    if code:
        from ..cuda import sinkhorn as cuda_sinkhorn

        shared, why = cuda_sinkhorn.availability(n, m, device)
        if shared:
            sweep, why = "shared", ""
        else:
            sweep = "l1" if foot <= onchip_capacity(device) else "stream"
    return dict(kernel16=name, sweep=sweep, footprint=foot, why=why)


def _raise_unhonoured(storage: torch.Tensor, code: int, kernel_dtype: str, cost, row_mask, col_mask, eps,
                      tau) -> None:
    """ValueError if a problem could not store its kernel as the explicitly requested ``kernel_dtype``."""
    bad = (storage != code).nonzero()
    if bad.numel() == 0:
        return
    p = int(bad[0, 0])
    c = cost[p].double()
    valid = torch.ones_like(c, dtype=torch.bool)
    if row_mask is not None:
        valid &= row_mask[p].bool()[:, None]
    if col_mask is not None:
        valid &= col_mask[p].bool()[None, :]
    t = float((c[valid].max() - c[valid].min()) / eps)
    n_valid, m_valid = int(valid.any(1).sum()), int(valid.any(0).sum())
    if kernel_dtype == "float16" and scaling_domain_ok(t, tau, n_valid, m_valid, cost.dtype):
        why = f"needs (max C - min C)/eps <= {FLOAT16_MAX_RANGE.value} so every kernel entry is a normal float16"
        alt = "'bfloat16', 'float32' or 'auto'"
    else:
        why = "needs the scaling-domain iteration, but this problem runs in the log domain"
        alt = "'float32' or 'auto'"
    raise ValueError(f"kernel_dtype={kernel_dtype!r} {why}; problem {p} has (max C - min C)/eps = {t:.4g}: "
                     f"use kernel_dtype={alt}")


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
    kernel_dtype: str = "float32",
    sweep: Optional[str] = None,
    return_storage: bool = False,
    two_pass: Optional[bool] = None,
):
    """Launch the fused solver on ``cost (P, N, M)``; returns the plan (same dtype), and with
    ``return_n_iter`` also the per-problem count of accepted updates (int32, like the reference's),
    with ``return_storage`` the per-problem kernel storage code (KERNEL_NATIVE / KERNEL_BF16 /
    KERNEL_FP16, int32).

    ``domain``: 0 = per-problem choice (default), 1 = force the log domain (tests).
    ``kernel_dtype``: as OTConfig's (see ``kernel16_code``); "bfloat16" / "float16" that a problem
    cannot honour is a ValueError after the launch (this reads the P storage codes back: one
    device-to-host copy, on explicit 16-bit requests only). ``sweep``: None = ``sinkhorn_path``'s
    choice; "shared" / "l1" / "stream" force that 16-bit sweep (tests, benchmarks; "shared" raises where the
    CUDA kernel cannot run). ``two_pass``:
    None = where the scaling sweep has blocks of its own (float32 on a GPU, N <= 128); True forces the
    two launches (tests: the interpreter), False the single one.
    """
    if domain not in (0, 1):
        raise ValueError(f"domain must be 0 (auto) or 1 (log), got {domain!r}")
    p, n, m = cost.shape
    check_problem_size("sinkhorn_unbalanced", n)
    path = sinkhorn_path(n, m, cost.dtype, kernel_dtype, mass, eps, cost.device)
    k16 = KERNEL_CODES.get(path["kernel16"], 0) if path["kernel16"] else 0
    if domain == 1 and kernel_dtype in ("bfloat16", "float16"):
        raise ValueError(f"kernel_dtype={kernel_dtype!r} applies to the scaling domain only; "
                         "domain='log' has no kernel matrix")
    if domain == 1:
        k16 = 0  # no kernel matrix to store ("auto")
    if sweep is not None:
        if sweep not in SWEEPS:
            raise ValueError(f"sweep must be None or one of {SWEEPS}, got {sweep!r}")
        if not k16:
            raise ValueError(f"sweep={sweep!r} chooses where a 16-bit kernel matrix lives; this launch stores none "
                             f"(kernel_dtype={kernel_dtype!r}, domain={'log' if domain == 1 else 'auto'})")
    sweep = (sweep or path["sweep"]) if k16 else None
    if sweep == "shared":
        from ..cuda import sinkhorn as cuda_sinkhorn

        if path["sweep"] != "shared":
            raise ValueError(f"sweep='shared' cannot run this launch: {path['why']}")
        if two_pass is False:
            raise ValueError("sweep='shared' is a first pass followed by the log-domain one; two_pass=False contradicts it")
    resident = sweep == "l1"
    cost = cost.contiguous()
    plan = torch.empty_like(cost)
    bn, bm, _ = sinkhorn_blocks(n, m, cost.dtype, cost.device)
    # The shared-memory kernel is the first pass; the Triton log-domain pass takes the problems it defers.
    passes = sinkhorn_launches(n, m, cost.dtype, cost.device, domain, k16, True if sweep == "shared" else two_pass)
    ms = operand_stride(m, bm)
    pass_programs = [solve_programs(p, cost.device, launch["num_warps"]) for launch in passes]
    programs = max(pass_programs)
    scratch = torch.empty((programs, n, ms), dtype=cost.dtype, device=cost.device)
    scratch16 = (torch.empty((programs, n, ms), dtype=torch.bfloat16 if k16 == KERNEL_BF16.value else torch.float16,
                             device=cost.device) if k16 and sweep != "shared" else scratch)
    g_buf = torch.empty((programs, 2, ms), dtype=cost.dtype, device=cost.device)
    n_iter = torch.empty((p,), dtype=torch.int32, device=cost.device)
    storage = torch.empty((p,), dtype=torch.int32, device=cost.device)
    counters = torch.zeros((len(passes),), dtype=torch.int32, device=cost.device)
    params = solver_params(eps, mass, tol, cost.dtype, cost.device)
    rm, cm = _as_u8(row_mask), _as_u8(col_mask)
    with launch_device(cost.device):
        for i, (launch, launch_programs) in enumerate(zip(passes, pass_programs)):
            if i == 0 and sweep == "shared":
                cuda_sinkhorn.sinkhorn_onchip(cost, plan, rm, cm, params, n_iter, storage, max_iter,
                                              bf16=k16 == KERNEL_BF16.value)
                continue
            _sinkhorn_kernel[(launch_programs,)](
                cost, plan, scratch, scratch16, g_buf, rm if rm is not None else g_buf,
                cm if cm is not None else g_buf, params, n_iter, storage, counters[i:],
                p, n, m, ms, max_iter,
                HAS_RM=rm is not None, HAS_CM=cm is not None, BN=bn, BM=bm,
                FAST_LOG=fast_log(cost.dtype, cost.device), RESIDENT=resident and bool(launch["K16"]), **launch,
                **persistent_launch_options(cost.device, launch["num_warps"]),
            )
    if kernel_dtype in ("bfloat16", "float16"):
        _raise_unhonoured(storage, k16, kernel_dtype, cost, row_mask, col_mask, eps, unbalanced_exponent(eps, mass))
    out = (plan,)
    if return_n_iter:
        out += (n_iter,)
    if return_storage:
        out += (storage,)
    return out if len(out) > 1 else plan
