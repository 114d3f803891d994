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
//
// 16-bit kernel storage (float32 inputs, scaling domain only): K' is stored in bfloat16 or float16
// (float16 scaled by 65504 so every entry of a range/eps <= kFloat16MaxRange problem is a normal
// number), widened to float32 on load; sums, potentials and the plan stay float32. Each stored entry
// carries a relative error <= u (2^-8 bf16, 2^-11 fp16: round-to-nearest), so every log row/column
// sum moves by <= delta = -log(1 - u), and the tau-contraction of the iteration bounds every
// potential's error by tau delta / (1 - tau) and each plan entry's relative error by
// exp(2 tau delta / (1 - tau)) - 1 (kernel16_plan_error_bound). kAuto takes float16 only when the
// problem fits its range and that bound is <= kAuto16PlanRtol. See docs/numerics.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>

#include "buffer.h"

namespace pisces {

enum class SinkhornPath : int { kAuto = 0, kScaling = 1, kLog = 2 };

// How the scaling-domain kernel matrix is stored. kNative = the input's precision.
enum class KernelStorage : int { kAuto = 0, kNative = 1, kBFloat16 = 2, kFloat16 = 3 };

// float16: K' in (exp(-range/eps), 1] times 65504 stays >= 2^-14 (the smallest normal float16) iff
// range/eps <= ln(65504 * 2^14) = 20.79; the margin keeps a rounded-up 65504 finite.
constexpr double kFloat16MaxRange = 20.79;
// The documented tolerance under which kAuto may store the kernel in 16 bits: the a-priori bound on
// every plan entry's relative error (the measured errors are 10-100x below it, docs/numerics.md).
constexpr double kAuto16PlanRtol = 1e-2;

// exp(2 tau delta / (1 - tau)) - 1 with delta = -log(1 - u) for the storage's unit roundoff u
// (infinite for tau >= 1: balanced OT has no contraction to bound it with; 0 for kNative).
double kernel16_plan_error_bound(double tau, KernelStorage storage);

// Cooperative cancellation (Ctrl-C). The thread that constructs it (the caller of the batched
// kernels) calls `poll` at most every `interval`; once poll returns true, every thread stops at its
// next iteration and the batched kernels throw Interrupted. Other threads only read the flag.
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "interrupted"; }
};

class Interrupter {
 public:
  Interrupter(bool (*poll)(void*), void* ctx, std::chrono::milliseconds interval = std::chrono::milliseconds(50))
      : poll_(poll), ctx_(ctx), owner_(std::this_thread::get_id()), interval_(interval),
        next_(std::chrono::steady_clock::now() + interval) {}
  // True once an interrupt was seen; the owner thread polls when the interval has passed.
  bool stop() {
    if (stop_.load(std::memory_order_relaxed)) return true;
    if (poll_ == nullptr || std::this_thread::get_id() != owner_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) return false;
    next_ = now + interval_;
    if (poll_(ctx_)) stop_.store(true, std::memory_order_relaxed);
    return stop_.load(std::memory_order_relaxed);
  }
  bool stopped() const { return stop_.load(std::memory_order_relaxed); }

 private:
  bool (*poll_)(void*);
  void* ctx_;
  std::thread::id owner_;
  std::chrono::milliseconds interval_;
  std::chrono::steady_clock::time_point next_;
  std::atomic<bool> stop_{false};
};

struct SinkhornOptions {
  double eps = 0.05;
  double tau = 0.9;  // rho / (rho + eps), 1 for balanced OT; computed by the caller (reference.unbalanced_exponent)
  int64_t max_iter = 100;
  double tol = 0.0;
  SinkhornPath path = SinkhornPath::kAuto;
  KernelStorage storage = KernelStorage::kNative;  // kBFloat16 / kFloat16 need T = float
  Interrupter* interrupt = nullptr;                // optional
};

struct SinkhornResult {
  int32_t n_iter = 0;    // accepted updates (as reference's n_iter)
  bool scaling = false;  // which iteration ran
  KernelStorage storage = KernelStorage::kNative;  // how the scaling kernel was stored (kNative in the log domain)
};

// The storage a problem with this valid cost range gets (kAuto resolved), given the iteration it
// runs. Throws std::invalid_argument when a requested 16-bit storage cannot be honoured (log domain,
// float64, or a float16 range overflow).
template <typename T>
KernelStorage resolve_kernel_storage(KernelStorage requested, bool scaling, double cost_range, double eps,
                                     double tau);

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
  AlignedBuffer<uint16_t> kernel16;  // N x Mw: K' in bfloat16 / float16 (16-bit storage)
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
// does not depend on the thread count. storage (optional, P) receives each problem's KernelStorage.
// Throws Interrupted when opt.interrupt fired.
template <typename T>
void sinkhorn_batched(const T* cost, const bool* row_mask, const bool* col_mask, int64_t P, int64_t N, int64_t M,
                      const SinkhornOptions& opt, T* plan, int32_t* n_iter, bool* used_scaling, int num_threads,
                      int8_t* storage = nullptr);

}  // namespace pisces
