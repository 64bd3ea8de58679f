// archext C++ API: the activation family. Plain C++ functions over at::Tensor for callers with
// no Python in the loop; each goes through the PyTorch dispatcher, so it runs the CPU or CUDA
// kernel by the inputs' device. Semantics are those of the schemas in csrc/registration.cpp.
//
// `activation` is one of "relu", "gelu" (erf, as F.gelu(approximate="none")), "gelu_tanh"
// (F.gelu(approximate="tanh")), "silu". Inputs of any shape and strides; outputs contiguous.
#pragma once

#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace archext {

// Gated: y = act(gate) * up (ReGLU, GeGLU, SwiGLU), gate and up of one shape.
at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, std::string_view activation);
// Returns (grad_gate, grad_up), from one pass that recomputes act(gate).
std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& grad_y, const at::Tensor& gate,
                                           const at::Tensor& up, std::string_view activation);
// Packed: x = [..., 2 * d], the gate in x[..., :d] when gate_first (else x[..., d:]);
// y = [..., d].
at::Tensor glu_packed_fwd(const at::Tensor& x, std::string_view activation,
                          bool gate_first = true);
// Returns grad_x, [..., 2 * d].
at::Tensor glu_packed_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                          std::string_view activation, bool gate_first = true);
// Plain: y = act(x), and its backward grad_x = grad_y * act'(x).
at::Tensor act_fwd(const at::Tensor& x, std::string_view activation);
at::Tensor act_bwd(const at::Tensor& grad_y, const at::Tensor& x, std::string_view activation);

// Into the caller's preallocated contiguous outputs (no allocation on the call): for C++ callers
// that manage their own buffers, and the C++ benchmark. Outputs have the shapes and dtypes of
// the allocating versions above; the inputs may have any strides.
void glu_fwd_out(at::Tensor& y, const at::Tensor& gate, const at::Tensor& up,
                 std::string_view activation);
void glu_bwd_out(at::Tensor& grad_gate, at::Tensor& grad_up, const at::Tensor& grad_y,
                 const at::Tensor& gate, const at::Tensor& up, std::string_view activation);
void glu_packed_fwd_out(at::Tensor& y, const at::Tensor& x, std::string_view activation,
                        bool gate_first = true);
void act_fwd_out(at::Tensor& y, const at::Tensor& x, std::string_view activation);

}  // namespace archext
