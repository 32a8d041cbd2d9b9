// Weight-only int8 / int4 matrix product for decode: y (M, O) = x (M, I) @ dequant(W)^T [+ bias], fp32 x, M small.
//
// Decode reads every weight once per step, so its speed is the bytes it reads. A quantized weight only makes
// decode faster if the product reads the packed codes directly: dequantizing to an fp32 copy first writes and
// re-reads 4 bytes per weight, more than the fp32 model moves. Here each tile of R weight rows is decoded in
// registers, chunk by chunk, into the exact fp32 values torch's dequantization gives, and multiplied with every
// x row while the codes sit in L1 (the same tiling as skinny_gemm.cpp, so the bytes read per step do not grow
// with M). Activations stay fp32: this is weight-only quantization, the numbers are F.linear's on the
// dequantized weight up to the order of the fp32 sums.
//
// Layouts (compress/qlinear.py's canonical buffers, used as they are saved; no re-layout step):
//   int8: codes int8 (O, I), scales fp32 (O, G), group g = I / G:  w[o, i] = codes[o, i] * scales[o, i / g]
//   int4: codes uint8 (O, I / 2), byte j = column 2j in the low nibble, column 2j + 1 in the high nibble;
//         scales fp32 (O, G), zeros uint8 (O, G) in 0..15:  w[o, i] = (code - zeros[o, i / g]) * scales[o, i / g]
// int4 splits x into its even and odd columns once per call, so a byte's two nibbles meet their two x values in
// two plain vector FMAs (no nibble interleaving in the inner loop).
//
// Decoding one weight, per ISA:
//   AVX-512: int8 -> sign-extend, convert, times the group's scale. int4 -> the group's 16 possible values
//            (c - z) * s, c = 0..15, are one 16-lane table built once per group and row; a nibble is an index,
//            and one permute (vpermps) turns 16 nibbles into 16 dequantized floats: no convert, no subtract.
//   AVX2 and plain loops: int4 -> mask / shift, convert, minus zero, times scale (the same values).
// Either way each weight's value is (c - z) * s rounded once, bit for bit what dequantize-then-F.linear uses.
//
// Batch invariance: y[m, o] is one vector accumulator filled group by group in increasing i (full chunks, then
// one zero-masked tail chunk per group), reduced in a fixed order, then bias added; nothing depends on M, on the
// tile or thread, or on the other rows of x. So a request's logits do not change when it is batched with others.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include "ops_common.h"
#include "simd.h"

namespace {

using namespace lmstack_simd;

// i8_decode(p, s): L int8 codes -> L floats code * s. u4_load(p): L bytes -> L int32 lanes; u4_high: their high
// nibbles in bits 0..3. u4_table(z, s): what one group of one row needs to decode; u4_decode(t, lanes): the L
// values (nibble - z) * s, the nibble being bits 0..3 of each lane.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
using ivec = __m512i;
inline __mmask16 tail_mask(int n) { return (__mmask16)((1u << n) - 1u); }
inline vec i8_decode(const int8_t* p, float s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))),
                       _mm512_set1_ps(s));
}
inline vec i8_decode_tail(const int8_t* p, int n, float s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), p))),
                       _mm512_set1_ps(s));
}
inline ivec u4_load(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline ivec u4_load_tail(const uint8_t* p, int n) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), p));
}
inline ivec u4_high(ivec b) { return _mm512_srli_epi32(b, 4); }
using qtab = vec;  // the group's 16 possible values, lane c = (c - z) * s
inline qtab u4_table(float z, float s) {
  const vec c = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}
// vpermps reads only bits 0..3 of each index lane: a byte's low nibble, or its high one after u4_high.
inline vec u4_decode(const qtab& t, ivec lanes) { return _mm512_permutexvar_ps(lanes, t); }
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
using ivec = __m256i;
inline vec i8_decode(const int8_t* p, float s) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
                       _mm256_set1_ps(s));
}
inline vec i8_decode_tail(const int8_t* p, int n, float s) {
  int8_t buf[L] = {0};  // AVX2 has no masked byte load; a tail chunk comes at most once per group
  std::memcpy(buf, p, n);
  return i8_decode(buf, s);
}
inline ivec u4_load(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline ivec u4_load_tail(const uint8_t* p, int n) {
  uint8_t buf[L] = {0};
  std::memcpy(buf, p, n);
  return u4_load(buf);
}
inline ivec u4_high(ivec b) { return _mm256_srli_epi32(b, 4); }
struct qtab { vec z, s; };
inline qtab u4_table(float z, float s) { return {_mm256_set1_ps(z), _mm256_set1_ps(s)}; }
inline vec u4_decode(const qtab& t, ivec lanes) {
  const vec c = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(15)));
  return _mm256_mul_ps(_mm256_sub_ps(c, t.z), t.s);
}
#else
// Plain loops (also an AVX-512F build without BW/VL): the same values, built in scalars and loaded as a vec.
struct ivec { int32_t v[L]; };
inline vec i8_decode_tail(const int8_t* p, int n, float s) {
  float f[L];
  for (int l = 0; l < L; ++l) f[l] = (l < n ? static_cast<float>(p[l]) : 0.f) * s;
  return vload(f);
}
inline vec i8_decode(const int8_t* p, float s) { return i8_decode_tail(p, L, s); }
inline ivec u4_load_tail(const uint8_t* p, int n) {
  ivec r;
  for (int l = 0; l < L; ++l) r.v[l] = l < n ? p[l] : 0;
  return r;
}
inline ivec u4_load(const uint8_t* p) { return u4_load_tail(p, L); }
inline ivec u4_high(ivec b) {
  for (int l = 0; l < L; ++l) b.v[l] >>= 4;
  return b;
}
struct qtab { float z, s; };
inline qtab u4_table(float z, float s) { return {z, s}; }
inline vec u4_decode(const qtab& t, ivec lanes) {
  float f[L];
  for (int l = 0; l < L; ++l) f[l] = (static_cast<float>(lanes.v[l] & 15) - t.z) * t.s;
  return vload(f);
}
#endif

// The R rows of a tile are one contiguous block of codes, and the next tile follows it. A chunk step reads only
// L bytes of each row (a quarter of a cache line), too slowly for the hardware prefetcher to keep enough lines
// in flight: measured, these kernels read DRAM at a third to a half of the rate they reach on cached codes.
// So each chunk step prefetches the next tile's block at the rate this tile is consumed (R * L bytes per
// step): by the time the next tile starts, its codes are in L1. (Past the last tile the prefetch touches
// memory it never reads; a prefetch cannot fault.)
inline void prefetch_next_tile(const void* next, int64_t chunk, int64_t rows) {
  const char* p = static_cast<const char*>(next) + chunk * rows * L;
  for (int64_t b = 0; b < rows * L; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// y[m, o] = acc reduced, plus bias: the same last steps as skinny_gemm.cpp.
template <int R, int MB>
inline void store(vec (&acc)[R][MB], float* y, int64_t O, const float* bias) {
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = vsum(acc[r][m]);
      if (bias) s += bias[r];
      y[m * O + r] = s;
    }
}

// int8: R weight rows (codes w, row stride I; scales s, row stride G) x MB rows of x (row stride I).
template <int R, int MB>
inline void tile8(const int8_t* __restrict w, const float* __restrict s, int64_t I, int64_t G,
                  const float* __restrict x, float* __restrict y, int64_t O, const float* __restrict bias) {
  vec acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
  const int64_t g = I / G;
  for (int64_t k = 0; k < G; ++k) {
    const int64_t end = (k + 1) * g;
    int64_t i = k * g;
    for (; i + L <= end; i += L) {
      vec wv[R];
      for (int r = 0; r < R; ++r) wv[r] = i8_decode(w + r * I + i, s[r * G + k]);
      prefetch_next_tile(w + R * I, i / L, R);
      for (int m = 0; m < MB; ++m) {
        const vec xv = vload(x + m * I + i);
        for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
      }
    }
    if (i < end) {
      const int n = static_cast<int>(end - i);
      vec wv[R];
      for (int r = 0; r < R; ++r) wv[r] = i8_decode_tail(w + r * I + i, n, s[r * G + k]);
      for (int m = 0; m < MB; ++m) {
        const vec xv = vload_tail(x + m * I + i, n);
        for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
      }
    }
  }
  store<R, MB>(acc, y, O, bias);
}

// int4: R weight rows (codes w, row stride B = I / 2 bytes; scales s and zeros z, row stride G) x MB rows of x,
// given as its even columns xe and odd columns xo (each row stride B). A group is gb = B / G bytes.
template <int R, int MB>
inline void tile4(const uint8_t* __restrict w, const float* __restrict s, const uint8_t* __restrict z, int64_t B,
                  int64_t G, const float* __restrict xe, const float* __restrict xo, float* __restrict y, int64_t O,
                  const float* __restrict bias) {
  vec acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
  const int64_t gb = B / G;
  for (int64_t k = 0; k < G; ++k) {
    qtab t[R];
    for (int r = 0; r < R; ++r) t[r] = u4_table(static_cast<float>(z[r * G + k]), s[r * G + k]);
    const int64_t end = (k + 1) * gb;
    int64_t j = k * gb;
    // Row by row: decode a chunk's low and high nibbles, then both FMAs for every x row (x from L1).
    for (; j + L <= end; j += L) {
      prefetch_next_tile(w + R * B, j / L, R);
      for (int r = 0; r < R; ++r) {
        const ivec b = u4_load(w + r * B + j);
        const vec lo = u4_decode(t[r], b), hi = u4_decode(t[r], u4_high(b));
        for (int m = 0; m < MB; ++m) {
          acc[r][m] = vfma(lo, vload(xe + m * B + j), acc[r][m]);
          acc[r][m] = vfma(hi, vload(xo + m * B + j), acc[r][m]);
        }
      }
    }
    if (j < end) {
      // The masked lanes decode to (0 - z) * s, finite, and meet x lanes loaded as 0: they add nothing.
      const int n = static_cast<int>(end - j);
      for (int r = 0; r < R; ++r) {
        const ivec b = u4_load_tail(w + r * B + j, n);
        const vec lo = u4_decode(t[r], b), hi = u4_decode(t[r], u4_high(b));
        for (int m = 0; m < MB; ++m) {
          acc[r][m] = vfma(lo, vload_tail(xe + m * B + j, n), acc[r][m]);
          acc[r][m] = vfma(hi, vload_tail(xo + m * B + j, n), acc[r][m]);
        }
      }
    }
  }
  store<R, MB>(acc, y, O, bias);
}

constexpr int64_t R = 8;  // weight rows per tile, as skinny_gemm.cpp

// All M rows of x against R weight rows, two x rows at a time (the first pair reads the tile from memory).
template <int RR>
inline void rows8(const int8_t* w, const float* s, int64_t I, int64_t G, const float* x, int64_t M, float* y,
                  int64_t O, const float* bias) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile8<RR, 2>(w, s, I, G, x + m * I, y + m * O, O, bias);
  if (m < M) tile8<RR, 1>(w, s, I, G, x + m * I, y + m * O, O, bias);
}

template <int RR>
inline void rows4(const uint8_t* w, const float* s, const uint8_t* z, int64_t B, int64_t G, const float* xe,
                  const float* xo, int64_t M, float* y, int64_t O, const float* bias) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile4<RR, 2>(w, s, z, B, G, xe + m * B, xo + m * B, y + m * O, O, bias);
  if (m < M) tile4<RR, 1>(w, s, z, B, G, xe + m * B, xo + m * B, y + m * O, O, bias);
}

// Shared argument checks (quant.py checks the same in Python, for its error messages); buffers need not be
// contiguous (each function takes .contiguous(), free when they already are).
void check_common(const char* fn, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), fn,
              ": x must be a float32 CPU matrix (M, I), got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.device().is_cpu(), fn, ": codes must be a CPU matrix, got ", codes.sizes());
  const int64_t O = codes.size(0);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == O && scales.size(1) >= 1 &&
                  scales.scalar_type() == at::kFloat && scales.device().is_cpu(),
              fn, ": scales must be a float32 CPU matrix (O, G) with O = ", O, ", got ", scales.sizes(), " ",
              scales.scalar_type());
  lmstack_ops::check_bias(fn, bias, O);
}

// Tiles per parallel task: each thread's share should be worth waking it for (>= ~64 KB of codes).
int64_t grain(int64_t tile_bytes) { return lmstack_ops::grain_for(tile_bytes, 64 * 1024); }

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check_common("int8_linear", x, codes, scales, bias);
  TORCH_CHECK(codes.scalar_type() == at::kChar, "int8_linear: codes must be int8, got ", codes.scalar_type());
  const int64_t O = codes.size(0), I = codes.size(1), G = scales.size(1);
  TORCH_CHECK(x.size(1) == I, "int8_linear: x has ", x.size(1), " columns but codes have ", I);
  TORCH_CHECK(I % G == 0, "int8_linear: ", G, " groups do not divide ", I, " input features");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, O}, xc.options());
  if (M == 0 || O == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous();
  const at::Tensor bc = lmstack_ops::contiguous_or_empty(bias);
  const int8_t* wp = cc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + R - 1) / R, grain(R * I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * R;
      if (o + R <= O) {
        rows8<R>(wp + o * I, sp + o * G, I, G, xp, M, yp + o, O, b ? b + o : nullptr);
      } else {
        for (int64_t oo = o; oo < O; ++oo)
          rows8<1>(wp + oo * I, sp + oo * G, I, G, xp, M, yp + oo, O, b ? b + oo : nullptr);
      }
    }
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_common("int4_linear", x, codes, scales, bias);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "int4_linear: codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(zeros.dim() == 2 && zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kByte &&
                  zeros.device().is_cpu(),
              "int4_linear: zeros must be a uint8 CPU matrix shaped like scales ", scales.sizes(), ", got ",
              zeros.sizes(), " ", zeros.scalar_type());
  const int64_t O = codes.size(0), B = codes.size(1), I = 2 * B, G = scales.size(1);
  TORCH_CHECK(x.size(1) == I, "int4_linear: x has ", x.size(1), " columns but codes hold ", I,
              " (two per byte)");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && group_size * G == I, "int4_linear: group_size ",
              group_size, " must be even and G * group_size must equal I (G = ", G, ", I = ", I, ")");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, O}, xc.options());
  if (M == 0 || O == 0) return y;
  // x's even and odd columns, once per call (M * I floats, small next to the O * I / 2 bytes of codes).
  std::vector<float> split(2 * M * B);
  float* xe = split.data();
  float* xo = split.data() + M * B;
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < B; ++j) {
      xe[m * B + j] = xp[m * I + 2 * j];
      xo[m * B + j] = xp[m * I + 2 * j + 1];
    }
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const at::Tensor bc = lmstack_ops::contiguous_or_empty(bias);
  const uint8_t* wp = cc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const uint8_t* zp = zc.data_ptr<uint8_t>();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + R - 1) / R, grain(R * B), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * R;
      if (o + R <= O) {
        rows4<R>(wp + o * B, sp + o * G, zp + o * G, B, G, xe, xo, M, yp + o, O, b ? b + o : nullptr);
      } else {
        for (int64_t oo = o; oo < O; ++oo)
          rows4<1>(wp + oo * B, sp + oo * G, zp + oo * G, B, G, xe, xo, M, yp + oo, O, b ? b + oo : nullptr);
      }
    }
  });
  return y;
}
