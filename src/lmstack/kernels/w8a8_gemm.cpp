// W8A8 matrix product for decode (SmoothQuant's format): int8 activations times int8 weights, summed in int32.
//
//   xq[m, :], xs[m] = x[m, :] quantized per row: xs = max|x| / 127 (1 when the row is all zeros),
//                     xq = clamp(round_half_even(x / xs), -127, 127)
//   y[m, o]         = float(sum_i xq[m, i] * codes[o, i]) * xs[m] * ws[o]  (+ bias[o])
//
// exactly as compress/smoothquant.py's reference w8a8_linear computes it: the same fp32 division, rounding and
// clamp make the same codes, the int32 sum is exact (|products| <= 127 * 128, fewer than 2^31 / 127^2 inputs), and
// the last steps are the same fp32 operations in the same order (kept apart so the compiler cannot fuse the
// bias add into an FMA). So the result equals the reference bit for bit, and row m never depends on other rows.
// A row holding NaN or inf gives NaN outputs (the reference would quantize it to garbage codes).
//
// The integer dot product, per ISA (chunks of C weight bytes per row; x rows are padded to whole chunks with
// zeros, so a tail chunk of weights only needs a bounded load):
//   AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, four products per int32 lane, one instruction.
//                 The weights are the unsigned side after XOR 0x80 (w + 128), so the sum is x.w + 128 sum(x);
//                 sum(x) is known per row, and subtracting it is exact in wrap-around int32 arithmetic.
//   AVX-512BW:    bytes sign-extended to int16, vpmaddwd (pairs of int16 products into int32).
//   AVX2:         vpmaddubsw on |w| and x with w's sign (exact: |w| x pairs stay below 2^15), then vpmaddwd by
//                 ones; or, built with -DLMSTACK_W8A8_AVX2_MADD, sign-extension + vpmaddwd as on AVX-512BW
//                 (benchmarks/w8a8_gemv.py --variants measures both).
//   otherwise:    plain int32 loops.
// Tiling as quant_gemm.cpp: R weight rows are read once per call and multiplied with every x row from L1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include "ops_common.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Inputs above this could overflow the int32 sum (the reference refuses them too).
constexpr int64_t kMaxExactIn = (int64_t(1) << 31) / (127 * 127);

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr const char* kIsa = "avx512_vnni";
constexpr int C = 64;
// x rows per pass over a tile: 4 (as two half tiles of 4 weight rows, 16 of the 32 zmm registers as
// accumulators), then 2, then 1. Measured hot at M = 4..32: 1.2-1.4x faster than passes of 2 rows over 8.
constexpr int kMaxMB = 4;
constexpr uint32_t kOffset = 128;
using acc_t = __m512i;
using wchunk = __m512i;
using xchunk = __m512i;
inline acc_t acc_zero() { return _mm512_setzero_si512(); }
inline wchunk w_prep(__m512i raw) { return _mm512_xor_si512(raw, _mm512_set1_epi8(-128)); }  // w + 128, unsigned
inline wchunk w_load(const int8_t* p) { return w_prep(_mm512_loadu_si512(p)); }
inline wchunk w_load_tail(const int8_t* p, int n) {
  return w_prep(_mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, p));
}
inline xchunk x_load(const int8_t* p) { return _mm512_loadu_si512(p); }
inline acc_t dot_acc(acc_t acc, const wchunk& w, const xchunk& x) { return _mm512_dpbusd_epi32(acc, w, x); }
inline int32_t acc_sum(acc_t a) { return _mm512_reduce_add_epi32(a); }
#elif defined(__AVX512F__) && defined(__AVX512BW__)
constexpr const char* kIsa = "avx512bw_madd";
constexpr int C = 64;
constexpr int kMaxMB = 2;
constexpr uint32_t kOffset = 0;
using acc_t = __m512i;
struct wchunk { __m512i lo, hi; };  // 64 bytes as two vectors of 32 int16
using xchunk = wchunk;
inline acc_t acc_zero() { return _mm512_setzero_si512(); }
inline wchunk widen(__m512i b) {
  return {_mm512_cvtepi8_epi16(_mm512_castsi512_si256(b)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(b, 1))};
}
inline wchunk w_load(const int8_t* p) { return widen(_mm512_loadu_si512(p)); }
inline wchunk w_load_tail(const int8_t* p, int n) {
  return widen(_mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, p));
}
inline xchunk x_load(const int8_t* p) { return w_load(p); }
inline acc_t dot_acc(acc_t acc, const wchunk& w, const xchunk& x) {
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(w.lo, x.lo), _mm512_madd_epi16(w.hi, x.hi)));
}
inline int32_t acc_sum(acc_t a) { return _mm512_reduce_add_epi32(a); }
#elif defined(__AVX2__)
constexpr int C = 32;
constexpr int kMaxMB = 1;       // 16 ymm registers: 8 accumulators and the chunk's operands
constexpr uint32_t kOffset = 0;
using acc_t = __m256i;
inline acc_t acc_zero() { return _mm256_setzero_si256(); }
inline __m256i load32_tail(const int8_t* p, int n) {
  alignas(32) int8_t buf[C] = {0};  // AVX2 has no masked byte load; a tail chunk comes once per row
  std::memcpy(buf, p, n);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}
inline int32_t acc_sum(acc_t a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#if defined(LMSTACK_W8A8_AVX2_MADD)
constexpr const char* kIsa = "avx2_madd";
struct wchunk { __m256i lo, hi; };  // 32 bytes as two vectors of 16 int16
using xchunk = wchunk;
inline wchunk widen(__m256i b) {
  return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1))};
}
inline wchunk w_load(const int8_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline wchunk w_load_tail(const int8_t* p, int n) { return widen(load32_tail(p, n)); }
inline xchunk x_load(const int8_t* p) { return w_load(p); }
inline acc_t dot_acc(acc_t acc, const wchunk& w, const xchunk& x) {
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w.lo, x.lo), _mm256_madd_epi16(w.hi, x.hi)));
}
#else
constexpr const char* kIsa = "avx2_maddubs";
// |w| is the unsigned operand (|-128| = 128 fits a byte) and x takes w's sign (x is never -128, so negating it is
// safe): |w| * sign(w) x = w x, and a pair of them is at most 2 * 128 * 127 < 2^15, so vpmaddubsw never saturates.
struct wchunk { __m256i mag, raw; };
using xchunk = __m256i;
inline wchunk w_prep(__m256i raw) { return {_mm256_abs_epi8(raw), raw}; }
inline wchunk w_load(const int8_t* p) { return w_prep(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline wchunk w_load_tail(const int8_t* p, int n) { return w_prep(load32_tail(p, n)); }
inline xchunk x_load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline acc_t dot_acc(acc_t acc, const wchunk& w, const xchunk& x) {
  const __m256i pairs = _mm256_maddubs_epi16(w.mag, _mm256_sign_epi8(x, w.raw));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
#else
constexpr const char* kIsa = "generic";
constexpr int C = 16;
constexpr int kMaxMB = 2;
constexpr uint32_t kOffset = 0;
struct wchunk { int32_t v[C]; };
using xchunk = wchunk;
using acc_t = int64_t;  // no signed overflow on the way (the final sum fits int32)
inline acc_t acc_zero() { return 0; }
inline wchunk w_load_tail(const int8_t* p, int n) {
  wchunk w;
  for (int l = 0; l < C; ++l) w.v[l] = l < n ? p[l] : 0;
  return w;
}
inline wchunk w_load(const int8_t* p) { return w_load_tail(p, C); }
inline xchunk x_load(const int8_t* p) { return w_load_tail(p, C); }
inline acc_t dot_acc(acc_t acc, const wchunk& w, const xchunk& x) {
  for (int l = 0; l < C; ++l) acc += w.v[l] * x.v[l];
  return acc;
}
inline int32_t acc_sum(acc_t a) { return static_cast<int32_t>(a); }
#endif

// One row of x -> its int8 codes q (I values, then zeros up to the padded length) and its scale; the row sum of
// the codes goes to *sum. Same fp32 operations as smoothquant.quantize_per_token.
float quantize_row(const float* x, int64_t I, int8_t* q, int64_t padded, int32_t* sum) {
  // max |x| (exact in any order) and whether every value is finite (|v| <= FLT_MAX is false for inf and NaN)
  constexpr float kBig = std::numeric_limits<float>::max();
  float amax = 0.f;
  bool finite = true;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (; i + 16 <= I; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(kBig), _CMP_NLE_UQ);
    vmax = _mm512_max_ps(vmax, a);
  }
  amax = _mm512_reduce_max_ps(vmax);
  finite = bad == 0;
#elif defined(__AVX2__)
  __m256 vmax = _mm256_setzero_ps();
  int bad = 0;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= I; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(kBig), _CMP_NLE_UQ));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float v : lanes) amax = std::max(amax, v);
  finite = bad == 0;
#endif
  for (; i < I; ++i) {
    const float a = std::fabs(x[i]);
    finite = finite && a <= kBig;
    amax = std::max(amax, a);
  }
  std::memset(q, 0, padded);
  *sum = 0;
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  float s = amax / 127.0f;
  if (!(s > 0.f)) s = 1.0f;
  int32_t total = 0;
  i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; i + 16 <= I; i += 16) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(c));
    total += _mm512_reduce_add_epi32(c);
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (; i + 8 <= I; i += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
  }
  for (int64_t j = 0; j < i; ++j) total += q[j];
#endif
  for (; i < I; ++i) {
    const float r = std::nearbyint(x[i] / s);  // round half to even, as torch.round
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
    total += q[i];
  }
  *sum = total;
  return s;
}

// Stops the compiler from fusing the multiply before it with the add after it into one FMA (a different
// rounding from the reference's separate multiply and add): v must be materialised here.
inline void materialise(float& v) { __asm__ volatile("" : "+m"(v)); }

// acc[m][r] = sum_i xq[m, i] * w[r, i] for R weight rows (row stride I) and MB rows of codes (row stride P).
// Each chunk step also prefetches R * C bytes of the next tile (the R rows that follow, one contiguous block), so
// by the end of this tile the next one is in cache, as quant_gemm.cpp does: measured at M = 1 on llama-base's
// shapes from DRAM, 5-20% faster on four of five (the 32000 x 768 head most), the fifth within noise.
template <int R, int MB>
inline void tile(const int8_t* __restrict w, int64_t I, const int8_t* __restrict xq, int64_t P,
                 int32_t (&out)[MB][R]) {
  acc_t acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = acc_zero();
  int64_t i = 0;
  const char* next = reinterpret_cast<const char*>(w + R * I);  // past the last tile: a prefetch cannot fault
  for (; i + C <= I; i += C) {
    xchunk xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = x_load(xq + m * P + i);
    for (int64_t b = 0; b < R * C; b += 64) __builtin_prefetch(next + i * R + b, 0, 3);
    for (int r = 0; r < R; ++r) {
      const wchunk wv = w_load(w + r * I + i);
      for (int m = 0; m < MB; ++m) acc[r][m] = dot_acc(acc[r][m], wv, xv[m]);
    }
  }
  if (i < I) {  // the x codes past I are zeros, so whatever the tail chunk holds beyond n adds nothing
    const int n = static_cast<int>(I - i);
    xchunk xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = x_load(xq + m * P + i);
    for (int r = 0; r < R; ++r) {
      const wchunk wv = w_load_tail(w + r * I + i, n);
      for (int m = 0; m < MB; ++m) acc[r][m] = dot_acc(acc[r][m], wv, xv[m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = acc_sum(acc[r][m]);
}

struct Rows {  // the quantized x: M rows of P codes, their scales and code sums
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
  int64_t M, P;
};

// y[m, o0 + r] for r < R and every row m: the integer sums, then the reference's fp32 steps. Which tile shape
// computes a row changes nothing: its integer sums are exact, and the fp32 steps are per element.
template <int R>
inline void rows(const int8_t* w, int64_t I, const float* ws, const float* bias, const Rows& x, float* y,
                 int64_t O) {
  for (int64_t m0 = 0, step = 0; m0 < x.M; m0 += step) {
    int32_t acc[4][R];  // room for the widest pass any ISA makes
    int mb = static_cast<int>(std::min<int64_t>(kMaxMB, x.M - m0));
    if (mb == 4 && R % 2 == 0) {  // two half tiles of R / 2 rows by 4 x rows: 16 accumulators each
      constexpr int H = (R / 2 > 0) ? R / 2 : 1;
      int32_t half[4][H];
      for (int h = 0; h < 2; ++h) {
        tile<H, 4>(w + h * H * I, I, x.q + m0 * x.P, x.P, half);
        for (int m = 0; m < 4; ++m)
          for (int r = 0; r < H; ++r) acc[m][h * H + r] = half[m][r];
      }
    } else if (mb >= 2) {
      mb = 2;
      int32_t two[2][R];
      tile<R, 2>(w, I, x.q + m0 * x.P, x.P, two);
      for (int m = 0; m < 2; ++m) std::copy(two[m], two[m] + R, acc[m]);
    } else {
      int32_t one[1][R];
      tile<R, 1>(w, I, x.q + m0 * x.P, x.P, one);
      std::copy(one[0], one[0] + R, acc[0]);
    }
    step = mb;
    for (int m = 0; m < mb; ++m)
      for (int r = 0; r < R; ++r) {
        // x.w = the hardware's sum - kOffset * sum(x), in wrap-around arithmetic (the true value fits int32)
        const uint32_t raw = static_cast<uint32_t>(acc[m][r]) - kOffset * static_cast<uint32_t>(x.sum[m0 + m]);
        float v = static_cast<float>(static_cast<int32_t>(raw)) * x.scale[m0 + m];
        v = v * ws[r];
        materialise(v);
        if (bias) v += bias[r];
        y[(m0 + m) * O + r] = v;
      }
  }
}

constexpr int64_t R = 8;  // weight rows per tile, as quant_gemm.cpp

void check_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& wscales,
                const c10::optional<at::Tensor>& bias) {
  const char* fn = "w8a8_linear";
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), fn,
              ": x must be a float32 CPU matrix (M, I), got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.device().is_cpu(), fn,
              ": codes must be an int8 CPU matrix (O, I), got ", codes.sizes(), " ", codes.scalar_type());
  const int64_t O = codes.size(0), I = codes.size(1);
  TORCH_CHECK(wscales.scalar_type() == at::kFloat && wscales.device().is_cpu() && wscales.numel() == O &&
                  (wscales.dim() == 1 || (wscales.dim() == 2 && wscales.size(0) == O)),
              fn, ": wscales must be float32 CPU, one per output channel: (", O, ",) or (", O, ", 1), got ",
              wscales.sizes(), " ", wscales.scalar_type());
  TORCH_CHECK(x.size(1) == I, fn, ": x has ", x.size(1), " columns but codes have ", I);
  TORCH_CHECK(I < kMaxExactIn, fn, ": in_features ", I, " could overflow the int32 sum (limit ", kMaxExactIn, ")");
  lmstack_ops::check_bias(fn, bias, O);
}

// x quantized row by row into a buffer of whole chunks.
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  Rows rows;
};

void quantize(const at::Tensor& xc, Quantized& out) {
  const int64_t M = xc.size(0), I = xc.size(1), P = (I + C - 1) / C * C;
  out.q.assign(M * P, 0);
  out.scale.assign(M, 0.f);
  out.sum.assign(M, 0);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    out.scale[m] = quantize_row(xp + m * I, I, out.q.data() + m * P, P, &out.sum[m]);
  out.rows = {out.q.data(), out.scale.data(), out.sum.data(), M, P};
}

}  // namespace

const char* w8a8_isa() { return kIsa; }

// (codes int8 (M, I), scales fp32 (M, 1)) of x's rows: smoothquant.quantize_per_token, for tests and callers that
// want the codes.
std::tuple<at::Tensor, at::Tensor> w8a8_quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "w8a8_quantize_rows: x must be a float32 CPU matrix (M, I), got ", x.sizes(), " ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  Quantized qx;
  quantize(xc, qx);
  const int64_t M = xc.size(0), I = xc.size(1);
  at::Tensor codes = at::empty({M, I}, xc.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, 1}, xc.options());
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(codes.data_ptr<int8_t>() + m * I, qx.q.data() + m * qx.rows.P, I);
    scales.data_ptr<float>()[m] = qx.scale[m];
  }
  return {codes, scales};
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& wscales,
                       const c10::optional<at::Tensor>& bias) {
  check_args(x, codes, wscales, bias);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), O = codes.size(0), I = codes.size(1);
  at::Tensor y = at::empty({M, O}, xc.options());
  if (M == 0 || O == 0) return y;
  Quantized qx;
  quantize(xc, qx);  // M * I values, serial: small next to the O * I codes
  const at::Tensor cc = codes.contiguous(), sc = wscales.contiguous();
  const at::Tensor bc = lmstack_ops::contiguous_or_empty(bias);
  const int8_t* wp = cc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* b = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + R - 1) / R, lmstack_ops::grain_for(R * I, 64 * 1024), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * R;
      if (o + R <= O) {
        rows<R>(wp + o * I, I, sp + o, b ? b + o : nullptr, qx.rows, yp + o, O);
      } else {
        for (int64_t oo = o; oo < O; ++oo)
          rows<1>(wp + oo * I, I, sp + oo, b ? b + oo : nullptr, qx.rows, yp + oo, O);
      }
    }
  });
  return y;
}
