// On-chip Sinkhorn (PISCES Algorithm 3, scaling domain, 16-bit kernel matrix held in shared memory).
//
// Compiled at run time with NVRTC (pisces_fast/ops/cuda/nvrtc.py): no CUDA toolkit is needed beyond the
// NVRTC library that CUDA builds of PyTorch ship, and no header is included (fp16/bf16 conversions are
// inline PTX). The math is that of pisces_fast/ops/triton/sinkhorn.py's `_solve` in its 16-bit scaling
// branch, line for line (the Triton kernel is the reference this one is tested against on the GPU, and
// both against the float64 reference): same domain rule, same fixed row-sum shift, same stopping rule.
//
// Design (one CTA per problem, grid = P; the hardware scheduler hands problems to SMs as CTAs finish):
//   * shared memory: K'' = 65504 exp(-(C - min C)/eps) (float16) or exp(-(C - min C)/eps) (bfloat16),
//     column-major, R rows per column (R = N rounded up to 8, padding rows 0), 16-byte chunks
//     XOR-swizzled per column so a warp's 16-byte loads are free of bank conflicts; log v ping-pong
//     (2 x M float32); per-warp row-sum partials; accepted log u and the row weights; per-warp maxima.
//     40 x 2049 at the paper shape: 181 976 B (cuda/sinkhorn.py: shared_bytes; the kernel traps if given less).
//   * every thread owns the columns j = tid, tid + THREADS, ...: a column's sum over rows (the column
//     update of log v) is thread-local (R FMAs on a column held in registers), and the same registers
//     feed the column's contribution to the next row sums (R FMAs into a per-thread accumulator), so one
//     iteration reads the kernel once from shared memory and nothing from global memory;
//   * the row sums are reduced once per iteration: a warp reduce-scatter (each lane ends with a few rows),
//     then one shared-memory pass across warps; thread i < R owns row i (its log u in registers) and computes
//     the row's new potential and weight, the row warps reduce the two row maxima every thread needs.
//     Three barriers per iteration.
// Global traffic per problem: the cost read twice (range, then the kernel) and the plan written once.
//
// Outputs follow the Triton solver's first pass (PASS_DEFER_LOG): a problem this kernel cannot solve
// (log domain, or float16 range exceeded) gets storage = -1 (deferred) and n_iter = -1, and its plan is
// left to the log-domain pass.

#define FULL_MASK 0xffffffffu

namespace pisces {

constexpr float NEG_BIG = -1.0e30f;
constexpr float LOG_CEIL = 84.0f;                    // sinkhorn.LOG_CEIL_FP32
constexpr float SCALING_BUDGET = 84.0f + 87.3f - 18.5f;  // sinkhorn.SCALING_BUDGET_FP32
constexpr float FLOAT16_SCALE = 65504.0f;
constexpr float LOG_FLOAT16_SCALE = 11.089866488461016f;
constexpr float FLOAT16_MAX_RANGE = 20.79f;
constexpr int STORAGE_BF16 = 2, STORAGE_FP16 = 3, STORAGE_DEFERRED = -1;
// Parameter slots (sinkhorn.P_*).
constexpr int P_TAU = 0, P_INV_EPS = 1, P_TOL = 2, P_SCALING_MAX = 3;

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {  // round to nearest even; f >= 0, finite
  unsigned int bits = __float_as_uint(f);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<unsigned short>(bits >> 16);
}

// The two 16-bit values of a 32-bit word, widened (low half first).
template <bool BF16>
__device__ __forceinline__ void widen2(unsigned int u, float& lo, float& hi) {
  if constexpr (BF16) {
    lo = __uint_as_float(u << 16);
    hi = __uint_as_float(u & 0xFFFF0000u);
  } else {
    lo = half_to_float(static_cast<unsigned short>(u & 0xFFFFu));
    hi = half_to_float(static_cast<unsigned short>(u >> 16));
  }
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Butterfly reduction over the warp: every lane gets the result.
template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int b = 16; b > 0; b >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, b));
  return v;
}

__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp{}); }

// Rows each lane holds after the reduce-scatter of R values (halving while the count is even, one lane
// bit per step, at most 5 steps), and how many lane bits the halving used.
template <int C, int BIT>
struct Scatter {
  static constexpr bool halve = (C % 2 == 0) && BIT < 5;
  static constexpr int count = halve ? Scatter<C / 2, BIT + 1>::count : C;
  static constexpr int bits = halve ? Scatter<C / 2, BIT + 1>::bits : BIT;
};
template <int C>
struct Scatter<C, 5> {
  static constexpr bool halve = false;
  static constexpr int count = C;
  static constexpr int bits = 5;
};

// Warp reduce-scatter of v[0..C): afterwards v[0..count) of a lane holds the warp's sums of rows
// base + [0, count), and lanes that differ only in the bits above `bits` hold the same values.
template <int C, int BIT>
__device__ __forceinline__ void reduce_scatter(float* v, int lane, int& base) {
  if constexpr (Scatter<C, BIT>::halve) {
    constexpr int H = C / 2;
    const bool up = (lane >> BIT) & 1;
#pragma unroll
    for (int k = 0; k < H; ++k) {
      const float send = up ? v[k] : v[k + H];
      const float keep = up ? v[k + H] : v[k];
      v[k] = keep + __shfl_xor_sync(FULL_MASK, send, 1 << BIT);
    }
    if (up) base += H;
    reduce_scatter<H, BIT + 1>(v, lane, base);
  } else {
#pragma unroll
    for (int b = BIT; b < 5; ++b) {
#pragma unroll
      for (int k = 0; k < C; ++k) v[k] += __shfl_xor_sync(FULL_MASK, v[k], 1 << b);
    }
  }
}

__host__ __device__ constexpr int gcd8(int q) { return (q % 8 == 0) ? 8 : (q % 4 == 0) ? 4 : (q % 2 == 0) ? 2 : 1; }
__host__ __device__ constexpr int log2i(int x) { return x <= 1 ? 0 : 1 + log2i(x / 2); }

// The 16-byte chunk q of column j is stored at chunk (j * Q + (q ^ swizzle(j))): eight consecutive columns
// (one shared-memory wavefront of 16-byte loads) then cover the 8 bank groups once each.
template <int Q>
__device__ __forceinline__ int chunk_swizzle(int j) {
  constexpr int D = gcd8(Q);
  constexpr int SHIFT = log2i(8 / D);
  return (j >> SHIFT) & (D - 1);
}

// Block-wide reduction of one float (all threads get the result); `scratch` holds WARPS floats and is free again
// when the call returns.
template <int WARPS, class Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

// One sweep over the thread's columns: for each column its sum against the row weights w (the column
// update), the new log v into g_new (|change| into dv), and the column's contribution to the next row
// sums, acc += column * exp(log v - c_v). FIRST: the initial row sums (weights exp(0) = 1 on every column,
// no column update).
template <int R, int THREADS, bool BF16, bool FIRST>
__device__ __forceinline__ void sweep(const uint4* __restrict__ ks, int M, const float (&w)[R], float a0, float tau,
                                      float c_v, const float* g_old, float* g_new, float& dv, float (&acc)[R]) {
  constexpr int Q = R / 8;
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  for (int j = threadIdx.x; j < M; j += THREADS) {
    const int sw = chunk_swizzle<Q>(j);
    const uint4* col = ks + j * Q;
    float x[R];
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const uint4 u = col[q ^ sw];
      widen2<BF16>(u.x, x[8 * q + 0], x[8 * q + 1]);
      widen2<BF16>(u.y, x[8 * q + 2], x[8 * q + 3]);
      widen2<BF16>(u.z, x[8 * q + 4], x[8 * q + 5]);
      widen2<BF16>(u.w, x[8 * q + 6], x[8 * q + 7]);
    }
    float e;
    if constexpr (FIRST) {
      e = 1.0f;
    } else {
      // Four independent partial sums: the dependent chain is R/4 FMAs, not R.
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < R; ++i) s[i % 4] = fmaf(x[i], w[i], s[i % 4]);
      const float colsum = (s[0] + s[1]) + (s[2] + s[3]);
      const bool cv = colsum > 0.0f;
      const float gn = cv ? a0 - tau * __logf(colsum) : 0.0f;
      const float go = g_old[j];
      g_new[j] = gn;
      dv = fmaxf(dv, fabsf(gn - go));
      e = cv ? __expf(gn - c_v) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = fmaf(x[i], e, acc[i]);
  }
}

// Reduces the threads' row accumulators over the block into part[w * R + i] (warp w's sum of row i): a warp
// reduce-scatter, then one shared-memory store per lane that holds rows. The caller's barrier publishes them.
template <int R, int THREADS>
__device__ __forceinline__ void reduce_rows(float (&acc)[R], float* part) {
  using S = Scatter<R, 0>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int base = 0;
  reduce_scatter<R, 0>(acc, lane, base);
  if ((lane >> S::bits) == 0) {
#pragma unroll
    for (int k = 0; k < S::count; ++k) part[warp * R + base + k] = acc[k];
  }
}

// Row i's total over the warps' partials (threads < R only).
template <int R, int WARPS>
__device__ __forceinline__ float row_total(const float* part, int i) {
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) s += part[w * R + i];
  return s;
}

// Row i's total for row threads (i < R), 1 for the other lanes of the row warps (their log is discarded).
template <int R, int WARPS>
__device__ __forceinline__ float row_tthread_total(const float* part, int i, bool row_thread) {
  return row_thread ? row_total<R, WARPS>(part, i) : 1.0f;
}

// The largest of n floats of shared memory.
template <int n>
__device__ __forceinline__ float max_of(const float* src) {
  float r = src[0];
#pragma unroll
  for (int k = 1; k < n; ++k) r = fmaxf(r, src[k]);
  return r;
}

// n floats of shared memory (16-byte aligned, n % 4 == 0) into registers, as 16-byte loads issued together.
template <int n>
__device__ __forceinline__ void load_vec(const float* src, float (&dst)[n]) {
  static_assert(n % 4 == 0, "whole float4s");
#pragma unroll
  for (int k = 0; k < n / 4; ++k) {
    const float4 v = reinterpret_cast<const float4*>(src)[k];
    dst[4 * k + 0] = v.x;
    dst[4 * k + 1] = v.y;
    dst[4 * k + 2] = v.z;
    dst[4 * k + 3] = v.w;
  }
}

template <int R, int THREADS, bool BF16>
__global__ void __launch_bounds__(THREADS, 1)
sinkhorn_onchip(const float* __restrict__ cost, float* __restrict__ plan, const unsigned char* __restrict__ row_mask,
                const unsigned char* __restrict__ col_mask, const float* __restrict__ params, int* __restrict__ n_iter_out,
                int* __restrict__ storage_out, int N, int M, int max_iter) {
  static_assert(R % 8 == 0 && R >= 8 && R <= 64, "R: rows per column, a multiple of 8, at most 64");
  static_assert(THREADS % 32 == 0 && THREADS / 32 <= 32, "THREADS: whole warps, at most 32");
  static_assert(THREADS >= (R + 31) / 32 * 32, "THREADS: at least one thread per row (the row threads)");
  constexpr int WARPS = THREADS / 32;
  constexpr int W4 = (WARPS + 3) / 4 * 4;
  constexpr int Q = R / 8;
  // Shared memory (every array 16-byte aligned: R % 8 == 0, W4 % 4 == 0; the log v buffer last, as M may be odd).
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ks = reinterpret_cast<uint4*>(smem);                            // M x Q chunks of 8 x 16 bits
  unsigned short* ks16 = reinterpret_cast<unsigned short*>(smem);
  float* part = reinterpret_cast<float*>(smem + static_cast<size_t>(M) * R * 2);  // WARPS x R row partials
  float* f_s = part + WARPS * R;   // accepted log u (written once, for the plan)
  float* w_s = f_s + R;            // the row weights exp(log u - max log u) (0 on padding rows)
  float* scratch = w_s + R;        // W4 floats: per-warp values (block reductions, max |change of log v|)
  float* fmax_s = scratch + W4;    // 4 floats: max log u per row warp, current and next
  float* dmax_s = fmax_s + 4;      // 4 floats: max |change of log u| per row warp
  float* g_buf = dmax_s + 4;       // 2 x M: log v ping-pong

  const int tid = threadIdx.x;
  const long long pid = blockIdx.x;
  {  // The launch must give the layout above its bytes (cuda/sinkhorn.py: shared_bytes): trap, never overrun.
    unsigned int dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (static_cast<size_t>(dynamic_bytes) < reinterpret_cast<unsigned char*>(g_buf + 2 * M) - smem) __trap();
  }
  const float* c = cost + pid * N * M;
  const unsigned char* cm = col_mask ? col_mask + pid * M : nullptr;
  const float tau = params[P_TAU], inv_eps = params[P_INV_EPS], tol = params[P_TOL];
  const float scaling_max = params[P_SCALING_MAX];

  // Row validity as a bit mask (R <= 64), identical in every thread.
  unsigned long long rows = 0ull;
  for (int i = 0; i < N; ++i) {
    if (row_mask == nullptr || row_mask[pid * N + i] != 0) rows |= 1ull << i;
  }
  const float n_rows = static_cast<float>(__popcll(rows));
  const float log_mu = -logf(n_rows);

  // Pre-pass: valid columns, the cost's range over the valid entries, log v = 0. Rows outer (uniform branch),
  // columns inner (coalesced; independent loads the compiler can keep in flight together).
  float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000), cols = 0.0f;
  for (int j = tid; j < M; j += THREADS) {
    cols += (cm == nullptr || cm[j] != 0) ? 1.0f : 0.0f;
    g_buf[j] = 0.0f;
  }
  for (int i = 0; i < N; ++i) {
    if (!((rows >> i) & 1ull)) continue;
    const float* ci = c + static_cast<long long>(i) * M;
#pragma unroll 8
    for (int j = tid; j < M; j += THREADS) {
      const float ct = ci[j];
      const bool cv = cm == nullptr || cm[j] != 0;
      lo = cv ? fminf(lo, ct) : lo;
      hi = cv ? fmaxf(hi, ct) : hi;
    }
  }
  lo = -block_reduce<WARPS>(-lo, scratch, MaxOp{});
  hi = block_reduce<WARPS>(hi, scratch, MaxOp{});
  const float n_cols = block_reduce<WARPS>(cols, scratch, SumOp{});
  const float log_nu = -logf(n_cols);
  const float LK = -lo * inv_eps;
  const float T = (hi - lo) * inv_eps;
  const float shift = tau * T + logf(n_cols) - LOG_CEIL;  // sinkhorn.scaling_shift
  const bool use_scaling = (T <= scaling_max) && ((1.0f + tau) * T + tau * logf(n_rows) + 2.0f * logf(n_cols) <= SCALING_BUDGET);
  const bool use16 = BF16 ? use_scaling : (use_scaling && T <= FLOAT16_MAX_RANGE);
  if (!use16) {
    if (tid == 0) {
      storage_out[pid] = STORAGE_DEFERRED;
      n_iter_out[pid] = -1;
    }
    return;
  }
  const float log_s = BF16 ? 0.0f : LOG_FLOAT16_SCALE;
  const float scale = BF16 ? 1.0f : FLOAT16_SCALE;

  // The 16-bit kernel into shared memory (padding rows and columns 0), each thread writing the columns it sweeps.
  for (int i = 0; i < R; ++i) {
    const bool ri = (rows >> i) & 1ull;
    const float* ci = c + static_cast<long long>(i < N ? i : 0) * M;
    const int chunk = i >> 3, lane8 = i & 7;
#pragma unroll 8
    for (int j = tid; j < M; j += THREADS) {
      const bool cv = cm == nullptr || cm[j] != 0;
      const float kt = (ri && cv) ? expf((lo - ci[j]) * inv_eps) : 0.0f;
      const unsigned short h = BF16 ? float_to_bf16(kt) : float_to_half(kt * scale);
      ks16[static_cast<size_t>(j) * R + (((chunk ^ chunk_swizzle<Q>(j)) << 3) | lane8)] = h;
    }
  }
  __syncthreads();

  const float LKs = LK - log_s;
  const float shift_s = shift + log_s;
  // Row threads: thread i < R owns row i (log u accepted and candidate in registers); the warps they fill
  // (ROW_WARPS) reduce the row quantities every thread needs (max log u, max |change|) with shuffles.
  constexpr int ROW_WARPS = (R + 31) / 32;
  const bool row_thread = tid < R;
  const bool ri = row_thread && ((rows >> tid) & 1ull);
  float f = 0.0f, fn = 0.0f;
  float acc[R];
  float w[R];
  float dv = 0.0f;
  // The first row sums, of the stored values.
  sweep<R, THREADS, BF16, true>(ks, M, w, 0.0f, tau, 0.0f, g_buf, g_buf, dv, acc);
  reduce_rows<R, THREADS>(acc, part);
  __syncthreads();
  if (tid < ROW_WARPS * 32) {
    const float row_lse = LKs + logf(row_tthread_total<R, WARPS>(part, tid, row_thread));
    fn = ri ? tau * (log_mu - row_lse) : 0.0f;
    const float m = warp_max(ri ? fn : NEG_BIG);
    if ((tid & 31) == 0) fmax_s[tid >> 5] = m;
  }
  __syncthreads();
  if (row_thread) w_s[tid] = ri ? __expf(fn - max_of<ROW_WARPS>(fmax_s)) : 0.0f;
  __syncthreads();

  int cur = 0, it = 0;
  while (it < max_iter) {
    const float fmax = max_of<ROW_WARPS>(fmax_s);
    load_vec<R>(w_s, w);
    const float a0 = tau * (log_nu - LKs - fmax);
    const float c_v = a0 + shift_s;
    dv = 0.0f;
    sweep<R, THREADS, BF16, false>(ks, M, w, a0, tau, c_v, g_buf + cur * M, g_buf + (1 - cur) * M, dv, acc);
    const float dv_warp = warp_max(dv);
    if ((tid & 31) == 0) scratch[tid >> 5] = dv_warp;
    reduce_rows<R, THREADS>(acc, part);
    __syncthreads();
    float fnext = 0.0f;
    if (tid < ROW_WARPS * 32) {
      const float row_lse = LKs + c_v + logf(row_tthread_total<R, WARPS>(part, tid, row_thread));
      fnext = ri ? tau * (log_mu - row_lse) : 0.0f;
      const float d = warp_max(ri ? fabsf(fn - f) : 0.0f);
      const float m = warp_max(ri ? fnext : NEG_BIG);
      if ((tid & 31) == 0) {
        dmax_s[tid >> 5] = d;
        fmax_s[ROW_WARPS + (tid >> 5)] = m;
      }
    }
    __syncthreads();
    const float delta = fmaxf(max_of<ROW_WARPS>(dmax_s), max_of<WARPS>(scratch));
    // Algorithm 3: converged -> stop and keep the previous potentials (tol = 0 never stops).
    if (delta < tol) break;
    if (row_thread) {
      f = fn;
      fn = fnext;
      w_s[tid] = ri ? __expf(fn - max_of<ROW_WARPS>(fmax_s + ROW_WARPS)) : 0.0f;
    }
    if (tid < ROW_WARPS) fmax_s[tid] = fmax_s[ROW_WARPS + tid];  // read above only by row threads, in this warp
    cur = 1 - cur;
    ++it;
    __syncthreads();  // w_s / fmax_s published; scratch / dmax_s / part read by every thread before they change
  }
  if (row_thread) f_s[tid] = f;
  __syncthreads();
  if (tid == 0) {
    n_iter_out[pid] = it;
    storage_out[pid] = BF16 ? STORAGE_BF16 : STORAGE_FP16;
  }

  // plan = exp(log u + log K + log v), as the reference writes it; padding exactly 0.
  const float* g = g_buf + cur * M;
  float* out = plan + pid * N * M;
  for (int i = 0; i < N; ++i) {
    const float fi = f_s[i];
    const bool ri = (rows >> i) & 1ull;
    const float* ci = c + static_cast<long long>(i) * M;
    float* oi = out + static_cast<long long>(i) * M;
#pragma unroll 8
    for (int j = tid; j < M; j += THREADS) {
      const bool cv = cm == nullptr || cm[j] != 0;
      oi[j] = (ri && cv) ? expf(fi + g[j] - ci[j] * inv_eps) : 0.0f;
    }
  }
}

}  // namespace pisces
