// Skinny fp32 matrix product for decode: y (M, O) = x (M, I) @ W (O, I)^T [+ bias], M small (1..~16).
//
// At decode time the weights are read once per step and x has a handful of rows, so the product is bound by
// how fast W streams from memory. MKL's GEMV/GEMM path for W in nn.Linear's (out, in) layout reads it at about
// half the machine's bandwidth, and for M = 2..8 it makes several passes over W. Here each tile of R weight
// rows is read from memory once and multiplied with every x row while it sits in L1/L2, so the bytes moved
// per step do not grow with M.
//
// Batch invariance: y[m, o] is always one vector accumulator of L lanes, filled in increasing i (full chunks,
// then one zero-masked tail chunk), then reduced in a fixed order, then bias added. That sequence does not
// depend on M, on which tile or thread computes the row, or on the other rows of x, so batching requests never
// changes a request's logits bit for bit. (No -ffast-math: the compiler must not reassociate.)
//
// The vector operations (AVX-512F, AVX2+FMA, or plain loops in the same order) are in simd.h; bindings.cpp
// exposes this function to Python.
#include <algorithm>
#include <cmath>
#include <string>

// ATen's tensor alone, not <torch/extension.h>: a fifth of the compile time (bindings.cpp has the Python side)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include "simd.h"

namespace {

using namespace lmstack_simd;

// R weight rows x MB x-rows: R*MB accumulators stay in registers; each chunk of W is loaded once and used MB
// times. R = 8, MB <= 2 uses 16 + 8 + 1 of the 32 zmm registers (no spills); at M = 1 the 8 row streams keep
// enough cache-line misses in flight to read at the bandwidth x @ W^T reaches (measured: R = 4 reads ~35%
// slower, R = 16 or MB = 4 no faster). The 8 rows are adjacent in memory, so a tile is one contiguous block
// that the hardware prefetcher follows; software prefetch measured no gain and is left out.
template <int R, int MB>
inline void tile(const float* __restrict w, int64_t I, const float* __restrict x, float* __restrict y, int64_t O,
                 const float* __restrict bias) {
  vec acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
  int64_t i = 0;
  for (; i + L <= I; i += L) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * I + i);
    for (int m = 0; m < MB; ++m) {
      const vec xv = vload(x + m * I + i);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  if (i < I) {
    const int n = static_cast<int>(I - i);
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload_tail(w + r * I + i, n);
    for (int m = 0; m < MB; ++m) {
      const vec xv = vload_tail(x + m * I + i, n);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = vsum(acc[r][m]);
      if (bias) s += bias[r];
      y[m * O + r] = s;
    }
}

// All M rows of x against R weight rows starting at w (output column 0 of y), two x-rows at a time: the first
// pair reads the tile from memory, later pairs find it in L1/L2.
template <int R>
inline void rows(const float* w, int64_t I, const float* x, int64_t M, float* y, int64_t O, const float* bias) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile<R, 2>(w, I, x + m * I, y + m * O, O, bias);
  if (m < M) tile<R, 1>(w, I, x + m * I, y + m * O, O, bias);
}

constexpr int64_t R = 8;  // weight rows per tile

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x must be (M, I) and weight (O, I), got x ",
              x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear: x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: x and weight must be on the CPU");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x has ", x.size(1), " columns but weight has ",
              weight.size(1), " (in_features)");
  TORCH_CHECK(weight.is_contiguous(), "skinny_linear: weight must be contiguous");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device().is_cpu(),
                "skinny_linear: bias must be a contiguous float32 CPU vector of ", weight.size(0), " values, got ",
                bias->sizes(), " ", bias->scalar_type());
    b = bias->data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), I = xc.size(1), O = weight.size(0);
  at::Tensor y = at::empty({M, O}, xc.options());
  if (M == 0 || O == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (O + R - 1) / R;
  // Each thread's share should be worth waking it for: at least ~64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, R * I * 4));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * R;
      const float* bo = b ? b + o : nullptr;
      if (o + R <= O) {
        rows<R>(wp + o * I, I, xp, M, yp + o, O, bo);
      } else {
        for (int64_t oo = o; oo < O; ++oo) rows<1>(wp + oo * I, I, xp, M, yp + oo, O, b ? b + oo : nullptr);
      }
    }
  });
  return y;
}
