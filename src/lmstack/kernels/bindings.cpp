// The Python module of lmstack's CPU kernels: one extension built from every .cpp file in this directory
// (skinny.py's builder), so one compile and one cache entry serve all of them.
#include <string>

#include <torch/extension.h>

#include "simd.h"

torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias);
torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor silu_mul_rows(const torch::Tensor& gate, const torch::Tensor& up);
torch::Tensor rope_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                                     const torch::Tensor& key_slots, const torch::Tensor& lengths, double scale,
                                     int64_t window);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x @ weight.T (+ bias) for a few rows of fp32 x",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm over the last dim of a contiguous (M, D) fp32 matrix");
  m.def("silu_mul_rows", &silu_mul_rows, "silu(gate) * up of (M, F) matrices with contiguous rows");
  m.def("rope_rows", &rope_rows, "rotate-half RoPE of x (B, T, N, D) by (T, D) cos/sin tables");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its paged keys: q (B, H, D), pools (Hkv, S, D)");
  m.def("isa", []() { return std::string(lmstack_simd::ISA); }, "the vector instruction set this build uses");
}
