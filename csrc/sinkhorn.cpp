// Batched unbalanced Sinkhorn (PISCES Algorithm 3): scaling-domain and log-domain iterations.
// See sinkhorn.h for the contract; pisces_fast/ops/reference.py is the executable specification.
#include "sinkhorn.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "simd.h"

namespace pisces {

using simd::IVec;
using simd::Traits;
using simd::Vec;

template <typename T>
bool scaling_domain_is_safe(double cost_range, double eps, int64_t N, int64_t M) {
  if (!(cost_range >= 0.0) || !std::isfinite(cost_range) || !(eps > 0.0)) return false;
  const double emin = -(std::numeric_limits<T>::min_exponent - 1);  // 126 (float), 1022 (double)
  const double mantissa = std::numeric_limits<T>::digits;          // 24, 53
  const double limit =
      (emin - mantissa) * std::log(2.0) - std::log(4.0 * static_cast<double>(std::max<int64_t>(N, M)));
  return cost_range / eps <= limit;
}

template bool scaling_domain_is_safe<float>(double, double, int64_t, int64_t);
template bool scaling_domain_is_safe<double>(double, double, int64_t, int64_t);

double kernel16_plan_error_bound(double tau, KernelStorage storage) {
  double u;
  switch (storage) {
    case KernelStorage::kBFloat16: u = std::ldexp(1.0, -8); break;
    case KernelStorage::kFloat16: u = std::ldexp(1.0, -11); break;
    default: return 0.0;
  }
  if (!(tau < 1.0)) return std::numeric_limits<double>::infinity();
  const double delta = -std::log1p(-u);
  return std::expm1(2.0 * tau * delta / (1.0 - tau));
}

namespace {
const char* storage_name(KernelStorage s) {
  switch (s) {
    case KernelStorage::kBFloat16: return "bfloat16";
    case KernelStorage::kFloat16: return "float16";
    default: return "float32";
  }
}
}  // namespace

template <typename T>
KernelStorage resolve_kernel_storage(KernelStorage requested, bool scaling, double cost_range, double eps,
                                     double tau) {
  const bool is16 = requested == KernelStorage::kBFloat16 || requested == KernelStorage::kFloat16;
  const bool fp16_fits = cost_range / eps <= kFloat16MaxRange;
  if (requested == KernelStorage::kAuto) {
    if (!std::is_same<T, float>::value || !scaling) return KernelStorage::kNative;
    return fp16_fits && kernel16_plan_error_bound(tau, KernelStorage::kFloat16) <= kAuto16PlanRtol
               ? KernelStorage::kFloat16
               : KernelStorage::kNative;
  }
  if (!is16) return KernelStorage::kNative;
  const std::string what = std::string("kernel_dtype='") + storage_name(requested) + "'";
  if (!std::is_same<T, float>::value)
    throw std::invalid_argument(what + " needs float32 inputs (16-bit kernel storage keeps float32 potentials); "
                                "got float64: use kernel_dtype='float32' or 'auto'");
  if (!scaling)
    throw std::invalid_argument(what + " needs the scaling-domain iteration, but this problem runs in the log "
                                "domain ((max C - min C)/eps = " + std::to_string(cost_range / eps) +
                                " is too wide for it): use kernel_dtype='float32' or 'auto'");
  if (requested == KernelStorage::kFloat16 && !fp16_fits)
    throw std::invalid_argument(what + " needs (max C - min C)/eps <= " + std::to_string(kFloat16MaxRange) +
                                " so every kernel entry is a normal float16, got " +
                                std::to_string(cost_range / eps) + ": use kernel_dtype='bfloat16', 'float32' or 'auto'");
  return requested;
}

template KernelStorage resolve_kernel_storage<float>(KernelStorage, bool, double, double, double);
template KernelStorage resolve_kernel_storage<double>(KernelStorage, bool, double, double, double);

namespace {

constexpr int kBlockVecs = 8;  // columns per block = 8 vectors: a 40-row block (20 KB fp32) stays in L1

// Per-problem views into the workspace.
template <typename T>
struct Problem {
  int64_t N, M, Mw, Nw;
  T tau;
  T* kernel;     // N x Mw
  T* log_mu;     // Nw (padding rows 0)
  T* log_nu;     // Mw (padding columns and j >= M: 0)
  T* col_valid;  // Mw: 1 / 0
  T* row_valid;  // Nw: 1 / 0
  const int32_t* rows;  // valid row indices
  int64_t n_rows;
};

template <typename T>
PISCES_INLINE IVec<T> valid_lanes(const T* flags) {
  return simd::load(flags) != T(0);
}

// ---------------------------------------------------------------------------------------------
// Scaling domain. With K' = exp(-(C - cmin)/eps) and c0 = cmin/eps,
//   LSE_j(log K_ij + lv_j) = log(sum_j K'_ij exp(lv_j - s)) + s - c0   for any shift s;
// s = max over valid j keeps every exponential in (0, 1] and the sum >= exp(-range/eps).
//
// One sweep over column blocks does the v half-update of iteration k (t = K'^T z from u_k) and
// accumulates the u half-update of iteration k+1 (S = K' w from v_k), so the kernel streams from
// L2 once per iteration, not twice. The sweep is software-pipelined: one pass over the rows
// accumulates t for block b+1 (loads from L2) and S for block b (the same rows, already in L1), so
// the L2 stream, the bottleneck, overlaps the arithmetic.

template <typename T>
struct SweepState {
  T dv;       // max |lv_new - lv_prev| (v update)
  T shift_v;  // running max of the valid lv (w shift)
};

// Row pass: t[0..NT) += z_i K'[i, jt..] and S_i += K'[i, js..] . w[0..NS). K is the kernel in its
// storage type KS (T, or BF16 / FP16 for T = float), rows P.Mw apart.
template <typename T, typename KS, int NT, int NS>
PISCES_INLINE void sweep_rows(const Problem<T>& P, const KS* K, int64_t jt, int64_t js, const T* z, Vec<T>* t,
                              const Vec<T>* w, T* S) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  V tt[NT > 0 ? NT : 1];
  V ww[NS > 0 ? NS : 1];
#pragma GCC unroll 8
  for (int v = 0; v < NT; ++v) tt[v] = t[v];
#pragma GCC unroll 8
  for (int v = 0; v < NS; ++v) ww[v] = w[v];
  const KS* kt = K + jt;
  const KS* ks = K + js;
  for (int64_t r = 0; r < P.n_rows; ++r) {
    const int64_t off = P.rows[r] * P.Mw;
    if (NT > 0) {
      const V zi = simd::splat<T>(z[P.rows[r]]);
      const KS* rt = kt + off;
#pragma GCC unroll 8
      for (int v = 0; v < NT; ++v) tt[v] += zi * simd::widen(rt + v * W);
    }
    if (NS > 0) {
      // Two interleaved partial sums halve the FMA dependency chain.
      const KS* rs = ks + off;
      V acc0 = simd::widen(rs) * ww[0];
      V acc1 = NS > 1 ? simd::widen(rs + W) * ww[NS > 1 ? 1 : 0] : simd::splat<T>(0);
#pragma GCC unroll 8
      for (int v = 2; v < NS; v += 2) {
        acc0 += simd::widen(rs + v * W) * ww[v];
        if (v + 1 < NS) acc1 += simd::widen(rs + (v + 1) * W) * ww[v + 1];
      }
      T* s = S + P.rows[r] * W;
      simd::store(s, simd::load(s) + (acc0 + acc1));
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NT; ++v) t[v] = tt[v];
}

template <typename T, typename KS, int NS>
PISCES_INLINE void sweep_rows_nt(int nt, const Problem<T>& P, const KS* K, int64_t jt, int64_t js, const T* z,
                                 Vec<T>* t, const Vec<T>* w, T* S) {
  switch (nt) {
    case 0: sweep_rows<T, KS, 0, NS>(P, K, jt, js, z, t, w, S); break;
    case 1: sweep_rows<T, KS, 1, NS>(P, K, jt, js, z, t, w, S); break;
    case 2: sweep_rows<T, KS, 2, NS>(P, K, jt, js, z, t, w, S); break;
    case 3: sweep_rows<T, KS, 3, NS>(P, K, jt, js, z, t, w, S); break;
    case 4: sweep_rows<T, KS, 4, NS>(P, K, jt, js, z, t, w, S); break;
    case 5: sweep_rows<T, KS, 5, NS>(P, K, jt, js, z, t, w, S); break;
    case 6: sweep_rows<T, KS, 6, NS>(P, K, jt, js, z, t, w, S); break;
    case 7: sweep_rows<T, KS, 7, NS>(P, K, jt, js, z, t, w, S); break;
    default: sweep_rows<T, KS, 8, NS>(P, K, jt, js, z, t, w, S); break;
  }
}

// ns is 0, kBlockVecs, or (last block only, then nt = 0) anything in 1..kBlockVecs.
template <typename T, typename KS>
void sweep_rows_dispatch(int nt, int ns, const Problem<T>& P, const KS* K, int64_t jt, int64_t js, const T* z,
                         Vec<T>* t, const Vec<T>* w, T* S) {
  static_assert(kBlockVecs == 8, "dispatch below enumerates 8 vectors per block");
  if (ns == 0) return sweep_rows_nt<T, KS, 0>(nt, P, K, jt, js, z, t, w, S);
  if (ns == 8) return sweep_rows_nt<T, KS, 8>(nt, P, K, jt, js, z, t, w, S);
  switch (ns) {
    case 1: sweep_rows<T, KS, 0, 1>(P, K, jt, js, z, t, w, S); break;
    case 2: sweep_rows<T, KS, 0, 2>(P, K, jt, js, z, t, w, S); break;
    case 3: sweep_rows<T, KS, 0, 3>(P, K, jt, js, z, t, w, S); break;
    case 4: sweep_rows<T, KS, 0, 4>(P, K, jt, js, z, t, w, S); break;
    case 5: sweep_rows<T, KS, 0, 5>(P, K, jt, js, z, t, w, S); break;
    case 6: sweep_rows<T, KS, 0, 6>(P, K, jt, js, z, t, w, S); break;
    default: sweep_rows<T, KS, 0, 7>(P, K, jt, js, z, t, w, S); break;
  }
}

// lv_new[block] = tau (log nu - (log t + log_t_offset)) on valid columns (0 elsewhere).
// t > 0 is normal on valid columns (>= exp(-range/eps), see scaling_domain_is_safe); padding masked.
template <typename T, int NV>
PISCES_INLINE void finish_v_block(const Problem<T>& P, int64_t j0, const Vec<T>* t, T log_t_offset,
                                  const T* lv_prev, T* lv_new, bool track_delta, Vec<T>& dvv) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + v * W;
    V lvn = P.tau * (simd::load(P.log_nu + j) - (simd::vlog_normal(t[v]) + log_t_offset));
    lvn = simd::select<T>(valid_lanes(P.col_valid + j), lvn, simd::splat<T>(0));
    if (track_delta) dvv = simd::vmax<T>(dvv, simd::vabs<T>(lvn - simd::load(lv_prev + j)));
    simd::store(lv_new + j, lvn);
  }
}

// w[block] = exp(lv - shift) on valid columns, raising the running shift (and rescaling the
// partial row sums taken relative to the old one, as in streaming softmax) when needed.
template <typename T, int NV>
PISCES_INLINE void make_w_block(const Problem<T>& P, int64_t j0, const T* lv, Vec<T>* w, T* S,
                                SweepState<T>& st) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  V bm = simd::splat(ninf);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    bm = simd::vmax<T>(bm, simd::select<T>(valid_lanes(P.col_valid + j0 + v * W), simd::load(lv + j0 + v * W),
                                           simd::splat(ninf)));
  const T m = simd::hmax<T>(bm);
  if (m > st.shift_v && st.shift_v == ninf) {
    st.shift_v = m;  // nothing accumulated yet: S is exactly 0
  } else if (m > st.shift_v) {
    const T f = simd::sexp<T>(st.shift_v - m);
    const V fv = simd::splat<T>(f);
    for (int64_t r = 0; r < P.n_rows; ++r) {
      T* s = S + P.rows[r] * W;
      simd::store(s, simd::load(s) * fv);
    }
    st.shift_v = m;
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + v * W;
    w[v] = simd::select<T>(valid_lanes(P.col_valid + j), simd::vexp_nonpos(simd::load(lv + j) - st.shift_v),
                           simd::splat<T>(0));
  }
}

#define PISCES_NV_SWITCH(nv, CALL) \
  switch (nv) {                    \
    case 1: CALL(1); break;        \
    case 2: CALL(2); break;        \
    case 3: CALL(3); break;        \
    case 4: CALL(4); break;        \
    case 5: CALL(5); break;        \
    case 6: CALL(6); break;        \
    case 7: CALL(7); break;        \
    default: CALL(8); break;       \
  }

template <typename T>
void finish_v_dispatch(int nv, const Problem<T>& P, int64_t j0, const Vec<T>* t, T log_t_offset, const T* lv_prev,
                       T* lv_new, bool track_delta, Vec<T>& dvv) {
#define PISCES_CALL(n) finish_v_block<T, n>(P, j0, t, log_t_offset, lv_prev, lv_new, track_delta, dvv)
  PISCES_NV_SWITCH(nv, PISCES_CALL)
#undef PISCES_CALL
}

template <typename T>
void make_w_dispatch(int nv, const Problem<T>& P, int64_t j0, const T* lv, Vec<T>* w, T* S, SweepState<T>& st) {
#define PISCES_CALL(n) make_w_block<T, n>(P, j0, lv, w, S, st)
  PISCES_NV_SWITCH(nv, PISCES_CALL)
#undef PISCES_CALL
}
#undef PISCES_NV_SWITCH

// z != null: v half-update from z (into lv_new, delta vs lv_prev); else lv_given is the current v.
// accumulate: S = K' exp(v - shift_v) row sums for the next u half-update.
template <typename T, typename KS>
SweepState<T> scaling_sweep(const Problem<T>& P, const KS* K, const T* z, T log_t_offset, const T* lv_prev,
                            T* lv_new, const T* lv_given, bool accumulate, bool track_delta, T* S) {
  constexpr int W = Traits<T>::W;
  SweepState<T> st{T(0), -std::numeric_limits<T>::infinity()};
  if (accumulate) std::fill(S, S + P.N * W, T(0));
  Vec<T> dvv = simd::splat<T>(0);
  const int64_t nvec = P.Mw / W;
  const int64_t nb = (nvec + kBlockVecs - 1) / kBlockVecs;
  auto nv_of = [&](int64_t b) { return static_cast<int>(std::min<int64_t>(kBlockVecs, nvec - b * kBlockVecs)); };
  const T* lv = z != nullptr ? lv_new : lv_given;
  Vec<T> t[kBlockVecs], w[kBlockVecs];
  for (auto& x : w) x = simd::splat<T>(0);
  if (z != nullptr) {
    for (auto& x : t) x = simd::splat<T>(0);
    sweep_rows_dispatch<T, KS>(nv_of(0), 0, P, K, 0, 0, z, t, w, S);
    finish_v_dispatch<T>(nv_of(0), P, 0, t, log_t_offset, lv_prev, lv_new, track_delta, dvv);
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlockVecs * W;
    const int ns = accumulate ? nv_of(b) : 0;
    const int nt = (z != nullptr && b + 1 < nb) ? nv_of(b + 1) : 0;
    if (ns == 0 && nt == 0) continue;
    if (ns > 0) make_w_dispatch<T>(ns, P, j0, lv, w, S, st);
    if (nt > 0)
      for (auto& x : t) x = simd::splat<T>(0);
    sweep_rows_dispatch<T, KS>(nt, ns, P, K, j0 + kBlockVecs * W, j0, z, t, w, S);
    if (nt > 0)
      finish_v_dispatch<T>(nt, P, j0 + kBlockVecs * W, t, log_t_offset, lv_prev, lv_new, track_delta, dvv);
  }
  st.dv = simd::hmax<T>(dvv);
  return st;
}

// u half-update from the accumulated row sums: lu_new = tau (log mu - (log s + shift - c0)).
// Returns max |lu_new - lu_prev|.
template <typename T>
T scaling_u_update(const Problem<T>& P, const T* S, T shift_minus_c0, const T* lu_prev, T* lu_new, T* rs) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  for (int64_t i = 0; i < P.Nw; ++i) rs[i] = T(1);
  for (int64_t r = 0; r < P.n_rows; ++r) rs[P.rows[r]] = simd::hsum<T>(simd::load(S + P.rows[r] * W));
  V du = simd::splat<T>(0);
  for (int64_t i = 0; i < P.Nw; i += W) {
    const V lkv = simd::vlog(simd::load(rs + i)) + shift_minus_c0;
    V lun = P.tau * (simd::load(P.log_mu + i) - lkv);
    lun = simd::select<T>(valid_lanes(P.row_valid + i), lun, simd::splat<T>(0));
    du = simd::vmax<T>(du, simd::vabs<T>(lun - simd::load(lu_prev + i)));
    simd::store(lu_new + i, lun);
  }
  return simd::hmax<T>(du);
}

// z_i = exp(lu_i - max_valid lu) (0 on padding); returns the shift.
template <typename T>
T scaling_row_weights(const Problem<T>& P, const T* lu, T* z) {
  constexpr int W = Traits<T>::W;
  T shift = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < P.n_rows; ++r) shift = std::max(shift, lu[P.rows[r]]);
  for (int64_t i = 0; i < P.Nw; i += W) {
    const Vec<T> e = simd::vexp(simd::load(lu + i) - shift);
    simd::store(z + i, simd::select<T>(valid_lanes(P.row_valid + i), e, simd::splat<T>(0)));
  }
  return shift;
}

PISCES_INLINE void check_interrupt(const SinkhornOptions& opt) {
  if (opt.interrupt != nullptr && opt.interrupt->stop()) throw Interrupted();
}

// Runs the iterations; returns the index (0/1) of the buffers holding the final potentials. K is
// the stored kernel: K' times exp(c0 - cmin/eps) (c0 carries the storage's scale).
template <typename T, typename KS>
int run_scaling(const Problem<T>& P, const KS* K, const SinkhornOptions& opt, T c0, T* lu[2], T* lv[2], T* z, T* S,
                T* rs, int32_t& n_iter) {
  // prev = (u_{k-1}, v_{k-1}) (accepted), cur = candidates of iteration k.
  int prev = 0, cur = 1;
  // u_1 from v_0 = 0.
  const bool track = opt.tol > 0;  // tol = 0: no convergence test, skip the deltas
  SweepState<T> st = scaling_sweep<T, KS>(P, K, nullptr, T(0), nullptr, nullptr, lv[prev], true, track, S);
  T du = scaling_u_update<T>(P, S, st.shift_v - c0, lu[prev], lu[cur], rs);
  const T tol = static_cast<T>(opt.tol);
  n_iter = 0;
  for (int64_t k = 1; k <= opt.max_iter; ++k) {
    const bool last = k == opt.max_iter;
    check_interrupt(opt);
    const T shift_u = scaling_row_weights<T>(P, lu[cur], z);
    st = scaling_sweep<T, KS>(P, K, z, shift_u - c0, lv[prev], lv[cur], nullptr, !last, track, S);
    if (opt.tol > 0 && std::max(du, st.dv) < tol) break;  // converged: keep the previous potentials
    ++n_iter;
    std::swap(prev, cur);  // accept (u_k, v_k)
    if (!last) du = scaling_u_update<T>(P, S, st.shift_v - c0, lu[prev], lu[cur], rs);
  }
  return prev;
}

// ---------------------------------------------------------------------------------------------
// Log domain: the reference's log-sum-exps, streamed. Kernel buffer holds log K = -C/eps
// (-inf on padding and on the j >= M lanes).

template <typename T>
T log_u_update(const Problem<T>& P, const T* lv, const T* lu_prev, T* lu_new, T* rs, T* rm) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < P.Nw; ++i) {
    rs[i] = T(1);
    rm[i] = T(0);
  }
  const int64_t nvec = P.Mw / W;
  for (int64_t r = 0; r < P.n_rows; ++r) {
    const int64_t i = P.rows[r];
    const T* row = P.kernel + i * P.Mw;
    V m0 = simd::splat(ninf), m1 = m0, m2 = m0, m3 = m0;
    int64_t v = 0;
    for (; v + 4 <= nvec; v += 4) {
      m0 = simd::vmax<T>(m0, simd::load(row + v * W) + simd::load(lv + v * W));
      m1 = simd::vmax<T>(m1, simd::load(row + (v + 1) * W) + simd::load(lv + (v + 1) * W));
      m2 = simd::vmax<T>(m2, simd::load(row + (v + 2) * W) + simd::load(lv + (v + 2) * W));
      m3 = simd::vmax<T>(m3, simd::load(row + (v + 3) * W) + simd::load(lv + (v + 3) * W));
    }
    for (; v < nvec; ++v) m0 = simd::vmax<T>(m0, simd::load(row + v * W) + simd::load(lv + v * W));
    const T m = simd::hmax<T>(simd::vmax<T>(simd::vmax<T>(m0, m1), simd::vmax<T>(m2, m3)));
    V s0 = simd::splat<T>(0), s1 = s0, s2 = s0, s3 = s0;
    v = 0;
    for (; v + 4 <= nvec; v += 4) {
      s0 += simd::vexp((simd::load(row + v * W) + simd::load(lv + v * W)) - m);
      s1 += simd::vexp((simd::load(row + (v + 1) * W) + simd::load(lv + (v + 1) * W)) - m);
      s2 += simd::vexp((simd::load(row + (v + 2) * W) + simd::load(lv + (v + 2) * W)) - m);
      s3 += simd::vexp((simd::load(row + (v + 3) * W) + simd::load(lv + (v + 3) * W)) - m);
    }
    for (; v < nvec; ++v) s0 += simd::vexp((simd::load(row + v * W) + simd::load(lv + v * W)) - m);
    rs[i] = simd::hsum<T>((s0 + s1) + (s2 + s3));
    rm[i] = m;
  }
  V du = simd::splat<T>(0);
  for (int64_t i = 0; i < P.Nw; i += W) {
    const V lkv = simd::load(rm + i) + simd::vlog(simd::load(rs + i));
    V lun = P.tau * (simd::load(P.log_mu + i) - lkv);
    lun = simd::select<T>(valid_lanes(P.row_valid + i), lun, simd::splat<T>(0));
    du = simd::vmax<T>(du, simd::vabs<T>(lun - simd::load(lu_prev + i)));
    simd::store(lu_new + i, lun);
  }
  return simd::hmax<T>(du);
}

template <typename T, int NV>
PISCES_INLINE void log_v_block(const Problem<T>& P, int64_t j0, const T* lu, const T* lv_prev, T* lv_new,
                               Vec<T>& dvv) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  V mx[NV], s[NV];
  for (int v = 0; v < NV; ++v) {
    mx[v] = simd::splat(ninf);
    s[v] = simd::splat<T>(0);
  }
  for (int64_t r = 0; r < P.n_rows; ++r) {
    const int64_t i = P.rows[r];
    const V a = simd::splat(lu[i]);
    const T* row = P.kernel + i * P.Mw + j0;
    for (int v = 0; v < NV; ++v) mx[v] = simd::vmax<T>(mx[v], simd::load(row + v * W) + a);
  }
  for (int64_t r = 0; r < P.n_rows; ++r) {
    const int64_t i = P.rows[r];
    const V a = simd::splat(lu[i]);
    const T* row = P.kernel + i * P.Mw + j0;
    for (int v = 0; v < NV; ++v) s[v] += simd::vexp((simd::load(row + v * W) + a) - mx[v]);
  }
  for (int v = 0; v < NV; ++v) {
    const V lktu = mx[v] + simd::vlog(s[v]);
    V lvn = P.tau * (simd::load(P.log_nu + j0 + v * W) - lktu);
    // Padding columns have mx = -inf and a NaN sum; the select drops it.
    lvn = simd::select<T>(valid_lanes(P.col_valid + j0 + v * W), lvn, simd::splat<T>(0));
    dvv = simd::vmax<T>(dvv, simd::vabs<T>(lvn - simd::load(lv_prev + j0 + v * W)));
    simd::store(lv_new + j0 + v * W, lvn);
  }
}

template <typename T>
T log_v_update(const Problem<T>& P, const T* lu, const T* lv_prev, T* lv_new) {
  constexpr int W = Traits<T>::W;
  constexpr int NV = 4;
  Vec<T> dvv = simd::splat<T>(0);
  const int64_t nvec = P.Mw / W;
  int64_t vb = 0;
  for (; vb + NV <= nvec; vb += NV) log_v_block<T, NV>(P, vb * W, lu, lv_prev, lv_new, dvv);
  for (; vb < nvec; ++vb) log_v_block<T, 1>(P, vb * W, lu, lv_prev, lv_new, dvv);
  return simd::hmax<T>(dvv);
}

template <typename T>
int run_log(const Problem<T>& P, const SinkhornOptions& opt, T* lu[2], T* lv[2], T* rs, T* rm, int32_t& n_iter) {
  int prev = 0, cur = 1;
  const T tol = static_cast<T>(opt.tol);
  n_iter = 0;
  for (int64_t k = 1; k <= opt.max_iter; ++k) {
    check_interrupt(opt);
    const T du = log_u_update<T>(P, lv[prev], lu[prev], lu[cur], rs, rm);
    const T dv = log_v_update<T>(P, lu[cur], lv[prev], lv[cur]);
    if (opt.tol > 0 && std::max(du, dv) < tol) break;
    ++n_iter;
    std::swap(prev, cur);
  }
  return prev;
}

}  // namespace

template <typename T>
SinkhornResult sinkhorn_solve(const T* cost, int64_t cost_stride, const bool* row_mask, const bool* col_mask,
                              int64_t N, int64_t M, const SinkhornOptions& opt, T* plan, int64_t plan_stride,
                              SinkhornWorkspace<T>& ws) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T inf = std::numeric_limits<T>::infinity();

  Problem<T> P;
  P.N = N;
  P.M = M;
  P.Mw = round_up(M, W);
  P.Nw = round_up(N, W);
  P.tau = static_cast<T>(opt.tau);
  P.kernel = ws.kernel.reserve(static_cast<size_t>(N * P.Mw));
  P.log_mu = ws.log_mu.reserve(P.Nw);
  P.log_nu = ws.log_nu.reserve(P.Mw);
  P.col_valid = ws.col_valid.reserve(P.Mw);
  P.row_valid = ws.row_valid.reserve(P.Nw);
  int32_t* rows = ws.valid_rows.reserve(N);
  T* lu[2] = {ws.lu[0].reserve(P.Nw), ws.lu[1].reserve(P.Nw)};
  T* lv[2] = {ws.lv[0].reserve(P.Mw), ws.lv[1].reserve(P.Mw)};
  // Row scratch: sums and maxima (Nw each); per-row vector accumulators S (N x W) and weights z (Nw).
  T* rs = ws.row_sums.reserve(static_cast<size_t>(2 * P.Nw));
  T* rm = rs + P.Nw;
  T* S = ws.row_acc.reserve(static_cast<size_t>(N * W + P.Nw));
  T* z = S + N * W;

  // Valid rows/columns and the uniform log marginals over them (reference._log_marginal).
  int64_t n_rows = 0, n_cols = 0;
  for (int64_t i = 0; i < N; ++i)
    if (row_mask == nullptr || row_mask[i]) rows[n_rows++] = static_cast<int32_t>(i);
  for (int64_t j = 0; j < M; ++j) n_cols += (col_mask == nullptr || col_mask[j]) ? 1 : 0;
  P.rows = rows;
  P.n_rows = n_rows;
  const T log_mu = static_cast<T>(-std::log(static_cast<double>(n_rows)));
  const T log_nu = static_cast<T>(-std::log(static_cast<double>(n_cols)));
  for (int64_t i = 0; i < P.Nw; ++i) {
    const bool ok = i < N && (row_mask == nullptr || row_mask[i]);
    P.row_valid[i] = ok ? T(1) : T(0);
    P.log_mu[i] = ok ? log_mu : T(0);
    lu[0][i] = lu[1][i] = T(0);
  }
  for (int64_t j = 0; j < P.Mw; ++j) {
    const bool ok = j < M && (col_mask == nullptr || col_mask[j]);
    P.col_valid[j] = ok ? T(1) : T(0);
    P.log_nu[j] = ok ? log_nu : T(0);
    lv[0][j] = lv[1][j] = T(0);
  }

  // Range of the valid costs (decides the iteration; cmin anchors the scaling kernel at 1).
  const int64_t m_full = M / W * W;
  V lo = simd::splat(inf), hi = simd::splat(ninf);
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* crow = cost + rows[r] * cost_stride;
    for (int64_t j = 0; j < P.Mw; j += W) {
      const V c = j < m_full ? simd::load(crow + j) : simd::load_partial(crow + j, M - j);
      const IVec<T> ok = valid_lanes(P.col_valid + j);
      lo = simd::vmin<T>(lo, simd::select<T>(ok, c, simd::splat(inf)));
      hi = simd::vmax<T>(hi, simd::select<T>(ok, c, simd::splat(ninf)));
    }
  }
  const T cmin = simd::hmin<T>(lo), cmax = simd::hmax<T>(hi);
  const bool scaling =
      opt.path == SinkhornPath::kScaling ||
      (opt.path == SinkhornPath::kAuto &&
       scaling_domain_is_safe<T>(static_cast<double>(cmax) - static_cast<double>(cmin), opt.eps, N, M));
  const T eps = static_cast<T>(opt.eps);

  const KernelStorage storage = resolve_kernel_storage<T>(
      opt.storage, scaling, static_cast<double>(cmax) - static_cast<double>(cmin), opt.eps, opt.tau);

  SinkhornResult result;
  result.scaling = scaling;
  result.storage = storage;
  int final_buf;
  if (scaling && storage != KernelStorage::kNative) {
    if constexpr (std::is_same<T, float>::value) {
      // float16: K' * 65504 puts the largest entry at the top of the float16 range, so the smallest
      // (>= exp(-kFloat16MaxRange) * 65504) is still normal; the sums are scaled back through c0.
      const bool fp16 = storage == KernelStorage::kFloat16;
      const float scale = fp16 ? 65504.0f : 1.0f;
      uint16_t* k16 = ws.kernel16.reserve(static_cast<size_t>(N * P.Mw));
      const float inv_eps = static_cast<float>(1.0 / opt.eps);
      for (int64_t i = 0; i < N; ++i) {
        uint16_t* krow = k16 + i * P.Mw;
        if (P.row_valid[i] == 0.0f) {
          std::fill(krow, krow + P.Mw, uint16_t(0));
          continue;
        }
        const float* crow = cost + i * cost_stride;
        for (int64_t j = 0; j < P.Mw; j += W) {
          const V c = j < m_full ? simd::load(crow + j) : simd::load_partial(crow + j, M - j);
          const V k = simd::vexp((cmin - c) * inv_eps) * scale;
          const V kv = simd::select<T>(valid_lanes(P.col_valid + j), k, simd::splat<T>(0));
          if (fp16)
            simd::narrow(reinterpret_cast<simd::FP16*>(krow + j), kv);
          else
            simd::narrow(reinterpret_cast<simd::BF16*>(krow + j), kv);
        }
      }
      const float c0 = cmin / eps + std::log(scale);
      if (fp16)
        final_buf = run_scaling<float, simd::FP16>(P, reinterpret_cast<const simd::FP16*>(k16), opt, c0, lu, lv, z,
                                                   S, rs, result.n_iter);
      else
        final_buf = run_scaling<float, simd::BF16>(P, reinterpret_cast<const simd::BF16*>(k16), opt, c0, lu, lv, z,
                                                   S, rs, result.n_iter);
    } else {
      throw std::logic_error("16-bit kernel storage resolved for a non-float32 problem");
    }
  } else if (scaling) {
    const T inv_eps = static_cast<T>(1.0 / opt.eps);
    for (int64_t i = 0; i < N; ++i) {
      T* krow = P.kernel + i * P.Mw;
      if (P.row_valid[i] == T(0)) {
        std::fill(krow, krow + P.Mw, T(0));
        continue;
      }
      const T* crow = cost + i * cost_stride;
      for (int64_t j = 0; j < P.Mw; j += W) {
        const V c = j < m_full ? simd::load(crow + j) : simd::load_partial(crow + j, M - j);
        const V k = simd::vexp((cmin - c) * inv_eps);
        simd::store(krow + j, simd::select<T>(valid_lanes(P.col_valid + j), k, simd::splat<T>(0)));
      }
    }
    final_buf = run_scaling<T, T>(P, P.kernel, opt, cmin / eps, lu, lv, z, S, rs, result.n_iter);
  } else {
    for (int64_t i = 0; i < N; ++i) {
      T* krow = P.kernel + i * P.Mw;
      if (P.row_valid[i] == T(0)) {
        std::fill(krow, krow + P.Mw, ninf);
        continue;
      }
      const T* crow = cost + i * cost_stride;
      for (int64_t j = 0; j < P.Mw; j += W) {
        const V c = j < m_full ? simd::load(crow + j) : simd::load_partial(crow + j, M - j);
        simd::store(krow + j, simd::select<T>(valid_lanes(P.col_valid + j), -c / eps, simd::splat(ninf)));
      }
    }
    final_buf = run_log<T>(P, opt, lu, lv, rs, rm, result.n_iter);
  }

  // plan = exp((log u + log K) + log v), in the reference's order of operations; 0 on padding.
  const T* fu = lu[final_buf];
  const T* fv = lv[final_buf];
  for (int64_t i = 0; i < N; ++i) {
    T* prow = plan + i * plan_stride;
    if (P.row_valid[i] == T(0)) {
      std::fill(prow, prow + M, T(0));
      continue;
    }
    const T* crow = cost + i * cost_stride;
    const V a = simd::splat(fu[i]);
    for (int64_t j = 0; j < P.Mw; j += W) {
      const bool full = j < m_full;
      const V c = full ? simd::load(crow + j) : simd::load_partial(crow + j, M - j);
      V p = simd::vexp((a + (-c / eps)) + simd::load(fv + j));
      p = simd::select<T>(valid_lanes(P.col_valid + j), p, simd::splat<T>(0));
      if (full)
        simd::store(prow + j, p);
      else
        simd::store_partial(prow + j, p, M - j);
    }
  }
  return result;
}

template <typename T>
void sinkhorn_batched(const T* cost, const bool* row_mask, const bool* col_mask, int64_t P, int64_t N, int64_t M,
                      const SinkhornOptions& opt, T* plan, int32_t* n_iter, bool* used_scaling, int num_threads,
                      int8_t* storage) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, P)));
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(nt)
  {
    SinkhornWorkspace<T> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < P; ++p) {
      if (opt.interrupt != nullptr && opt.interrupt->stopped()) continue;  // drain the remaining problems
      try {
        const SinkhornResult r = sinkhorn_solve<T>(cost + p * N * M, M, row_mask ? row_mask + p * N : nullptr,
                                                   col_mask ? col_mask + p * M : nullptr, N, M, opt,
                                                   plan + p * N * M, M, ws);
        if (n_iter) n_iter[p] = r.n_iter;
        if (used_scaling) used_scaling[p] = r.scaling;
        if (storage) storage[p] = static_cast<int8_t>(r.storage);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (opt.interrupt != nullptr && opt.interrupt->stopped()) throw Interrupted();
  if (error) std::rethrow_exception(error);
}

template SinkhornResult sinkhorn_solve<float>(const float*, int64_t, const bool*, const bool*, int64_t, int64_t,
                                              const SinkhornOptions&, float*, int64_t, SinkhornWorkspace<float>&);
template SinkhornResult sinkhorn_solve<double>(const double*, int64_t, const bool*, const bool*, int64_t, int64_t,
                                               const SinkhornOptions&, double*, int64_t,
                                               SinkhornWorkspace<double>&);
template void sinkhorn_batched<float>(const float*, const bool*, const bool*, int64_t, int64_t, int64_t,
                                      const SinkhornOptions&, float*, int32_t*, bool*, int, int8_t*);
template void sinkhorn_batched<double>(const double*, const bool*, const bool*, int64_t, int64_t, int64_t,
                                       const SinkhornOptions&, double*, int32_t*, bool*, int, int8_t*);

}  // namespace pisces
