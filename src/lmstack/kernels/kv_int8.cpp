// Paged decode attention that reads an int8 KV cache in place (infer/kv_quant.py: int8 numbers with one fp32
// scale per token and KV head).
//
// The same attention as paged_decode_attention in decode_ops.cpp (one query per sequence, GQA by head groups,
// softmax in fp32 with the running maximum subtracted), but a key row is an int8 vector k with scale s_k, so
// q . (s_k k) = s_k (q . k): the scale multiplies the finished dot product instead of every element, and a value
// row adds p * s_v * v. Reading int8 in place skips what the torch path does per layer and step: gathering every
// visible key into a new tensor and dequantizing it (4 bytes written and read again per number).
//
// Batch invariance as in decode_ops.cpp: each (sequence, KV head) is computed by one thread in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include "ops_common.h"
#include "simd.h"

using namespace lmstack_simd;

// q (B, H, D) fp32 (contiguous last dim); kc, vc (Hkv, S, D) int8 contiguous; ks, vs (Hkv, S) fp32 contiguous:
// their scales; key_slots (B, Lmax) int64, lengths (B,) int64 as in paged_decode_attention. Returns (B, H, D).
at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                          const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& key_slots,
                                          const at::Tensor& lengths, double scale, int64_t window) {
  const lmstack_ops::PagedArgs a = lmstack_ops::check_paged("paged_decode_attention_int8", q, kc, vc, at::kChar,
                                                            key_slots, lengths);
  const int64_t B = a.B, H = a.H, D = a.D, Hkv = a.Hkv, S = a.S, Lmax = a.Lmax, G = a.G;
  const int64_t* slots = a.slots;
  const int64_t* lens = a.lens;
  TORCH_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.is_contiguous() &&
                  vs.is_contiguous() && ks.dim() == 2 && ks.size(0) == Hkv && ks.size(1) == S &&
                  vs.sizes() == ks.sizes(),
              "paged_decode_attention_int8: the scales must be contiguous float32 (Hkv, S) = (", Hkv, ", ", S,
              "), got ", ks.sizes(), " and ", vs.sizes());
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const int8_t* kp = kc.data_ptr<int8_t>();
  const int8_t* vp = vc.data_ptr<int8_t>();
  const float* ksp = ks.data_ptr<float>();
  const float* vsp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t grain = lmstack_ops::attention_grain(a);  // as decode_ops.cpp: ~2^16 multiply-adds a chunk
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, row(D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t len = lens[b], first = lmstack_ops::first_visible(len, window);
      const int64_t n = len - first;
      scores.assign(G * n, 0.f);
      const int64_t* srow = slots + b * Lmax + first;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = srow[j];
        lmstack_ops::check_slot("paged_decode_attention_int8", slot, S);
        const int8_t* key = kp + (g * S + slot) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(key[d]);  // widened once for the group
        const float ksc = ksp[g * S + slot] * sc;
        for (int64_t h = 0; h < G; ++h)
          scores[h * n + j] = dot(qp + b * q.stride(0) + (g * G + h) * q.stride(1), row.data(), D) * ksc;
      }
      lmstack_ops::softmax_rows(scores.data(), G, n);
      float* o = op + (b * H + g * G) * D;
      std::fill(o, o + G * D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = srow[j];
        const int8_t* value = vp + (g * S + slot) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(value[d]);
        const float vsc = vsp[g * S + slot];
        for (int64_t h = 0; h < G; ++h) {
          const float p = scores[h * n + j] * vsc;
          float* oh = o + h * D;
          for (int64_t d = 0; d < D; ++d) oh[d] += p * row[d];
        }
      }
    }
  });
  return out;
}

// Quantize a step's new keys and values into the int8 pool, as kv_quant.quantize_kv does in torch (same fp32
// operations in the same order, round half to even): for each (KV head, token) row x of k and v (Hkv, N, D) (any
// strides, contiguous last dim), s = max(max|x| / 127, FLT_MIN), q = clamp(round(x / s), -127, 127), stored at
// slots[n] of kc/vc (Hkv, S, D) int8 and ks/vs (Hkv, S) fp32. One call instead of ~20 torch ops per layer.
void kv_int8_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& kc,
                   at::Tensor& vc, at::Tensor& ks, at::Tensor& vs) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.device().is_cpu() &&
                  v.device().is_cpu() && k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 &&
                  v.stride(2) == 1,
              "kv_int8_write: k and v must be float32 CPU (Hkv, N, D) tensors with a contiguous last dimension");
  const int64_t Hkv = k.size(0), N = k.size(1), D = k.size(2);
  TORCH_CHECK(kc.scalar_type() == at::kChar && vc.scalar_type() == at::kChar && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 3 && kc.size(0) == Hkv && kc.size(2) == D &&
                  vc.sizes() == kc.sizes(),
              "kv_int8_write: the pools must be contiguous int8 (Hkv, S, D) = (", Hkv, ", S, ", D, ")");
  const int64_t S = kc.size(1);
  TORCH_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.is_contiguous() &&
                  vs.is_contiguous() && ks.dim() == 2 && ks.size(0) == Hkv && ks.size(1) == S &&
                  vs.sizes() == ks.sizes(),
              "kv_int8_write: the scales must be contiguous float32 (Hkv, S)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == N && slots.is_contiguous(),
              "kv_int8_write: slots must be contiguous int64 (N,)");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(sp[n] >= 0 && sp[n] < S, "kv_int8_write: slot ", sp[n], " is outside the pool of ", S);
  const at::Tensor* src[2] = {&k, &v};
  int8_t* dst[2] = {kc.data_ptr<int8_t>(), vc.data_ptr<int8_t>()};
  float* scl[2] = {ks.data_ptr<float>(), vs.data_ptr<float>()};
  const float tiny = std::numeric_limits<float>::min();
  for (int which = 0; which < 2; ++which) {
    const at::Tensor& x = *src[which];
    const float* xp = x.data_ptr<float>();
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t n = 0; n < N; ++n) {
        const float* row = xp + h * x.stride(0) + n * x.stride(1);
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(row[d]));
        const float s = std::max(amax / 127.0f, tiny);
        const int64_t slot = sp[n];
        int8_t* q = dst[which] + (h * S + slot) * D;
        for (int64_t d = 0; d < D; ++d)
          q[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(row[d] / s))));
        scl[which][h * S + slot] = s;
      }
  }
}
