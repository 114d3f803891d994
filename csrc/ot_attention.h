// Fused OT-attention forward (and its backward) on the CPU: scores -> softmax -> tau/pi -> the three cost terms with
// their range normalization -> Sinkhorn -> fusion -> A~ V, one (batch, head) problem per thread,
// every N x M intermediate in that thread's cache-resident scratch.
//
// Semantics are those of pisces_fast/ops/reference.py::ot_attention (and spatiotemporal_cost,
// _range_normalize with DEGENERATE_RANGE, fuse_attention): padded query rows output 0 and carry no
// plan mass; padded keys get no attention and no plan mass. No torch dependency.
#pragma once

#include <cstdint>

#include "buffer.h"
#include "sinkhorn.h"

namespace pisces {

// A component whose valid range is <= this fraction of its magnitude (at least 1) is constant up
// to rounding and contributes 0 (reference.DEGENERATE_RANGE).
constexpr double kDegenerateRange = 1e-6;

struct OTAttentionOptions {
  double gamma = 0.2;
  double eta = 0.2;
  double fuse_eps = 1e-8;
  double scale = 0.125;
  SinkhornOptions sinkhorn;
};

template <typename T>
struct OTAttentionWorkspace {
  AlignedBuffer<T> qpad, gpad, k_block, v_block, attn, cost, grad, out_acc, col_data, row_data;
  SinkhornWorkspace<T> sinkhorn;
};

// One problem: q (N, D), k (M, D), v (M, Dv), frame_idx (M), coords (M, 2), all contiguous;
// row_mask (N) / col_mask (M) may be null. Writes out (N, Dv) and plan (N, M), and, when row_stats
// (N, 2) is given, each row's (log-sum-exp of the scaled scores over real keys, sum of the fused
// (A + fe)(P + fe)) for the backward ((0, 1) on padded rows).
template <typename T>
SinkhornResult ot_attention_solve(const T* q, const T* k, const T* v, const T* frame_idx, const T* coords,
                                  const bool* row_mask, const bool* col_mask, int64_t N, int64_t M, int64_t D,
                                  int64_t Dv, const OTAttentionOptions& opt, T* out, T* plan,
                                  OTAttentionWorkspace<T>& ws, T* row_stats = nullptr);

// B x H problems; key_mask (B, M) and query_mask (B, N) are shared by the heads (or null).
template <typename T>
void ot_attention_batched(const T* q, const T* k, const T* v, const T* frame_idx, const T* coords,
                          const bool* key_mask, const bool* query_mask, int64_t B, int64_t H, int64_t N, int64_t M,
                          int64_t D, int64_t Dv, const OTAttentionOptions& opt, T* out, T* plan, int32_t* n_iter,
                          bool* used_scaling, int num_threads, T* row_stats = nullptr);

// Gradients of `out` w.r.t. q, k, v with the plan held fixed (it is a detached prior): the
// reference's autograd graph written out, recomputing A from q, k. One problem; grad_out (N, Dv);
// writes dq (N, D), dk (M, D), dv (M, Dv). Padded query rows get 0 gradient and contribute none.
// With the forward's row_stats (N, 2), A = exp(s - lse) and F = (A + fe)(P + fe) / Z come out of one
// pass (no max / sum passes), as the Triton backward does; without, they are recomputed from scratch.
template <typename T>
void ot_attention_backward_solve(const T* q, const T* k, const T* v, const T* plan, const T* grad_out,
                                 const bool* row_mask, const bool* col_mask, int64_t N, int64_t M, int64_t D,
                                 int64_t Dv, double scale, double fuse_eps, T* dq, T* dk, T* dv,
                                 OTAttentionWorkspace<T>& ws, const T* row_stats = nullptr);

template <typename T>
void ot_attention_backward_batched(const T* q, const T* k, const T* v, const T* plan, const T* grad_out,
                                   const bool* key_mask, const bool* query_mask, int64_t B, int64_t H, int64_t N,
                                   int64_t M, int64_t D, int64_t Dv, double scale, double fuse_eps, T* dq, T* dk,
                                   T* dv, int num_threads, const T* row_stats = nullptr);

}  // namespace pisces
