// Fused OT-attention forward (see ot_attention.h); reference.py::ot_attention is the specification.
#include "ot_attention.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>

#include "simd.h"

namespace pisces {

using simd::IVec;
using simd::Traits;
using simd::Vec;

namespace {

constexpr int kRowBlock = 4;   // register tile rows of both GEMMs
constexpr int kColVecs = 4;    // register tile width (vectors) of both GEMMs
constexpr int64_t kVRows = 64;  // keys per V block (64 x 64 fp32 = 16 KB in L1)

// G[r0..r0+3, j0..j0+4W) = q[r0..r0+3] . kT, kT is D x 4W (zero-padded keys).
template <typename T>
PISCES_INLINE void qk_tile(const T* q, int64_t q_stride, int64_t D, const T* kT, T* g, int64_t g_stride) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  V acc[kRowBlock][kColVecs];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < kColVecs; ++c) acc[r][c] = simd::splat<T>(0);
  for (int64_t d = 0; d < D; ++d) {
    V b[kColVecs];
    for (int c = 0; c < kColVecs; ++c) b[c] = simd::load(kT + d * kColVecs * W + c * W);
    for (int r = 0; r < kRowBlock; ++r) {
      const V a = simd::splat(q[r * q_stride + d]);
      for (int c = 0; c < kColVecs; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < kColVecs; ++c) simd::store(g + r * g_stride + c * W, acc[r][c]);
}

// O[r0..r0+3, c0..c0+NC W) += F[r0..r0+3, j-block] . Vblock[:, c0..]
template <typename T, int NC>
PISCES_INLINE void fv_tile(const T* f, int64_t f_stride, const T* vb, int64_t vb_stride, int64_t jlen, T* o,
                           int64_t o_stride) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  V acc[kRowBlock][NC];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = simd::load(o + r * o_stride + c * W);
  for (int64_t j = 0; j < jlen; ++j) {
    V b[NC];
    for (int c = 0; c < NC; ++c) b[c] = simd::load(vb + j * vb_stride + c * W);
    for (int r = 0; r < kRowBlock; ++r) {
      const V a = simd::splat(f[r * f_stride + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NC; ++c) simd::store(o + r * o_stride + c * W, acc[r][c]);
}

// Min-max normalization of one cost component, as reference._range_normalize.
template <typename T>
struct RangeNorm {
  T lo = 0, inv_span = 0;  // degenerate: inv_span = 0 and lo = 0 -> contributes exactly 0
  static RangeNorm make(T lo, T hi) {
    RangeNorm n;
    const T span = hi - lo;
    const T scale = std::max(std::max(std::fabs(hi), std::fabs(lo)), T(1));
    if (span <= static_cast<T>(kDegenerateRange) * scale) return n;
    n.lo = lo;
    n.inv_span = T(1) / span;
    return n;
  }
  PISCES_INLINE Vec<T> operator()(Vec<T> x) const { return (x - lo) * inv_span; }
};


// out[N4 x Ma] = a[N4 x Da] . b[M x Da]^T (zero columns past M), tile by tile through a transposed
// copy of b's rows (W x W register transposes). a's rows are a_stride apart, b's Da. With
// b_inv_norm, also 1 / max(|b_j|, 1e-12).
template <typename T>
void gemm_abt(const T* a, int64_t a_stride, int64_t N4, int64_t Da, const T* b, int64_t M, int64_t Ma, T* bT, T* out,
              T* b_inv_norm) {
  constexpr int W = Traits<T>::W;
  constexpr int64_t KB = kColVecs * W;
  typedef Vec<T> V;
  for (int64_t j0 = 0; j0 < Ma; j0 += KB) {
    // bT[d][jj] = b[j0 + jj][d] (zeros past M and Da).
    for (int64_t jt = 0; jt < KB; jt += W) {
      for (int64_t d0 = 0; d0 < Da; d0 += W) {
        V tile[W];
        const int64_t dn = std::min<int64_t>(W, Da - d0);
        for (int r = 0; r < W; ++r) {
          const int64_t j = j0 + jt + r;
          const T* src = b + j * Da + d0;
          tile[r] = j >= M ? simd::splat<T>(0) : (dn == W ? simd::load(src) : simd::load_partial(src, dn));
        }
        simd::transpose(tile);
        for (int64_t dd = 0; dd < dn; ++dd) simd::store(bT + (d0 + dd) * KB + jt, tile[dd]);
      }
    }
    if (b_inv_norm != nullptr) {
      for (int64_t c = 0; c < KB; c += W) {
        V ss = simd::splat<T>(0);
        for (int64_t d = 0; d < Da; ++d) {
          const V x = simd::load(bT + d * KB + c);
          ss += x * x;
        }
        V nrm = simd::splat<T>(0);
        for (int l = 0; l < W; ++l) nrm[l] = std::sqrt(ss[l]);
        simd::store(b_inv_norm + j0 + c, T(1) / simd::vmax<T>(nrm, simd::splat<T>(T(1e-12))));
      }
    }
    for (int64_t r0 = 0; r0 < N4; r0 += kRowBlock) qk_tile<T>(a + r0 * a_stride, a_stride, Da, bT, out + r0 * Ma + j0, Ma);
  }
}

// o[N4 x Dxp] = f[N4 x Ma] . x[M x Dx] (f is 0 past M). x is read in place when Dx % W == 0,
// else through zero-padded blocks in xb (kVRows x Dxp).
template <typename T>
void gemm_fx(const T* f, int64_t N4, int64_t Ma, const T* x, int64_t M, int64_t Dx, T* xb, T* o) {
  constexpr int W = Traits<T>::W;
  const int64_t Dxp = round_up(Dx, W);
  const int64_t nvc = Dxp / W;
  std::fill(o, o + N4 * Dxp, T(0));
  for (int64_t j0 = 0; j0 < M; j0 += kVRows) {
    const int64_t jlen = std::min<int64_t>(kVRows, M - j0);
    const T* src = x + j0 * Dx;
    if (Dx != Dxp) {
      for (int64_t jj = 0; jj < jlen; ++jj) {
        T* dst = xb + jj * Dxp;
        std::copy(x + (j0 + jj) * Dx, x + (j0 + jj + 1) * Dx, dst);
        std::fill(dst + Dx, dst + Dxp, T(0));
      }
      src = xb;
    }
    for (int64_t r0 = 0; r0 < N4; r0 += kRowBlock) {
      const T* fr = f + r0 * Ma + j0;
      T* orow = o + r0 * Dxp;
      int64_t c = 0;
      for (; c + kColVecs <= nvc; c += kColVecs)
        fv_tile<T, kColVecs>(fr, Ma, src + c * W, Dxp, jlen, orow + c * W, Dxp);
      switch (nvc - c) {
        case 1: fv_tile<T, 1>(fr, Ma, src + c * W, Dxp, jlen, orow + c * W, Dxp); break;
        case 2: fv_tile<T, 2>(fr, Ma, src + c * W, Dxp, jlen, orow + c * W, Dxp); break;
        case 3: fv_tile<T, 3>(fr, Ma, src + c * W, Dxp, jlen, orow + c * W, Dxp); break;
        default: break;
      }
    }
  }
}

// out[j, :Dx] = sum_i f[i, j] y[i, :] for j < M: f is N4 x Ma, y is N4 x Dxp (zero-padded rows/cols).
template <typename T, int NC>
PISCES_INLINE void fty_tile(const T* f, int64_t N4, int64_t Ma, int64_t j0, const T* y, int64_t Dxp, int64_t c0,
                            int64_t M, int64_t Dx, T* out) {
  constexpr int W = Traits<T>::W;
  typedef Vec<T> V;
  V acc[kRowBlock][NC];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = simd::splat<T>(0);
  for (int64_t i = 0; i < N4; ++i) {
    V b[NC];
    for (int c = 0; c < NC; ++c) b[c] = simd::load(y + i * Dxp + c0 + c * W);
    const T* fr = f + i * Ma + j0;
    for (int r = 0; r < kRowBlock; ++r) {
      const V a = simd::splat(fr[r]);
      for (int c = 0; c < NC; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < kRowBlock && j0 + r < M; ++r)
    for (int c = 0; c < NC; ++c) {
      const int64_t col = c0 + c * W;
      if (col >= Dx) break;
      T* dst = out + (j0 + r) * Dx + col;
      if (col + W <= Dx)
        simd::store(dst, acc[r][c]);
      else
        simd::store_partial(dst, acc[r][c], Dx - col);
    }
}

template <typename T>
void gemm_fty(const T* f, int64_t N4, int64_t Ma, const T* y, int64_t Dx, int64_t M, T* out) {
  constexpr int W = Traits<T>::W;
  const int64_t Dxp = round_up(Dx, W);
  const int64_t nvc = Dxp / W;
  for (int64_t j0 = 0; j0 < M; j0 += kRowBlock) {
    int64_t c = 0;
    for (; c + kColVecs <= nvc; c += kColVecs) fty_tile<T, kColVecs>(f, N4, Ma, j0, y, Dxp, c * W, M, Dx, out);
    switch (nvc - c) {
      case 1: fty_tile<T, 1>(f, N4, Ma, j0, y, Dxp, c * W, M, Dx, out); break;
      case 2: fty_tile<T, 2>(f, N4, Ma, j0, y, Dxp, c * W, M, Dx, out); break;
      case 3: fty_tile<T, 3>(f, N4, Ma, j0, y, Dxp, c * W, M, Dx, out); break;
      default: break;
    }
  }
}

// Copy of x[n x d] into xp[n4 x round_up(d, W)], zero rows past n (and where keep[i] is false when
// keep is given) and zero columns past d.
template <typename T>
void pad_rows(const T* x, int64_t n, int64_t d, int64_t n4, const bool* keep, T* xp) {
  const int64_t dp = round_up(d, Traits<T>::W);
  for (int64_t i = 0; i < n4; ++i) {
    T* dst = xp + i * dp;
    if (i < n && (keep == nullptr || keep[i])) {
      std::copy(x + i * d, x + (i + 1) * d, dst);
      std::fill(dst + d, dst + dp, T(0));
    } else {
      std::fill(dst, dst + dp, T(0));
    }
  }
}

}  // namespace

template <typename T>
SinkhornResult ot_attention_solve(const T* q, const T* k, const T* v, const T* frame_idx, const T* coords,
                                  const bool* row_mask, const bool* col_mask, int64_t N, int64_t M, int64_t D,
                                  int64_t Dv, const OTAttentionOptions& opt, T* out, T* plan,
                                  OTAttentionWorkspace<T>& ws, T* row_stats) {
  constexpr int W = Traits<T>::W;
  constexpr int64_t KB = kColVecs * W;  // keys per q.k tile
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T inf = std::numeric_limits<T>::infinity();

  const int64_t N4 = round_up(N, kRowBlock);
  const int64_t Ma = round_up(M, KB);
  const int64_t Dvp = round_up(Dv, W);

  T* qp = ws.qpad.reserve(static_cast<size_t>(N4 * D));
  T* kT = ws.k_block.reserve(static_cast<size_t>(D * KB));
  T* vb = ws.v_block.reserve(static_cast<size_t>(kVRows * Dvp));
  T* A = ws.attn.reserve(static_cast<size_t>(N4 * Ma));  // raw q.k, then A, then the fused A~
  T* C = ws.cost.reserve(static_cast<size_t>(N * Ma));
  T* O = ws.out_acc.reserve(static_cast<size_t>(N4 * Dvp));
  T* cols = ws.col_data.reserve(static_cast<size_t>(5 * Ma));
  T* rk = cols;           // 1 / max(|k_j|, 1e-12)
  T* t = cols + Ma;       // frame index
  T* sx = cols + 2 * Ma;  // coords (row, col)
  T* sy = cols + 3 * Ma;
  T* cv = cols + 4 * Ma;  // 1 = real key
  T* rows = ws.row_data.reserve(static_cast<size_t>(4 * N4));
  T* rq = rows;           // 1 / max(|q_i|, 1e-12)
  T* tau = rows + N4;     // expected frame index under A
  T* pix = rows + 2 * N4;
  T* piy = rows + 3 * N4;

  auto row_ok = [&](int64_t i) { return row_mask == nullptr || row_mask[i]; };

  for (int64_t j = 0; j < Ma; ++j) {
    const bool in = j < M;
    t[j] = in ? frame_idx[j] : T(0);
    sx[j] = in ? coords[2 * j] : T(0);
    sy[j] = in ? coords[2 * j + 1] : T(0);
    cv[j] = (in && (col_mask == nullptr || col_mask[j])) ? T(1) : T(0);
  }
  for (int64_t i = 0; i < N4; ++i) {
    T ss = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T x = i < N ? q[i * D + d] : T(0);
      qp[i * D + d] = x;
      ss += x * x;
    }
    rq[i] = T(1) / std::max(std::sqrt(ss), T(1e-12));
  }

  // 1. raw scores q.k (and key norms).
  gemm_abt<T>(qp, D, N4, D, k, M, Ma, kT, A, rk);

  // 2. per real query row: semantic cost from the raw scores, softmax, tau/pi, component ranges.
  const T scale = static_cast<T>(opt.scale);
  V sem_lo = simd::splat(inf), sem_hi = simd::splat(ninf);
  V tem_lo = sem_lo, tem_hi = sem_hi, spa_lo = sem_lo, spa_hi = sem_hi;
  for (int64_t i = 0; i < N; ++i) {
    if (!row_ok(i)) continue;
    T* a = A + i * Ma;
    T* c = C + i * Ma;
    const V rqi = simd::splat(rq[i]);
    V mx = simd::splat(ninf);
    for (int64_t j = 0; j < Ma; j += W) {
      const V g = simd::load(a + j);
      const IVec<T> ok = simd::load(cv + j) != T(0);
      const V sem = T(1) - g * rqi * simd::load(rk + j);
      sem_lo = simd::vmin<T>(sem_lo, simd::select<T>(ok, sem, simd::splat(inf)));
      sem_hi = simd::vmax<T>(sem_hi, simd::select<T>(ok, sem, simd::splat(ninf)));
      simd::store(c + j, sem);
      const V s = simd::select<T>(ok, g * scale, simd::splat(ninf));
      simd::store(a + j, s);
      mx = simd::vmax<T>(mx, s);
    }
    const T m = simd::hmax<T>(mx);
    V sum = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) {
      const V e = simd::vexp(simd::load(a + j) - m);
      simd::store(a + j, e);
      sum += e;
    }
    const T total = simd::hsum<T>(sum);
    if (row_stats != nullptr) row_stats[2 * i] = m + simd::slog<T>(total);
    const T inv = T(1) / total;
    V st = simd::splat<T>(0), sxv = st, syv = st;
    for (int64_t j = 0; j < Ma; j += W) {
      const V p = simd::load(a + j) * inv;
      simd::store(a + j, p);
      st += p * simd::load(t + j);
      sxv += p * simd::load(sx + j);
      syv += p * simd::load(sy + j);
    }
    tau[i] = simd::hsum<T>(st);
    pix[i] = simd::hsum<T>(sxv);
    piy[i] = simd::hsum<T>(syv);
    const V ti = simd::splat(tau[i]), px = simd::splat(pix[i]), py = simd::splat(piy[i]);
    for (int64_t j = 0; j < Ma; j += W) {
      const IVec<T> ok = simd::load(cv + j) != T(0);
      const V tem = simd::vabs<T>(ti - simd::load(t + j));
      const V dx = px - simd::load(sx + j), dy = py - simd::load(sy + j);
      V d2 = dx * dx + dy * dy;
      V spa;
      for (int l = 0; l < W; ++l) spa[l] = std::sqrt(d2[l]);
      tem_lo = simd::vmin<T>(tem_lo, simd::select<T>(ok, tem, simd::splat(inf)));
      tem_hi = simd::vmax<T>(tem_hi, simd::select<T>(ok, tem, simd::splat(ninf)));
      spa_lo = simd::vmin<T>(spa_lo, simd::select<T>(ok, spa, simd::splat(inf)));
      spa_hi = simd::vmax<T>(spa_hi, simd::select<T>(ok, spa, simd::splat(ninf)));
    }
  }
  const auto n_sem = RangeNorm<T>::make(simd::hmin<T>(sem_lo), simd::hmax<T>(sem_hi));
  const auto n_tem = RangeNorm<T>::make(simd::hmin<T>(tem_lo), simd::hmax<T>(tem_hi));
  const auto n_spa = RangeNorm<T>::make(simd::hmin<T>(spa_lo), simd::hmax<T>(spa_hi));

  // 3. C = norm(norm(sem) + gamma norm(tem) + eta norm(spa)) over the real entries.
  const T gamma = static_cast<T>(opt.gamma), eta = static_cast<T>(opt.eta);
  V tot_lo = simd::splat(inf), tot_hi = simd::splat(ninf);
  for (int64_t i = 0; i < N; ++i) {
    if (!row_ok(i)) continue;
    T* c = C + i * Ma;
    const V ti = simd::splat(tau[i]), px = simd::splat(pix[i]), py = simd::splat(piy[i]);
    for (int64_t j = 0; j < Ma; j += W) {
      const IVec<T> ok = simd::load(cv + j) != T(0);
      const V tem = simd::vabs<T>(ti - simd::load(t + j));
      const V dx = px - simd::load(sx + j), dy = py - simd::load(sy + j);
      const V d2 = dx * dx + dy * dy;
      V spa;
      for (int l = 0; l < W; ++l) spa[l] = std::sqrt(d2[l]);
      const V total = (n_sem(simd::load(c + j)) + gamma * n_tem(tem)) + eta * n_spa(spa);
      tot_lo = simd::vmin<T>(tot_lo, simd::select<T>(ok, total, simd::splat(inf)));
      tot_hi = simd::vmax<T>(tot_hi, simd::select<T>(ok, total, simd::splat(ninf)));
      simd::store(c + j, total);
    }
  }
  const auto n_tot = RangeNorm<T>::make(simd::hmin<T>(tot_lo), simd::hmax<T>(tot_hi));
  for (int64_t i = 0; i < N; ++i) {
    T* c = C + i * Ma;
    if (!row_ok(i)) {
      std::fill(c, c + Ma, T(0));
      continue;
    }
    for (int64_t j = 0; j < Ma; j += W) {
      const IVec<T> ok = simd::load(cv + j) != T(0);
      simd::store(c + j, simd::select<T>(ok, n_tot(simd::load(c + j)), simd::splat<T>(0)));
    }
  }

  // 4. the plan.
  const SinkhornResult result =
      sinkhorn_solve<T>(C, Ma, row_mask, col_mask, N, M, opt.sinkhorn, plan, M, ws.sinkhorn);

  // 5. A~ = norm((A + fe)(P + fe)) on real keys, then out = A~ V (padded query rows: 0).
  const T fe = static_cast<T>(opt.fuse_eps);
  const int64_t m_full = M / W * W;
  for (int64_t i = 0; i < N4; ++i) {
    T* a = A + i * Ma;
    if (i >= N || !row_ok(i)) {
      std::fill(a, a + Ma, T(0));
      if (row_stats != nullptr && i < N) {
        row_stats[2 * i] = T(0);
        row_stats[2 * i + 1] = T(1);
      }
      continue;
    }
    const T* p = plan + i * M;
    V z = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) {
      const V pj = j < m_full ? simd::load(p + j) : (j < M ? simd::load_partial(p + j, M - j) : simd::splat<T>(0));
      const IVec<T> ok = simd::load(cv + j) != T(0);
      const V f = simd::select<T>(ok, (simd::load(a + j) + fe) * (pj + fe), simd::splat<T>(0));
      simd::store(a + j, f);
      z += f;
    }
    const T zsum = simd::hsum<T>(z);
    if (row_stats != nullptr) row_stats[2 * i + 1] = zsum;
    const T inv = T(1) / zsum;
    for (int64_t j = 0; j < Ma; j += W) simd::store(a + j, simd::load(a + j) * inv);
  }
  gemm_fx<T>(A, N4, Ma, v, M, Dv, vb, O);
  for (int64_t i = 0; i < N; ++i) {
    if (row_ok(i))
      std::copy(O + i * Dvp, O + i * Dvp + Dv, out + i * Dv);
    else
      std::fill(out + i * Dv, out + (i + 1) * Dv, T(0));
  }
  return result;
}

template <typename T>
void ot_attention_batched(const T* q, const T* k, const T* v, const T* frame_idx, const T* coords,
                          const bool* key_mask, const bool* query_mask, int64_t B, int64_t H, int64_t N, int64_t M,
                          int64_t D, int64_t Dv, const OTAttentionOptions& opt, T* out, T* plan, int32_t* n_iter,
                          bool* used_scaling, int num_threads, T* row_stats) {
  const int64_t P = B * H;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, P)));
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(nt)
  {
    OTAttentionWorkspace<T> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < P; ++p) {
      if (opt.sinkhorn.interrupt != nullptr && opt.sinkhorn.interrupt->stopped()) continue;
      const int64_t b = p / H;
      try {
        const SinkhornResult r = ot_attention_solve<T>(
            q + p * N * D, k + p * M * D, v + p * M * Dv, frame_idx, coords,
            query_mask ? query_mask + b * N : nullptr, key_mask ? key_mask + b * M : nullptr, N, M, D, Dv, opt,
            out + p * N * Dv, plan + p * N * M, ws, row_stats ? row_stats + p * N * 2 : nullptr);
        if (n_iter) n_iter[p] = r.n_iter;
        if (used_scaling) used_scaling[p] = r.scaling;
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (opt.sinkhorn.interrupt != nullptr && opt.sinkhorn.interrupt->stopped()) throw Interrupted();
  if (error) std::rethrow_exception(error);
}


// Backward of out = norm((A + fe)(P + fe)) v with A = softmax(q k^T scale) and P fixed, per problem.
//   F^ = (A + fe)(P + fe) on real keys, Z = sum_j F^, F = F^ / Z, out = F v (padded rows 0);
//   dv = F^T g;  dF = g v^T;  dF^ = (dF - rowsum(dF * F)) / Z;  dA = dF^ (P + fe) on real keys;
//   dS = A (dA - rowsum(dA * A)) scale;  dq = dS k;  dk = dS^T q    (g: grad_out, padded rows 0).
template <typename T>
void ot_attention_backward_solve(const T* q, const T* k, const T* v, const T* plan, const T* grad_out,
                                 const bool* row_mask, const bool* col_mask, int64_t N, int64_t M, int64_t D,
                                 int64_t Dv, double scale_d, double fuse_eps, T* dq, T* dk, T* dv,
                                 OTAttentionWorkspace<T>& ws, const T* row_stats) {
  constexpr int W = Traits<T>::W;
  constexpr int64_t KB = kColVecs * W;
  typedef Vec<T> V;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t N4 = round_up(N, kRowBlock);
  const int64_t Ma = round_up(M, KB);
  const int64_t Dp = round_up(D, W), Dvp = round_up(Dv, W);
  const int64_t Dmax = std::max(Dp, Dvp);

  T* qp = ws.qpad.reserve(static_cast<size_t>(N4 * Dp));       // q, padded (rows and columns)
  T* gp = ws.gpad.reserve(static_cast<size_t>(N4 * Dvp));      // grad_out, padded rows 0
  T* bT = ws.k_block.reserve(static_cast<size_t>(Dmax * KB));
  T* xb = ws.v_block.reserve(static_cast<size_t>(kVRows * Dmax));
  T* A = ws.attn.reserve(static_cast<size_t>(N4 * Ma));
  T* F = ws.cost.reserve(static_cast<size_t>(N4 * Ma));
  T* G = ws.grad.reserve(static_cast<size_t>(N4 * Ma));  // dF, then dA, then dS
  T* O = ws.out_acc.reserve(static_cast<size_t>(N4 * Dp));
  T* cv = ws.col_data.reserve(static_cast<size_t>(Ma));
  T* zr = ws.row_data.reserve(static_cast<size_t>(N4));
  auto row_ok = [&](int64_t i) { return i < N && (row_mask == nullptr || row_mask[i]); };
  for (int64_t j = 0; j < Ma; ++j) cv[j] = (j < M && (col_mask == nullptr || col_mask[j])) ? T(1) : T(0);

  // q rows are not masked for A (as in the forward); grad_out rows of padded queries are 0.
  pad_rows<T>(q, N, D, N4, nullptr, qp);
  pad_rows<T>(grad_out, N, Dv, N4, row_mask, gp);

  // A (real query rows only; other rows stay 0 and drop out of every product below).
  const T scale = static_cast<T>(scale_d), fe = static_cast<T>(fuse_eps);
  gemm_abt<T>(qp, Dp, N4, D, k, M, Ma, bT, A, nullptr);
  for (int64_t i = 0; i < N4; ++i) {
    T* a = A + i * Ma;
    T* f = F + i * Ma;
    if (!row_ok(i)) {
      std::fill(a, a + Ma, T(0));
      std::fill(f, f + Ma, T(0));
      zr[i] = T(1);
      continue;
    }
    const T* p = plan + i * M;
    const int64_t m_full = M / W * W;
    if (row_stats != nullptr) {
      // One pass: A = exp(s - lse), F = (A + fe)(P + fe) / Z with the forward's lse and Z.
      const T lse = row_stats[2 * i], invz = T(1) / row_stats[2 * i + 1];
      zr[i] = row_stats[2 * i + 1];
      for (int64_t j = 0; j < Ma; j += W) {
        const IVec<T> ok = simd::load(cv + j) != T(0);
        const V aj = simd::select<T>(ok, simd::vexp(simd::load(a + j) * scale - lse), simd::splat<T>(0));
        simd::store(a + j, aj);
        const V pj = j < m_full ? simd::load(p + j) : (j < M ? simd::load_partial(p + j, M - j) : simd::splat<T>(0));
        simd::store(f + j, simd::select<T>(ok, (aj + fe) * (pj + fe) * invz, simd::splat<T>(0)));
      }
      continue;
    }
    V mx = simd::splat(ninf);
    for (int64_t j = 0; j < Ma; j += W) {
      const V sc = simd::select<T>(simd::load(cv + j) != T(0), simd::load(a + j) * scale, simd::splat(ninf));
      simd::store(a + j, sc);
      mx = simd::vmax<T>(mx, sc);
    }
    const T m = simd::hmax<T>(mx);
    V sum = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) {
      const V e = simd::vexp(simd::load(a + j) - m);
      simd::store(a + j, e);
      sum += e;
    }
    const T inv = T(1) / simd::hsum<T>(sum);
    V z = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) {
      const V aj = simd::load(a + j) * inv;
      simd::store(a + j, aj);
      const V pj = j < m_full ? simd::load(p + j) : (j < M ? simd::load_partial(p + j, M - j) : simd::splat<T>(0));
      const V fh = simd::select<T>(simd::load(cv + j) != T(0), (aj + fe) * (pj + fe), simd::splat<T>(0));
      simd::store(f + j, fh);
      z += fh;
    }
    zr[i] = simd::hsum<T>(z);
    const T invz = T(1) / zr[i];
    for (int64_t j = 0; j < Ma; j += W) simd::store(f + j, simd::load(f + j) * invz);
  }

  // dv = F^T g.
  gemm_fty<T>(F, N4, Ma, gp, Dv, M, dv);
  // dF = g v^T.
  gemm_abt<T>(gp, Dvp, N4, Dv, v, M, Ma, bT, G, nullptr);
  // dS row by row.
  for (int64_t i = 0; i < N4; ++i) {
    T* g = G + i * Ma;
    if (!row_ok(i)) {
      std::fill(g, g + Ma, T(0));
      continue;
    }
    const T* a = A + i * Ma;
    const T* f = F + i * Ma;
    const T* p = plan + i * M;
    const int64_t m_full = M / W * W;
    V r1 = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) r1 += simd::load(g + j) * simd::load(f + j);
    const T s1 = simd::hsum<T>(r1), invz = T(1) / zr[i];
    V r2 = simd::splat<T>(0);
    for (int64_t j = 0; j < Ma; j += W) {
      const V pj = j < m_full ? simd::load(p + j) : (j < M ? simd::load_partial(p + j, M - j) : simd::splat<T>(0));
      const V da = simd::select<T>(simd::load(cv + j) != T(0), (simd::load(g + j) - s1) * invz * (pj + fe),
                                   simd::splat<T>(0));
      simd::store(g + j, da);
      r2 += da * simd::load(a + j);
    }
    const T s2 = simd::hsum<T>(r2);
    for (int64_t j = 0; j < Ma; j += W)
      simd::store(g + j, simd::load(a + j) * (simd::load(g + j) - s2) * scale);
  }
  // dq = dS k;  dk = dS^T q.
  gemm_fx<T>(G, N4, Ma, k, M, D, xb, O);
  for (int64_t i = 0; i < N; ++i) std::copy(O + i * Dp, O + i * Dp + D, dq + i * D);
  gemm_fty<T>(G, N4, Ma, qp, D, M, dk);
}

template <typename T>
void ot_attention_backward_batched(const T* q, const T* k, const T* v, const T* plan, const T* grad_out,
                                   const bool* key_mask, const bool* query_mask, int64_t B, int64_t H, int64_t N,
                                   int64_t M, int64_t D, int64_t Dv, double scale, double fuse_eps, T* dq, T* dk,
                                   T* dv, int num_threads, const T* row_stats) {
  const int64_t P = B * H;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, P)));
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(nt)
  {
    OTAttentionWorkspace<T> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t b = p / H;
      try {
        ot_attention_backward_solve<T>(q + p * N * D, k + p * M * D, v + p * M * Dv, plan + p * N * M,
                                       grad_out + p * N * Dv, query_mask ? query_mask + b * N : nullptr,
                                       key_mask ? key_mask + b * M : nullptr, N, M, D, Dv, scale, fuse_eps,
                                       dq + p * N * D, dk + p * M * D, dv + p * M * Dv, ws,
                                       row_stats ? row_stats + p * N * 2 : nullptr);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

#define PISCES_INSTANTIATE(T)                                                                                     \
  template SinkhornResult ot_attention_solve<T>(const T*, const T*, const T*, const T*, const T*, const bool*,     \
                                                const bool*, int64_t, int64_t, int64_t, int64_t,                   \
                                                const OTAttentionOptions&, T*, T*, OTAttentionWorkspace<T>&, T*);  \
  template void ot_attention_batched<T>(const T*, const T*, const T*, const T*, const T*, const bool*, const bool*, \
                                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,                      \
                                        const OTAttentionOptions&, T*, T*, int32_t*, bool*, int, T*);          \
  template void ot_attention_backward_batched<T>(const T*, const T*, const T*, const T*, const T*, const bool*,    \
                                                 const bool*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                 double, double, T*, T*, T*, int, const T*);                      \
  template void ot_attention_backward_solve<T>(const T*, const T*, const T*, const T*, const T*, const bool*,      \
                                               const bool*, int64_t, int64_t, int64_t, int64_t, double, double,    \
                                               T*, T*, T*, OTAttentionWorkspace<T>&, const T*);
PISCES_INSTANTIATE(float)
PISCES_INSTANTIATE(double)
#undef PISCES_INSTANTIATE

}  // namespace pisces
