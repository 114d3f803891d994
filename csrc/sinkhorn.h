// Batched unbalanced Sinkhorn (PISCES Algorithm 3) on given costs: the CPU kernel.
//
// Semantics are exactly those of pisces_fast/ops/reference.py::sinkhorn_unbalanced:
//   log K = -C/eps (padding -inf), log mu / log nu uniform over the valid rows / columns,
//   u before v: log u = tau (log mu - LSE_j(log K + log v)), log v = tau (log nu - LSE_i(log K + log u)),
//   padding potentials stay 0; with tol > 0 a problem stops at the first iteration whose update has
//   max(|dlog u|, |dlog v|) < tol and keeps its *previous* potentials; tol = 0 runs max_iter updates;
//   plan = exp(log u + log K + log v), exactly 0 on padding.
//
// Two numerically equivalent iterations are implemented per problem:
//   * scaling domain: K' = exp(-(C - min C)/eps) is precomputed once; each iteration is two
//     matrix-vector products with max-shifted exponentials of the potentials (no exp in the N x M
//     loop). It is used only when (max C - min C)/eps keeps every row/column sum a normal number
//     with full relative precision (see scaling_domain_is_safe), and gives the log-domain answer to
//     rounding.
//   * log domain: streaming log-sum-exp, for small eps / wide cost ranges.
// This header has no torch dependency: the pybind module and the native ctest both link it.
#pragma once

#include <cstdint>

#include "buffer.h"

namespace pisces {

enum class SinkhornPath : int { kAuto = 0, kScaling = 1, kLog = 2 };

struct SinkhornOptions {
  double eps = 0.05;
  double tau = 0.9;  // rho / (rho + eps), 1 for balanced OT; computed by the caller (reference.unbalanced_exponent)
  int64_t max_iter = 100;
  double tol = 0.0;
  SinkhornPath path = SinkhornPath::kAuto;
};

struct SinkhornResult {
  int32_t n_iter = 0;    // accepted updates (as reference's n_iter)
  bool scaling = false;  // which iteration ran
};

// True when the scaling-domain iteration reproduces the log-domain one to rounding for a problem
// whose valid costs span `cost_range`. Every term of a row sum sum_j K'_ij w_j (K' <= 1, w <= 1 with
// max w = 1) lost to underflow costs at most the smallest normal number, while the sum itself is
// >= exp(-range/eps); requiring 4 * max(N, M) * tiny * exp(range/eps) <= unit roundoff gives
//   range/eps <= (emin_normal - mantissa_bits) * ln 2 - ln(4 max(N, M)),
// i.e. about 61 in float32 (eps >= 0.0165 for a [0, 1] cost at M = 2049) and 662 in float64.
template <typename T>
bool scaling_domain_is_safe(double cost_range, double eps, int64_t N, int64_t M);

template <typename T>
struct SinkhornWorkspace {
  AlignedBuffer<T> kernel;  // N x Mw: K' (scaling) or log K (log domain)
  AlignedBuffer<T> lu[2], lv[2];
  AlignedBuffer<T> log_mu, log_nu, col_valid, row_valid, row_sums, row_acc;
  AlignedBuffer<int32_t> valid_rows;
};

// One problem. cost/plan rows are `cost_stride`/`plan_stride` elements apart (>= M); masks may be
// null (all valid) and must mark >= 1 valid row and column. Writes all N x M plan entries.
template <typename T>
SinkhornResult sinkhorn_solve(const T* cost, int64_t cost_stride, const bool* row_mask, const bool* col_mask,
                              int64_t N, int64_t M, const SinkhornOptions& opt, T* plan, int64_t plan_stride,
                              SinkhornWorkspace<T>& ws);

// P problems of (N, M), contiguous; masks (P, N) / (P, M) or null. Problems are distributed over
// num_threads OpenMP threads; each problem is solved start to finish by one thread, so the result
// does not depend on the thread count.
template <typename T>
void sinkhorn_batched(const T* cost, const bool* row_mask, const bool* col_mask, int64_t P, int64_t N, int64_t M,
                      const SinkhornOptions& opt, T* plan, int32_t* n_iter, bool* used_scaling, int num_threads);

}  // namespace pisces
