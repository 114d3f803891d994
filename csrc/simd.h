// Portable 64-byte SIMD vectors (GCC/Clang vector extensions) and the vectorized exp/log the
// Sinkhorn kernels need.
//
// Why vector extensions instead of intrinsics: one source compiles to AVX-512 with -march=native on
// the machines we measure on, to 2x AVX2 or 4x SSE2 elsewhere, and never needs a runtime dispatch.
// Why our own exp/log: libm calls do not vectorize without -ffast-math, and the scalar call would
// dominate the log-domain path. Both are Cephes-style range reductions with polynomials accurate to
// a few ulp (checked against std::exp/std::log by csrc/tests/test_sinkhorn.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "pisces_fast/csrc needs GCC or Clang (vector extensions)"
#endif

#define PISCES_INLINE inline __attribute__((always_inline))

namespace pisces {
namespace simd {

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
};

template <>
struct Traits<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename T>
using Vec = typename Traits<T>::V;
template <typename T>
using IVec = typename Traits<T>::I;

template <typename T>
PISCES_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
PISCES_INLINE void store(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// First n (< W) elements from p, the rest 0: reads never run past the end of a row.
template <typename T>
PISCES_INLINE Vec<T> load_partial(const T* p, int64_t n) {
  Vec<T> v = {};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(T));
  return v;
}

template <typename T>
PISCES_INLINE void store_partial(T* p, Vec<T> v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(T));
}

template <typename T>
PISCES_INLINE Vec<T> splat(T x) {
  Vec<T> v = {};
  return v + x;
}

template <typename T>
PISCES_INLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

template <typename T>
PISCES_INLINE Vec<T> vmin(Vec<T> a, Vec<T> b) {
  return a < b ? a : b;
}

template <typename T>
PISCES_INLINE Vec<T> vabs(Vec<T> a) {
  return a < 0 ? -a : a;
}

// mask lanes are all-ones (true) or 0, as produced by vector comparisons.
template <typename T>
PISCES_INLINE Vec<T> select(IVec<T> mask, Vec<T> a, Vec<T> b) {
  return mask ? a : b;
}

template <typename T>
PISCES_INLINE T hsum(Vec<T> v) {
  // Fixed pairwise order: deterministic and a little more accurate than a running sum.
  constexpr int W = Traits<T>::W;
  T buf[W];
  __builtin_memcpy(buf, &v, sizeof(v));
  for (int width = W / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) buf[i] += buf[i + width];
  return buf[0];
}

template <typename T>
PISCES_INLINE T hmax(Vec<T> v) {
  constexpr int W = Traits<T>::W;
  T buf[W];
  __builtin_memcpy(buf, &v, sizeof(v));
  T m = buf[0];
  for (int i = 1; i < W; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

template <typename T>
PISCES_INLINE T hmin(Vec<T> v) {
  constexpr int W = Traits<T>::W;
  T buf[W];
  __builtin_memcpy(buf, &v, sizeof(v));
  T m = buf[0];
  for (int i = 1; i < W; ++i) m = buf[i] < m ? buf[i] : m;
  return m;
}

// ---------------------------------------------------------------------------------------------
// exp: n = round(x / ln2), r = x - n ln2 (two-constant Cody-Waite), exp(r) by polynomial, 2^n built
// in the exponent bits. Results that would be subnormal are flushed to 0 (they are < 1.2e-38 in
// float, < 2.3e-308 in double: below anything the kernels can distinguish from 0).

PISCES_INLINE Vec<float> vexp(Vec<float> x) {
  typedef Vec<float> V;
  typedef IVec<float> I;
  const float lo = -87.0f, hi = 88.0f;
  const V xc = vmin<float>(vmax<float>(x, splat(lo)), splat(hi));
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V fn = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const V r2 = r * r;
  V p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  const I n = __builtin_convertvector(fn, I);
  const V pow2n = (V)((n + 127) << 23);
  V y = p * pow2n;
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(std::numeric_limits<float>::infinity()) : y;
  return y;
}

PISCES_INLINE Vec<double> vexp(Vec<double> x) {
  typedef Vec<double> V;
  typedef IVec<double> I;
  const double lo = -708.0, hi = 709.0;
  const V xc = vmin<double>(vmax<double>(x, splat(lo)), splat(hi));
  const V magic = splat(6755399441055744.0);  // 1.5 * 2^52
  const V fn = (xc * 1.4426950408889634073599 + magic) - magic;
  V r = xc - fn * 6.93145751953125E-1;
  r = r - fn * 1.42860682030941723212E-6;
  // Cephes exp: Pade form exp(r) = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), ~1 ulp.
  const V r2 = r * r;
  V pp = splat(1.26177193074810590878E-4);
  pp = pp * r2 + 3.02994407707441961300E-2;
  pp = pp * r2 + 9.99999999999999999910E-1;
  const V px = r * pp;
  V qq = splat(3.00198505138664455042E-6);
  qq = qq * r2 + 2.52448340349684104192E-3;
  qq = qq * r2 + 2.27265548208155028766E-1;
  qq = qq * r2 + 2.00000000000000000009E0;
  const V e = px / (qq - px);
  const V p = 1.0 + 2.0 * e;
  const I n = __builtin_convertvector(fn, I);
  const V pow2n = (V)((n + 1023) << 52);
  V y = p * pow2n;
  y = x < lo ? splat(0.0) : y;
  y = x > hi ? splat(std::numeric_limits<double>::infinity()) : y;
  return y;
}

// ---------------------------------------------------------------------------------------------
// log: x = m 2^e with m in [sqrt(1/2), sqrt(2)); log m by a polynomial (float) or by the odd series
// of 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172 (double). log(0) = -inf, log(<0) = NaN.

PISCES_INLINE Vec<float> vlog(Vec<float> x) {
  // float: Cephes logf's polynomial in f = m - 1 (no division: it sits in the Sinkhorn's inner sweep).
  typedef Vec<float> V;
  typedef IVec<float> I;
  const float min_normal = std::numeric_limits<float>::min();
  const auto tiny = x < min_normal;
  const V xs = tiny ? x * 16777216.0f : x;  // 2^24: subnormals become normal
  const I bits = (I)xs;
  I e = ((bits >> 23) & 0xff) - 127;
  e = tiny ? e - 24 : e;
  V m = (V)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const auto big = m > 1.41421356237309505f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const V f = m - 1.0f;  // [-0.293, 0.414]
  const V f2 = f * f;
  V p = splat(7.0376836292E-2f);
  p = p * f - 1.1514610310E-1f;
  p = p * f + 1.1676998740E-1f;
  p = p * f - 1.2420140846E-1f;
  p = p * f + 1.4249322787E-1f;
  p = p * f - 1.6668057665E-1f;
  p = p * f + 2.0000714765E-1f;
  p = p * f - 2.4999993993E-1f;
  p = p * f + 3.3333331174E-1f;
  const V fe = __builtin_convertvector(e, V);
  V y = p * f * f2 + fe * -2.12194440e-4f;
  y = y - 0.5f * f2;
  y = (f + y) + fe * 0.693359375f;
  y = x == 0.0f ? splat(-std::numeric_limits<float>::infinity()) : y;
  y = x < 0.0f ? splat(std::numeric_limits<float>::quiet_NaN()) : y;
  y = x == std::numeric_limits<float>::infinity() ? x : y;
  y = x != x ? x : y;
  return y;
}

PISCES_INLINE Vec<double> vlog(Vec<double> x) {
  typedef Vec<double> V;
  typedef IVec<double> I;
  const double min_normal = std::numeric_limits<double>::min();
  const auto tiny = x < min_normal;
  const V xs = tiny ? x * 18014398509481984.0 : x;  // 2^54
  const I bits = (I)xs;
  I e = ((bits >> 52) & 0x7ff) - 1023;
  e = tiny ? e - 54 : e;
  V m = (V)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
  const auto big = m > 1.41421356237309505;
  m = big ? m * 0.5 : m;
  e = big ? e + 1 : e;
  const V s = (m - 1.0) / (m + 1.0);
  const V s2 = s * s;
  V p = splat(1.0 / 23.0);
  p = p * s2 + 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0;
  p = p * s2 + 1.0 / 17.0;
  p = p * s2 + 1.0 / 15.0;
  p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  const V fe = __builtin_convertvector(e, V);
  V y = (2.0 * s) * p + fe * 1.42860682030941723212E-6;
  y = y + fe * 6.93145751953125E-1;
  y = x == 0.0 ? splat(-std::numeric_limits<double>::infinity()) : y;
  y = x < 0.0 ? splat(std::numeric_limits<double>::quiet_NaN()) : y;
  y = x == std::numeric_limits<double>::infinity() ? x : y;
  y = x != x ? x : y;
  return y;
}

// Variants for the Sinkhorn sweep, whose arguments are known to be in range: vexp_nonpos for
// x <= 0 (returns exp(-87) ~ 1.6e-38 / exp(-708) instead of 0 below the cut-off: far below the
// accuracy the callers need, see scaling_domain_is_safe) and vlog_normal for positive normal x
// (0 gives a finite garbage value that the callers mask).
PISCES_INLINE Vec<float> vexp_nonpos(Vec<float> x) {
  typedef Vec<float> V;
  typedef IVec<float> I;
  const V xc = vmax<float>(x, splat(-87.0f));
  const V magic = splat(12582912.0f);
  const V fn = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const V r2 = r * r;
  V p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  const I n = __builtin_convertvector(fn, I);
  return p * (V)((n + 127) << 23);
}

PISCES_INLINE Vec<double> vexp_nonpos(Vec<double> x) {
  return vexp(vmax<double>(x, splat(-708.0)));
}

PISCES_INLINE Vec<float> vlog_normal(Vec<float> x) {
  typedef Vec<float> V;
  typedef IVec<float> I;
  const I bits = (I)x;
  I e = ((bits >> 23) & 0xff) - 127;
  V m = (V)((bits & 0x007fffff) | 0x3f800000);
  const auto big = m > 1.41421356237309505f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const V f = m - 1.0f;
  const V f2 = f * f;
  V p = splat(7.0376836292E-2f);
  p = p * f - 1.1514610310E-1f;
  p = p * f + 1.1676998740E-1f;
  p = p * f - 1.2420140846E-1f;
  p = p * f + 1.4249322787E-1f;
  p = p * f - 1.6668057665E-1f;
  p = p * f + 2.0000714765E-1f;
  p = p * f - 2.4999993993E-1f;
  p = p * f + 3.3333331174E-1f;
  const V fe = __builtin_convertvector(e, V);
  V y = p * f * f2 + fe * -2.12194440e-4f;
  y = y - 0.5f * f2;
  return (f + y) + fe * 0.693359375f;
}

PISCES_INLINE Vec<double> vlog_normal(Vec<double> x) { return vlog(x); }

// ---------------------------------------------------------------------------------------------
// In-register W x W transpose (rows r[0..W)): log2(W) stages, stage h swapping the off-diagonal
// h x h blocks of every 2h x 2h block, each output a single two-input shuffle.

#define PISCES_SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)

PISCES_INLINE void transpose(Vec<float> r[16]) {
  for (int i = 0; i < 8; ++i) {
    const Vec<float> x = r[i], y = r[i + 8];
    r[i] = PISCES_SHUF(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    r[i + 8] = PISCES_SHUF(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = i; j < i + 4; ++j) {
      const Vec<float> x = r[j], y = r[j + 4];
      r[j] = PISCES_SHUF(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      r[j + 4] = PISCES_SHUF(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
  for (int i = 0; i < 16; i += 4)
    for (int j = i; j < i + 2; ++j) {
      const Vec<float> x = r[j], y = r[j + 2];
      r[j] = PISCES_SHUF(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      r[j + 2] = PISCES_SHUF(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
  for (int i = 0; i < 16; i += 2) {
    const Vec<float> x = r[i], y = r[i + 1];
    r[i] = PISCES_SHUF(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    r[i + 1] = PISCES_SHUF(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
}

PISCES_INLINE void transpose(Vec<double> r[8]) {
  for (int i = 0; i < 4; ++i) {
    const Vec<double> x = r[i], y = r[i + 4];
    r[i] = PISCES_SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = PISCES_SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = i; j < i + 2; ++j) {
      const Vec<double> x = r[j], y = r[j + 2];
      r[j] = PISCES_SHUF(x, y, 0, 1, 8, 9, 4, 5, 12, 13);
      r[j + 2] = PISCES_SHUF(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 8; i += 2) {
    const Vec<double> x = r[i], y = r[i + 1];
    r[i] = PISCES_SHUF(x, y, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = PISCES_SHUF(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
}

#undef PISCES_SHUF

// ---------------------------------------------------------------------------------------------
// 16-bit storage of float32 values (the Sinkhorn kernel matrix): tags over the raw bits, widened to
// float32 vectors on load. narrow() rounds to nearest even; widen() of FP16 expects what narrow()
// wrote from the kernels' inputs: zeros and normal numbers (no subnormals, Inf or NaN).

struct BF16 {
  uint16_t bits;
};
struct FP16 {
  uint16_t bits;
};

typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

template <typename T>
PISCES_INLINE Vec<T> widen(const T* p) {
  return load(p);
}

PISCES_INLINE Vec<float> widen(const BF16* p) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                       16);
#else
  U16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  return (Vec<float>)(__builtin_convertvector(h, U32x16) << 16);
#endif
}

PISCES_INLINE Vec<float> widen(const FP16* p) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  U16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  const U32x16 w = __builtin_convertvector(h, U32x16);
  const U32x16 sign = (w & 0x8000u) << 16;
  const U32x16 normal = sign | (((w & 0x7fffu) << 13) + ((127u - 15u) << 23));  // rebias the exponent
  return (Vec<float>)((w & 0x7c00u) == 0 ? sign : normal);
#endif
}

// x finite.
PISCES_INLINE void narrow(BF16* p, Vec<float> x) {
  U32x16 u = (U32x16)x;
  u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U16x16 h = __builtin_convertvector(u, U16x16);
  __builtin_memcpy(p, &h, sizeof(h));
}

PISCES_INLINE void narrow(FP16* p, Vec<float> x) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < 16; ++l) {
    const _Float16 h = static_cast<_Float16>(x[l]);
    __builtin_memcpy(&p[l].bits, &h, sizeof(h));
  }
#endif
}

// Scalar conveniences built on the vector versions, so scalar and vector code round identically.
template <typename T>
PISCES_INLINE T sexp(T x) {
  Vec<T> v = vexp(splat(x));
  return v[0];
}

template <typename T>
PISCES_INLINE T slog(T x) {
  Vec<T> v = vlog(splat(x));
  return v[0];
}

}  // namespace simd
}  // namespace pisces
