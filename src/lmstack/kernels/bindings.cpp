// The Python module of lmstack's CPU kernels: one extension built from every .cpp file in this directory
// (skinny.py's builder), so one compile and one cache entry serve all of them.
#include <string>
#include <tuple>

#include <torch/extension.h>

#include "simd.h"

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                     const at::Tensor& key_slots, const at::Tensor& lengths, double scale,
                                     int64_t window);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias);
at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                          const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& key_slots,
                                          const at::Tensor& lengths, double scale, int64_t window);
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& wscales,
                       const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> w8a8_quantize_rows(const at::Tensor& x);
const char* w8a8_isa();
void kv_int8_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& kc,
                   at::Tensor& vc, at::Tensor& ks, at::Tensor& vs);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x @ weight.T (+ bias) for a few rows of fp32 x",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm over the last dim of a contiguous (M, D) fp32 matrix");
  m.def("rope_rows", &rope_rows, "rotate-half RoPE of x (B, T, N, D) by (T, D) cos/sin tables");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its paged keys: q (B, H, D), pools (Hkv, S, D)");
  m.def("int8_linear", &int8_linear, "y = x @ (codes * scales per group).T (+ bias), int8 weights, fp32 x rows",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("int4_linear", &int4_linear,
        "y = x @ ((nibble - zeros) * scales per group).T (+ bias), two int4 codes per byte, fp32 x rows",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none());
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8,
        "paged_decode_attention over an int8 KV pool read in place: pools (Hkv, S, D) int8, scales (Hkv, S) fp32");
  m.def("kv_int8_write", &kv_int8_write,
        "quantize new K/V (Hkv, N, D) per (head, token) into int8 pools (Hkv, S, D) and scales (Hkv, S) at slots");
  m.def("w8a8_linear", &w8a8_linear,
        "y = (x quantized to int8 per row) @ codes.T in int32, times x's and the channel's scales (+ bias)",
        py::arg("x"), py::arg("codes"), py::arg("wscales"), py::arg("bias") = py::none());
  m.def("w8a8_quantize_rows", &w8a8_quantize_rows, "(int8 codes (M, I), fp32 scales (M, 1)) of x's rows, per token");
  m.def("w8a8_isa", []() { return std::string(w8a8_isa()); }, "the integer dot product w8a8_linear uses");
  m.def("isa", []() { return std::string(lmstack_simd::ISA); }, "the vector instruction set this build uses");
}
