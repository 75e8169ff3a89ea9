// knapspec's native CPU kernels, one translation unit and one build (knapspec/native/__init__.py
// compiles it on first use):
//   dense.h      float products (bfloat16 / float32 weights in 64-column tiles)
//   quant.h      quantized products (GGUF block types in 16-row tiles; AVX-512 VNNI or AVX2)
//   sublayers.h  whole attention and MLP sublayers and the whole stack, over either kind of weight
//
// Threads: ATen's parallel_for, i.e. torch's own OpenMP pool (torch's wheel ships the libgomp
// this library links to), so the products share torch's threads instead of competing.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dense.h"
#include "quant.h"
#include "sublayers.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stack", &ks::stack);
  m.def("linear_bf16", &ks::linear_bf16);
  m.def("linear_f32", &ks::linear_f32);
  m.def("mlp", &ks::mlp);
  m.def("rms_norm", &ks::rms_norm);
  m.def("attention", &ks::attention);
  m.def("quant_linear", &ks::quant_linear);
  m.def("dequant_rows", &ks::dequant_rows);
  m.def("set_isa", &ks::set_isa);
  m.def("set_amx", &ks::set_amx);
  m.def("set_dot", &ks::set_dot);
  m.def("dot_rate", &ks::dot_rate);
  m.def("set_partial_bytes", &ks::set_partial_bytes);
  m.def("amx_granted", &ks::amx_granted);
  m.def("repack", &ks::repack);
}
