// Shared pieces of the fastalign CPU kernels: a small SIMD layer (AVX-512, AVX2 + FMA, or a
// portable fallback), a fast exp, and the per-row primitives that token_logprobs.cpp and
// linear_logprobs.cpp both run.
//
//   z = x * inv_T.  Online over a row:  m = max z,  s = sum e^{z-m},  t = sum e^{z-m} (z-m)
//   lse = m + log s,      H = -sum p log p = log s - t / s,      p_v = e^{z_v - lse}
//   lse is saved as float64 for every input dtype; the backward splits it into hi + lo (two
//   floats) so that z_v - lse is accurate to ~1 ulp where it matters (z_v near lse), even when
//   |lse| is in the hundreds.
//   dL/dx_v = inv_T * p_v * (a + b (z_v - lse)) + inv_T * g * 1[v = label]
//       with a = -(g + h H), b = -h   (g = dL/dlogp, h = dL/dH; both 0 on ignored rows)
//
// Half and bfloat16 are widened to float; float64 runs in double (std::exp) so that
// torch.autograd.gradcheck sees exact-enough numbers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastalign {

// Columns per block of the online pass: the block is read twice (max, then exp), the second
// time from L1 (8 KiB of fp32).
constexpr int64_t kBlock = 2048;

// ---------------------------------------------------------------------------------------------
// Scalar fast exp (Cephes expf polynomial, ~1 ulp), for row tails and the portable fallback.
// The AVX2 / AVX-512 versions below are the same algorithm, so tails and lanes agree.
// ---------------------------------------------------------------------------------------------
namespace expc {
constexpr float kHi = 89.0f;     // e^89 overflows: 2^n scaling below returns inf
constexpr float kLo = -104.0f;   // e^-104 underflows to 0; also keeps -inf from making NaN
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kC1 = 0.693359375f;        // ln2 split in two for an exact n * ln2
constexpr float kC2 = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace expc

inline float sfma(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);  // same rounding as the vector lanes
#else
  return a * b + c;
#endif
}

inline double sfma(double a, double b, double c) { return std::fma(a, b, c); }

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float exp_f32(float x) {
  using namespace expc;
  // Comparisons are false for NaN, so NaN flows through to the result.
  x = x > kHi ? kHi : x;
  x = x < kLo ? kLo : x;
  const float fx = std::nearbyint(x * kLog2e);
  float r = sfma(fx, -kC1, x);
  r = sfma(fx, -kC2, r);
  float y = sfma(kP0, r, kP1);
  y = sfma(y, r, kP2);
  y = sfma(y, r, kP3);
  y = sfma(y, r, kP4);
  y = sfma(y, r, kP5);
  y = sfma(y, r * r, r) + 1.0f;
  // 2^n as two normal powers of two so that n in [-150, 128] scales exactly (denormals, inf).
  const int32_t n = static_cast<int32_t>(fx);  // NaN x: garbage n, but y is NaN already
  const int32_t n1 = n >> 1, n2 = n - n1;
  return (y * bits_float(static_cast<uint32_t>(n1 + 127) << 23)) * bits_float(static_cast<uint32_t>(n2 + 127) << 23);
}

inline float sexp(float x) { return exp_f32(x); }
inline double sexp(double x) { return std::exp(x); }

template <class T>
inline auto widen(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<float>(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Vector types. Interface: size, set1, load(const T*), store(T*), + - *, fmadd, vmax, vexp,
// hsum, hmax. T is the tensor's element type (float, bf16, half; double for VecD).
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
struct Vec16 {
  using acc = float;
  static constexpr int size = 16;
  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}
  static Vec16 set1(float a) { return _mm512_set1_ps(a); }
  static Vec16 load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec16 load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Vec16 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(c10::BFloat16* p) const {
    // Round to nearest even, NaN stays a (quiet) NaN: what c10::BFloat16(float) does.
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  void store(c10::Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
// MAXPS returns its second operand when either is NaN: callers pass the data second.
inline Vec16 vmax(Vec16 a, Vec16 b) { return _mm512_max_ps(a.v, b.v); }
inline float hsum(Vec16 a) { return _mm512_reduce_add_ps(a.v); }
inline float hmax(Vec16 a) { return _mm512_reduce_max_ps(a.v); }
inline Vec16 vexp(Vec16 xv) {
  using namespace expc;
  __m512 x = _mm512_min_ps(_mm512_set1_ps(kHi), xv.v);  // NaN-preserving clamp (data second)
  x = _mm512_max_ps(_mm512_set1_ps(kLo), x);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kC1), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kC2), r);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP5));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, fx);  // y * 2^fx, exact incl. denormal / overflow ranges
}
using VecF = Vec16;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Vec8 {
  using acc = float;
  static constexpr int size = 8;
  __m256 v;
  Vec8() = default;
  Vec8(__m256 x) : v(x) {}
  static Vec8 set1(float a) { return _mm256_set1_ps(a); }
  static Vec8 load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec8 load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Vec8 load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(c10::BFloat16* p) const {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  void store(c10::Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
inline Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Vec8 vmax(Vec8 a, Vec8 b) { return _mm256_max_ps(a.v, b.v); }  // NaN in b wins, as Vec16
inline float hsum(Vec8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(Vec8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec8 vexp(Vec8 xv) {
  using namespace expc;
  __m256 x = _mm256_min_ps(_mm256_set1_ps(kHi), xv.v);
  x = _mm256_max_ps(_mm256_set1_ps(kLo), x);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kC1), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kC2), r);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // 2^n as two normal powers of two, like exp_f32.
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}
using VecF = Vec8;
#else
// Portable fallback (no AVX2 / AVX-512): fixed-width arrays with element loops. Correct
// everywhere, vectorised only as far as the compiler manages (not much: about 10x slower).
struct Vec8 {
  using acc = float;
  static constexpr int size = 8;
  float v[8];
  static Vec8 set1(float a) {
    Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a;
    return r;
  }
  template <class T>
  static Vec8 load(const T* p) {
    Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
    return r;
  }
  template <class T>
  void store(T* p) const {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<T>(v[i]);
  }
};
#define FASTALIGN_VEC8_BINOP(NAME, EXPR)            \
  inline Vec8 NAME(Vec8 a, Vec8 b) {                \
    Vec8 r;                                         \
    for (int i = 0; i < 8; ++i) r.v[i] = EXPR;      \
    return r;                                       \
  }
FASTALIGN_VEC8_BINOP(operator+, a.v[i] + b.v[i])
FASTALIGN_VEC8_BINOP(operator-, a.v[i] - b.v[i])
FASTALIGN_VEC8_BINOP(operator*, a.v[i] * b.v[i])
FASTALIGN_VEC8_BINOP(vmax, (b.v[i] != b.v[i] || b.v[i] > a.v[i]) ? b.v[i] : a.v[i])
#undef FASTALIGN_VEC8_BINOP
inline Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) {
  Vec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = sfma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline Vec8 vexp(Vec8 a) {
  Vec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = exp_f32(a.v[i]);
  return r;
}
inline float hsum(Vec8 a) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
inline float hmax(Vec8 a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = (a.v[i] != a.v[i] || a.v[i] > m) ? a.v[i] : m;
  return m;
}
using VecF = Vec8;
#endif

// float64: one lane with std::exp. Only meant for tests and gradcheck.
struct VecD {
  using acc = double;
  static constexpr int size = 1;
  double v;
  static VecD set1(double a) { return {a}; }
  static VecD load(const double* p) { return {*p}; }
  void store(double* p) const { *p = v; }
};
inline VecD operator+(VecD a, VecD b) { return {a.v + b.v}; }
inline VecD operator-(VecD a, VecD b) { return {a.v - b.v}; }
inline VecD operator*(VecD a, VecD b) { return {a.v * b.v}; }
inline VecD fmadd(VecD a, VecD b, VecD c) { return {std::fma(a.v, b.v, c.v)}; }
inline VecD vmax(VecD a, VecD b) { return {(b.v != b.v || b.v > a.v) ? b.v : a.v}; }
inline VecD vexp(VecD a) { return {std::exp(a.v)}; }
inline double hsum(VecD a) { return a.v; }
inline double hmax(VecD a) { return a.v; }

template <class T>
struct Traits {
  using acc = float;
  using vec = VecF;
};
template <>
struct Traits<double> {
  using acc = double;
  using vec = VecD;
};

// ---------------------------------------------------------------------------------------------
// Per-row online statistics. Kept in double: they are touched once per block, so it is free,
// and it keeps s and t exact enough for a 262k vocabulary.
// ---------------------------------------------------------------------------------------------
struct RowStats {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0.0;
  double t = 0.0;

  // Move the reference point to m2 >= m: s' = s e^{m-m2}, t' = e^{m-m2} (t + (m-m2) s).
  void rebase(double m2) {
    if (s > 0.0) {
      const double a = m - m2;
      const double e = std::exp(a);
      t = e * (t + a * s);
      s *= e;
    }
    m = m2;
  }

  void merge(RowStats o) {
    if (o.s == 0.0) return;
    if (o.m > m) {
      rebase(o.m);
    } else if (o.m < m) {
      o.rebase(m);
    }
    s += o.s;
    t += o.t;
  }
};

// Largest element of x[0, n), widened. Four accumulators hide the max latency.
template <class V, class T>
inline typename V::acc block_max(const T* x, int64_t n) {
  using A = typename V::acc;
  constexpr int W = V::size;
  A mx = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  if (n >= 4 * W) {
    V m0 = V::set1(mx), m1 = m0, m2 = m0, m3 = m0;
    for (; j + 4 * W <= n; j += 4 * W) {
      m0 = vmax(m0, V::load(x + j));
      m1 = vmax(m1, V::load(x + j + W));
      m2 = vmax(m2, V::load(x + j + 2 * W));
      m3 = vmax(m3, V::load(x + j + 3 * W));
    }
    mx = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  }
  for (; j + W <= n; j += W) mx = std::max(mx, hmax(V::load(x + j)));
  for (; j < n; ++j) mx = std::max(mx, static_cast<A>(widen(x[j])));
  return mx;
}

// Adds sum e^{z-m} and (ENT) sum e^{z-m} (z-m) over x[0, n) to s, t, with z = x * scale.
// z - m is one fma (no rounding of z itself, which is what limits accuracy for |z| >> 1), and
// it is floored at the lowest finite value so that a -inf logit adds 0, not 0 * -inf.
template <class V, bool ENT, class T>
inline void block_exp_sums(const T* x, int64_t n, typename V::acc scale, typename V::acc m, double& s, double& t) {
  using A = typename V::acc;
  constexpr int W = V::size;
  constexpr A kLowest = std::numeric_limits<A>::lowest();
  const V vscale = V::set1(scale), vnm = V::set1(-m), vlow = V::set1(kLowest);
  V vs = V::set1(0), vt = V::set1(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V d = fmadd(V::load(x + j), vscale, vnm);
    const V e = vexp(d);
    vs = vs + e;
    if constexpr (ENT) vt = fmadd(e, vmax(vlow, d), vt);
  }
  A ss = hsum(vs), tt = ENT ? hsum(vt) : A(0);
  for (; j < n; ++j) {
    const A d = sfma(static_cast<A>(widen(x[j])), scale, -m);
    const A e = sexp(d);
    ss += e;
    if constexpr (ENT) tt += e * (d != d ? d : std::max(kLowest, d));
  }
  s += ss;
  if constexpr (ENT) t += tt;
}

// Online update of st with the values x[0, n) * scale, block by block.
template <class V, bool ENT, class T>
inline void row_update(const T* x, int64_t n, typename V::acc scale, RowStats& st) {
  using A = typename V::acc;
  if (st.s != st.s) return;  // already NaN
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    // The reference m only needs to be within rounding of the true max (scale > 0).
    const A bm = block_max<V>(x + b0, len) * scale;
    if (bm != bm) {  // a NaN logit poisons the row, as in eager
      st.m = st.s = st.t = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    if (static_cast<double>(bm) > st.m) st.rebase(bm);
    if (st.m == -std::numeric_limits<double>::infinity()) continue;  // only -inf so far
    block_exp_sums<V, ENT>(x + b0, len, scale, static_cast<A>(st.m), st.s, st.t);
  }
}

// x * scale in double: exact for float x (24 x 24-bit product).
template <class T, class A>
inline double label_logit(T x, A scale) {
  return static_cast<double>(widen(x)) * static_cast<double>(scale);
}

// Per-row outputs from final statistics. lse is saved in double (for the backward's hi/lo split,
// see row_grad). logp <= 0 and H >= 0 hold exactly in real arithmetic; the clamps only remove
// last-bit rounding across that boundary.
template <class A>
inline void finalize_row(const RowStats& st, bool valid, double z_label, A* logp, double* lse, A* entropy) {
  const double log_s = std::log(st.s);
  const double l = st.m + log_s;
  *lse = l;
  const double lp = z_label - l, h = log_s - st.t / st.s;
  *logp = valid ? static_cast<A>(lp > 0.0 ? 0.0 : lp) : A(0);  // NaN passes through
  if (entropy) *entropy = valid ? static_cast<A>(h < 0.0 ? 0.0 : h) : A(0);
}

// Gradient of one row segment: out[j] = inv_T p_j (a + b d_j) (+ g_lab at label_local), with
// d_j = x_j * scale - lse and a, b already multiplied by inv_T (see the top of the file). out
// may alias x (the linear backward overwrites the logits tile with dz).
//
// lse (double) is split once into hi = (A)lse and lo = (A)(lse - hi), and d_j = fma(x_j, scale,
// -hi) - lo: where it matters (x_j * scale near lse, p_j ~ 1) the fma result is nearly exact and
// d_j has ~1 ulp error, instead of the half-ulp(lse) error of a float lse (~3e-5 at |lse| ~ 500).
// In double (A = double) hi is lse and lo is 0 and skipped.
template <class V, bool ENT, class T, class TO>
inline void row_grad(const T* x, TO* out, int64_t n, typename V::acc scale, double lse, typename V::acc a,
                     typename V::acc b, int64_t label_local, typename V::acc g_lab) {
  using A = typename V::acc;
  constexpr int W = V::size;
  constexpr bool kSplit = !std::is_same_v<A, double>;
  constexpr A kLowest = std::numeric_limits<A>::lowest();
  if (lse != lse) {  // the forward met a NaN logit in this row: NaN gradient, as in eager
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<TO>(static_cast<A>(lse));
    return;
  }
  const A hi = static_cast<A>(lse);
  // Outside the float range (hi = +-inf) keep lo = 0: the same d_j as a plain float lse.
  const A lo = kSplit && std::isfinite(hi) ? static_cast<A>(lse - static_cast<double>(hi)) : A(0);
  const bool has_label = label_local >= 0 && label_local < n;
  const A x_lab = has_label ? static_cast<A>(widen(x[label_local])) : A(0);  // read before overwrite
  const V vscale = V::set1(scale), vnhi = V::set1(-hi), vlo = V::set1(lo), va = V::set1(a), vb = V::set1(b);
  const V vlow = V::set1(kLowest);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V d = fmadd(V::load(x + j), vscale, vnhi);
    if constexpr (kSplit) d = d - vlo;
    const V p = vexp(d);
    V c = va;
    if constexpr (ENT) c = fmadd(vb, vmax(vlow, d), va);
    (p * c).store(out + j);
  }
  auto scalar = [&](A xv) {
    A d = sfma(xv, scale, -hi);
    if constexpr (kSplit) d = d - lo;
    const A p = sexp(d);
    const A c = ENT ? a + b * (d != d ? d : std::max(kLowest, d)) : a;
    return p * c;
  };
  for (; j < n; ++j) out[j] = static_cast<TO>(scalar(static_cast<A>(widen(x[j]))));
  if (has_label) out[label_local] = static_cast<TO>(scalar(x_lab) + g_lab);
}

// Segments per row so that small batches with long rows still use every thread.
inline int64_t segments_per_row(int64_t n_rows, int64_t vocab) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = 4 * threads;
  if (n_rows >= target) return 1;
  const int64_t max_segs = std::max<int64_t>(1, vocab / (4 * kBlock));
  return std::max<int64_t>(1, std::min<int64_t>((target + n_rows - 1) / n_rows, max_segs));
}

// Rows (or row segments) per parallel_for grain: ~32K elements of work at least.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_item));
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf,
              "fastalign: ", name, " must be float32/float64/bfloat16/float16, got ", d);
}

inline void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "fastalign: ", name, " must be contiguous");
}

inline void check_labels(const at::Tensor& labels, int64_t n) {
  check_cpu_contig(labels, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastalign: labels must be int64");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "fastalign: labels must have shape (", n, ",)");
}

// Row vector as contiguous acc dtype (the autograd grads normally already are).
inline at::Tensor row_vector(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == n, "fastalign: ", name, " must have ", n, " elements");
  return t.reshape({n}).to(acc).contiguous();
}

// The saved log-sum-exp: float64 (N,) for every input dtype (see row_grad).
inline at::Tensor lse_vector(const at::Tensor& lse, int64_t n) {
  TORCH_CHECK(lse.scalar_type() == at::kDouble, "fastalign: lse must be float64 (the forward's output), got ",
              lse.scalar_type());
  return row_vector(lse, n, at::kDouble, "lse");
}

// ---------------------------------------------------------------------------------------------
// Entry points (bound in bindings.cpp).
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, double inv_temperature,
    bool with_entropy);

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
                              double inv_temperature);

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double inv_temperature, bool with_entropy,
    int64_t chunk_size, int64_t filter_block, const std::optional<at::Tensor>& order);

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
    double inv_temperature, int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias,
    const std::optional<at::Tensor>& keep, int64_t filter_block, int64_t compact,
    const std::optional<at::Tensor>& order);

}  // namespace fastalign
