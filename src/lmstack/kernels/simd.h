// simd.h: the few vector operations the decode kernels are written in: AVX-512F when the build machine has it
// (built with -march=native), else AVX2+FMA, else plain loops over L lanes (same order of operations).
//
// vec holds L floats; vload_tail reads n < L floats and zero-fills the rest, so a loop's last partial chunk
// needs no scalar epilogue; vsum reduces the L lanes in a fixed order (no -ffast-math anywhere: results must
// not depend on how the compiler chose to reassociate).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace lmstack_simd {

#if defined(__AVX512F__)
constexpr int L = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline constexpr const char* ISA = "avx512";
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in two steps (Cody-Waite), |r| <= ln(2) / 2; e^r by
// its Taylor polynomial to r^6 (relative error below 2e-7 there), then scaled by 2^n exactly.
inline vec vexp(vec x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  vec p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int L = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload_tail(const float* p, int n) {
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, mask);
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline constexpr const char* ISA = "avx2";
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
// e^x as in the AVX-512 path; 2^n built in the exponent bits (n is within [-126, 127] after the clamp).
inline vec vexp(vec x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  vec p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
constexpr int L = 8;
struct vec { float v[L]; };
inline vec vzero() { vec r; for (int l = 0; l < L; ++l) r.v[l] = 0.f; return r; }
inline vec vload(const float* p) { vec r; for (int l = 0; l < L; ++l) r.v[l] = p[l]; return r; }
inline vec vload_tail(const float* p, int n) {
  vec r;
  for (int l = 0; l < L; ++l) r.v[l] = l < n ? p[l] : 0.f;
  return r;
}
inline vec vfma(vec a, vec b, vec c) {
  for (int l = 0; l < L; ++l) c.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
  return c;
}
inline float vsum(vec a) { float s = 0.f; for (int l = 0; l < L; ++l) s += a.v[l]; return s; }
inline constexpr const char* ISA = "generic";
inline vec vset1(float a) { vec r; for (int l = 0; l < L; ++l) r.v[l] = a; return r; }
inline vec vadd(vec a, vec b) { for (int l = 0; l < L; ++l) a.v[l] += b.v[l]; return a; }
inline vec vsub(vec a, vec b) { for (int l = 0; l < L; ++l) a.v[l] -= b.v[l]; return a; }
inline void vstore(float* p, vec a) { for (int l = 0; l < L; ++l) p[l] = a.v[l]; }
inline vec vexp(vec x) { for (int l = 0; l < L; ++l) x.v[l] = std::exp(x.v[l]); return x; }
#endif

// s[j] = exp(s[j] - shift) for j < n, in place; returns their sum (lanes reduced in a fixed order, then the tail).
inline float exp_shift_sum(float* s, int64_t n, float shift) {
  const vec m = vset1(shift);
  vec acc = vzero();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const vec e = vexp(vsub(vload(s + j), m));
    vstore(s + j, e);
    acc = vadd(acc, e);
  }
  float total = vsum(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

// dot(a, b) over n floats: one accumulator of L lanes, full chunks then one masked tail, then the fixed reduce.
inline float dot(const float* a, const float* b, int64_t n) {
  vec acc = vzero();
  int64_t i = 0;
  for (; i + L <= n; i += L) acc = vfma(vload(a + i), vload(b + i), acc);
  if (i < n) acc = vfma(vload_tail(a + i, static_cast<int>(n - i)), vload_tail(b + i, static_cast<int>(n - i)), acc);
  return vsum(acc);
}

}  // namespace lmstack_simd
