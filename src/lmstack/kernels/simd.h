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
#endif

// dot(a, b) over n floats: one accumulator of L lanes, full chunks then one masked tail, then the fixed reduce.
inline float dot(const float* a, const float* b, int64_t n) {
  vec acc = vzero();
  int64_t i = 0;
  for (; i + L <= n; i += L) acc = vfma(vload(a + i), vload(b + i), acc);
  if (i < n) acc = vfma(vload_tail(a + i, static_cast<int>(n - i)), vload_tail(b + i, static_cast<int>(n - i)), acc);
  return vsum(acc);
}

}  // namespace lmstack_simd
