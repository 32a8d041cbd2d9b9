// ops_common.h: the argument checks and work sizing that several kernels share, written once.
//
//   grain_for             how many tasks one parallel_for chunk takes, so a thread's share is worth waking it for
//   check_cpu             "<fn>: <what> must be a <dtype> CPU tensor, got ..." for one buffer (dtype_name)
//   check_bias            an optional fp32 CPU vector of O values (the quantized linears' bias)
//   contiguous_or_empty   an optional tensor made contiguous, or an undefined one
//   check_paged           the shared arguments of the paged decode attentions (decode_ops.cpp, kv_int8.cpp): query,
//                         pools, slot table, lengths; returns their sizes
//   attention_grain       tasks per chunk for those attentions (~2^16 multiply-adds a chunk)
//   first_visible         the first key a query sees under a sliding window
//   check_slot            a slot read from the table lies inside the pool
//   softmax_rows          softmax in place over G rows of n scores, in fp32 with the row maximum subtracted
//
// Each kernel file includes this one header; build.py hashes every *.h here into the build key, so an edit
// to this file rebuilds the extension instead of loading a stale one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "simd.h"

namespace lmstack_ops {

// Tasks per parallel chunk when one task is `task_work` units (bytes, multiply-adds): at least `min_work` units a
// chunk, since below that the fork and join cost more than the work.
inline int64_t grain_for(int64_t task_work, int64_t min_work) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, task_work));
}

// torch's Python name of a dtype, as the messages say it (float32, not ATen's Float).
inline const char* dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kLong: return "int64";
    default: return c10::toString(type);
  }
}

inline void check_cpu(const at::Tensor& t, at::ScalarType type, const char* fn, const char* what) {
  TORCH_CHECK(t.scalar_type() == type && t.device().is_cpu(), fn, ": ", what, " must be a ", dtype_name(type),
              " CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// bias, when given, is a float32 CPU vector of O values (any stride: callers take contiguous_or_empty).
inline void check_bias(const char* fn, const c10::optional<at::Tensor>& bias, int64_t O) {
  if (!(bias.has_value() && bias->defined())) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O && bias->scalar_type() == at::kFloat &&
                  bias->device().is_cpu(),
              fn, ": bias must be a float32 CPU vector of ", O, " values, got ", bias->sizes(), " ",
              bias->scalar_type());
}

inline at::Tensor contiguous_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Sizes of a paged decode attention call: B sequences, H query heads of D, Hkv pool heads of S slots, Lmax slot
// columns, G = H / Hkv query heads per pool head; slots and lens point into key_slots and lengths.
struct PagedArgs {
  int64_t B, H, D, Hkv, S, Lmax, G;
  const int64_t* slots;
  const int64_t* lens;
};

// q (B, H, D) float32 with a contiguous last dimension; kc, vc contiguous (Hkv, S, D) pools of `pool_type`; H a
// multiple of Hkv; key_slots contiguous int64 (B, Lmax) and lengths int64 (B,), each length in 1..Lmax.
inline PagedArgs check_paged(const char* fn, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                             at::ScalarType pool_type, const at::Tensor& key_slots, const at::Tensor& lengths) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1, fn,
              ": q must be a float32 CPU (B, H, D) tensor with a contiguous last dimension, got ", q.scalar_type(),
              " ", q.sizes());
  TORCH_CHECK(kc.scalar_type() == pool_type && vc.scalar_type() == pool_type && kc.dim() == 3 &&
                  kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous() && kc.device().is_cpu() &&
                  vc.device().is_cpu(),
              fn, ": the key and value pools must be contiguous ", dtype_name(pool_type), " CPU (Hkv, S, D), got ",
              kc.scalar_type(), " ", kc.sizes(), " and ", vc.scalar_type(), " ", vc.sizes());
  PagedArgs a{};
  a.B = q.size(0), a.H = q.size(1), a.D = q.size(2), a.Hkv = kc.size(0), a.S = kc.size(1);
  TORCH_CHECK(kc.size(2) == a.D && a.Hkv > 0 && a.H % a.Hkv == 0, fn, ": q has ", a.H, " heads of ", a.D,
              " but the pool has ", a.Hkv, " heads of ", kc.size(2));
  TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.dim() == 2 && key_slots.size(0) == a.B &&
                  key_slots.is_contiguous() && key_slots.device().is_cpu() && lengths.scalar_type() == at::kLong &&
                  lengths.dim() == 1 && lengths.size(0) == a.B && lengths.is_contiguous() &&
                  lengths.device().is_cpu(),
              fn, ": key_slots must be contiguous int64 (B, L) and lengths int64 (B,)");
  a.Lmax = key_slots.size(1), a.G = a.H / a.Hkv;
  a.slots = key_slots.data_ptr<int64_t>();
  a.lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < a.B; ++b)
    TORCH_CHECK(a.lens[b] >= 1 && a.lens[b] <= a.Lmax, fn, ": sequence ", b, " sees ", a.lens[b],
                " keys but its slot row holds ", a.Lmax);
  return a;
}

// One task = one (sequence, pool head): G query heads of D against the sequence's keys, ~G * D * mean length
// multiply-adds. A chunk gets at least ~2^16 of them (a few microseconds).
inline int64_t attention_grain(const PagedArgs& a) {
  int64_t total = 0;
  for (int64_t b = 0; b < a.B; ++b) total += a.lens[b];
  return grain_for(a.G * a.D * (total / std::max<int64_t>(1, a.B)), int64_t(1) << 16);
}

// Positions [first_visible, len) are visible: the last `window` keys when window > 0, else all of them.
inline int64_t first_visible(int64_t len, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, len - window) : 0;
}

inline void check_slot(const char* fn, int64_t slot, int64_t S) {
  TORCH_CHECK(slot >= 0 && slot < S, fn, ": slot ", slot, " is outside the pool of ", S);
}

// Each of G rows of n scores (row stride n) becomes its softmax: exp(s - max) / sum, the exp vectorised (simd.h).
inline void softmax_rows(float* scores, int64_t G, int64_t n) {
  for (int64_t h = 0; h < G; ++h) {
    float* s = scores + h * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    const float inv = 1.0f / lmstack_simd::exp_shift_sum(s, n, mx);
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
}

}  // namespace lmstack_ops
