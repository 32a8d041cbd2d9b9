// The small operations of a decode step, each fused into one C++ call: RMSNorm, RoPE, and attention of one new
// query per sequence over its paged keys.
//
// At decode time a layer's tensors are a few rows, so each torch op costs its dispatch (several microseconds)
// plus the temporaries it allocates, far more than its arithmetic: RMSNorm runs as ~6 ops, rotate-half RoPE as
// ~6, and SDPA for a 1-token query spends ~40 us setting up a flash kernel for ~20 KFLOP. These kernels do the
// same arithmetic in one pass each. They are ops vLLM also keeps as custom kernels (rms_norm, rotary_embedding,
// paged_attention); the math is the model's, in the model's order, so results match torch within fp32 rounding
// (tests/kernels/test_decode_ops.py). A SiLU-gate product was tried and was slower than torch's two ops (its
// scalar exp() calls cost more than torch's vectorised SiLU), so it is not here.
//
// Batch invariance: every output row (and every (sequence, head) of attention) is computed by one thread from
// its own inputs only, in a fixed order, so batching requests never changes a request's numbers.
#include <algorithm>
#include <cmath>
#include <vector>

// ATen's tensor alone, not <torch/extension.h>: a fifth of the compile time (bindings.cpp has the Python side)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include "ops_common.h"
#include "simd.h"

using namespace lmstack_simd;
using lmstack_ops::check_cpu;

// y = x / sqrt(mean(x^2) + eps) * w, over the last dimension of a (M, D) contiguous x.
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu(x, at::kFloat, "decode_ops", "x");
  check_cpu(w, at::kFloat, "decode_ops", "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm_rows: x must be a contiguous (M, D) matrix, got ",
              x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), "rms_norm_rows: weight must have ",
              x.size(1), " values, got ", w.sizes());
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * D;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
    float* yr = yp + m * D;
    for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] * inv) * wp[d];  // torch's order: normalise, then scale
  }
  return y;
}

// Rotate-half RoPE of x (B, T, N, D) (any strides, contiguous last dim) by per-position tables cos/sin (T, D):
// y = x * cos + cat(-x2, x1) * sin, returned contiguous.
at::Tensor rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu(x, at::kFloat, "decode_ops", "x");
  check_cpu(cos, at::kFloat, "decode_ops", "cos");
  check_cpu(sin, at::kFloat, "decode_ops", "sin");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rope_rows: x must be (B, T, heads, D) with a contiguous, even last dimension, got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "rope_rows: cos and sin must be contiguous (T, D) = (", T, ", ", D, ") tables, got ", cos.sizes());
  at::Tensor y = at::empty({B, T, N, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + b * x.stride(0) + t * x.stride(1) + n * x.stride(2);
        float* yr = yp + ((b * T + t) * N + n) * D;
        for (int64_t d = 0; d < half; ++d) {
          yr[d] = xr[d] * c[d] + (-xr[d + half]) * s[d];
          yr[d + half] = xr[d + half] * c[d + half] + xr[d] * s[d + half];
        }
      }
    }
  return y;
}

// Attention of one query per sequence over its keys in the paged pool, for a step where every sequence decodes
// one token. q (B, H, D) (any strides, contiguous last dim): the new queries; kc, vc (Hkv, S, D) contiguous:
// one layer's pool (the new keys already written); key_slots (B, Lmax) int64: slot of each position; lengths
// (B,) int64: keys visible to each query (positions [lengths - window, lengths) when window > 0). The H query
// heads share Hkv key heads in groups of H / Hkv (GQA): each key row is read once for its whole group.
// Softmax in fp32 with the running maximum subtracted. Returns (B, H, D) contiguous.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                     const at::Tensor& key_slots, const at::Tensor& lengths, double scale,
                                     int64_t window) {
  const lmstack_ops::PagedArgs a = lmstack_ops::check_paged("paged_decode_attention", q, kc, vc, at::kFloat,
                                                            key_slots, lengths);
  const int64_t B = a.B, H = a.H, D = a.D, Hkv = a.Hkv, S = a.S, Lmax = a.Lmax, G = a.G;
  const int64_t* slots = a.slots;
  const int64_t* lens = a.lens;
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // One task = one (sequence, KV head); a chunk of tasks is worth waking a thread for (ops_common.h).
  const int64_t grain = lmstack_ops::attention_grain(a);
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t len = lens[b], first = lmstack_ops::first_visible(len, window);
      const int64_t n = len - first;
      scores.assign(G * n, 0.f);
      const int64_t* srow = slots + b * Lmax + first;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = srow[j];
        lmstack_ops::check_slot("paged_decode_attention", slot, S);
        const float* key = kp + (g * S + slot) * D;
        for (int64_t h = 0; h < G; ++h)
          scores[h * n + j] = dot(qp + b * q.stride(0) + (g * G + h) * q.stride(1), key, D) * sc;
      }
      lmstack_ops::softmax_rows(scores.data(), G, n);
      float* o = op + (b * H + g * G) * D;  // the group's G output rows are adjacent
      std::fill(o, o + G * D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* value = vp + (g * S + srow[j]) * D;
        for (int64_t h = 0; h < G; ++h) {
          const float p = scores[h * n + j];
          float* oh = o + h * D;
          for (int64_t d = 0; d < D; ++d) oh[d] += p * value[d];
        }
      }
    }
  });
  return out;
}
