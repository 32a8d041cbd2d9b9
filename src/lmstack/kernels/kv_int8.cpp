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

#include "simd.h"

using namespace lmstack_simd;

// q (B, H, D) fp32 (contiguous last dim); kc, vc (Hkv, S, D) int8 contiguous; ks, vs (Hkv, S) fp32 contiguous:
// their scales; key_slots (B, Lmax) int64, lengths (B,) int64 as in paged_decode_attention. Returns (B, H, D).
at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                          const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& key_slots,
                                          const at::Tensor& lengths, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "paged_decode_attention_int8: q must be a float32 CPU (B, H, D) tensor with a contiguous last "
              "dimension, got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(kc.scalar_type() == at::kChar && vc.scalar_type() == at::kChar && kc.dim() == 3 &&
                  kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous() && kc.device().is_cpu() &&
                  vc.device().is_cpu(),
              "paged_decode_attention_int8: the key and value pools must be contiguous int8 CPU (Hkv, S, D), got ",
              kc.scalar_type(), " ", kc.sizes(), " and ", vc.scalar_type(), " ", vc.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = kc.size(0), S = kc.size(1);
  TORCH_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.is_contiguous() &&
                  vs.is_contiguous() && ks.dim() == 2 && ks.size(0) == Hkv && ks.size(1) == S &&
                  vs.sizes() == ks.sizes(),
              "paged_decode_attention_int8: the scales must be contiguous float32 (Hkv, S) = (", Hkv, ", ", S,
              "), got ", ks.sizes(), " and ", vs.sizes());
  TORCH_CHECK(kc.size(2) == D && Hkv > 0 && H % Hkv == 0, "paged_decode_attention_int8: q has ", H, " heads of ",
              D, " but the pool has ", Hkv, " heads of ", kc.size(2));
  TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.dim() == 2 && key_slots.size(0) == B &&
                  key_slots.is_contiguous() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                  lengths.size(0) == B && lengths.is_contiguous(),
              "paged_decode_attention_int8: key_slots must be contiguous int64 (B, L) and lengths int64 (B,)");
  const int64_t Lmax = key_slots.size(1), G = H / Hkv;
  const int64_t* slots = key_slots.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= Lmax, "paged_decode_attention_int8: sequence ", b, " sees ", lens[b],
                " keys but its slot row holds ", Lmax);
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const int8_t* kp = kc.data_ptr<int8_t>();
  const int8_t* vp = vc.data_ptr<int8_t>();
  const float* ksp = ks.data_ptr<float>();
  const float* vsp = vs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += lens[b];
  const int64_t per_task = std::max<int64_t>(1, G * D * (total / std::max<int64_t>(1, B)));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_task);  // as decode_ops.cpp: ~2^16 MACs
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, row(D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t len = lens[b], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.assign(G * n, 0.f);
      const int64_t* srow = slots + b * Lmax + first;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = srow[j];
        TORCH_CHECK(slot >= 0 && slot < S, "paged_decode_attention_int8: slot ", slot, " is outside the pool of ",
                    S);
        const int8_t* key = kp + (g * S + slot) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(key[d]);  // widened once for the group
        const float ksc = ksp[g * S + slot] * sc;
        for (int64_t h = 0; h < G; ++h)
          scores[h * n + j] = dot(qp + b * q.stride(0) + (g * G + h) * q.stride(1), row.data(), D) * ksc;
      }
      for (int64_t h = 0; h < G; ++h) {
        float* s = scores.data() + h * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        const float inv = 1.0f / exp_shift_sum(s, n, mx);
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      }
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
