// Host-side pieces of the activation family shared by the CPU and CUDA launchers and the C++
// API: the activation names, argument checks, the [rows, n] addressing of inputs, and the op
// entry points (one per schema in registration.cpp), written once over a backend's two
// implementation functions.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "common/activation_params.h"
#include "common/checks.h"

namespace archext {

// ---- activation names -----------------------------------------------------------------------
inline Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, op, ": unknown activation '", name,
              "', expected one of relu, gelu (erf), gelu_tanh, silu");
}

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
    case Activation::kSilu: return "silu";
  }
  return "?";
}

// ---- [rows, n] addressing -------------------------------------------------------------------
// The elements between consecutive rows when t can be addressed as rows of its last dimension,
// each contiguous (unit last stride, and the leading dimensions collapse to one stride), as a
// contiguous tensor or a view like x.chunk(2, -1) can; -1 otherwise.
inline int64_t row_stride(const at::Tensor& t) {
  const int64_t dims = t.dim();
  if (dims == 0) return 1;
  const int64_t n = t.size(dims - 1);
  if (n > 1 && t.stride(dims - 1) != 1) return -1;
  int64_t s = -1, next = 0;
  for (int64_t i = dims - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (s < 0) {
      s = t.stride(i);
    } else if (t.stride(i) != next) {
      return -1;
    }
    next = t.stride(i) * t.size(i);
  }
  return s < 0 ? n : s;
}

// An input addressed as rows: element (r, c) at data + (r * stride + c) elements. `keep` holds
// the storage: the tensor itself, or its contiguous copy when its strides do not fit.
struct Operand {
  at::Tensor keep;
  const char* data;
  int64_t stride;
};

inline Operand as_rows(const at::Tensor& t) {
  const int64_t s = row_stride(t);
  if (s >= 0) return {t, static_cast<const char*>(t.data_ptr()), s};
  at::Tensor c = t.contiguous();
  const int64_t n = c.dim() ? c.size(-1) : 1;
  return {c, static_cast<const char*>(c.data_ptr()), n};
}

// The gate or up half of a packed [..., 2d] operand.
inline Operand half_of(const Operand& packed, int64_t d, bool second) {
  return {packed.keep, packed.data + (second ? d * packed.keep.element_size() : 0),
          packed.stride};
}

// What a backend's forward and backward are given: raw pointers into checked inputs and
// allocated outputs (see activation_params.h for the addressing), rows * n > 0.
struct ActFwdArgs {
  at::ScalarType dtype;
  c10::Device device;
  Activation act;
  int64_t rows, n;
  const void* x;
  int64_t x_stride;
  const void* up;  // null: the plain activation
  int64_t up_stride;
  void* y;
  int64_t y_stride;
};

struct ActBwdArgs {
  at::ScalarType dtype;
  c10::Device device;
  Activation act;
  int64_t rows, n;
  const void* dy;
  int64_t dy_stride;
  const void* x;
  int64_t x_stride;
  const void* up;  // null: the plain activation
  int64_t up_stride;
  void* dx;
  int64_t dx_stride;
  void* dup;  // non-null iff up is
  int64_t dup_stride;
};

// The kernel parameters of a backend's arguments, typed as T (the dtype they were checked for).
template <typename T>
ActFwdParams<T> typed_params(const ActFwdArgs& a) {
  return {static_cast<const T*>(a.x), static_cast<const T*>(a.up), static_cast<T*>(a.y),
          a.x_stride, a.up_stride, a.y_stride, a.rows, a.n, a.act};
}

template <typename T>
ActBwdParams<T> typed_params(const ActBwdArgs& a) {
  return {static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const T*>(a.up),
          static_cast<T*>(a.dx), static_cast<T*>(a.dup), a.dy_stride, a.x_stride, a.up_stride,
          a.dx_stride, a.dup_stride, a.rows, a.n, a.act};
}

using ActFwdImpl = void (*)(const ActFwdArgs&);
using ActBwdImpl = void (*)(const ActBwdArgs&);

// The backends' implementations (cpu/activation_cpu.cpp, cuda/activation_cuda.cu).
namespace cpu {
void act_fwd(const ActFwdArgs& a);
void act_bwd(const ActBwdArgs& a);
}  // namespace cpu
namespace cuda {
void act_fwd(const ActFwdArgs& a);
void act_bwd(const ActBwdArgs& a);
}  // namespace cuda

// Rows and width of an elementwise op over t: the last dimension (1 for a 0-dim tensor).
inline int64_t width_of(const at::Tensor& t) { return t.dim() ? t.size(-1) : 1; }

// Runs a forward: y (contiguous, rows x n) = act(x) [* up]. When every operand is contiguous the
// rows are folded into one, so that the kernels run the whole tensor as one row.
inline void run_fwd(ActFwdImpl impl, Activation act, int64_t rows, int64_t n, const Operand& x,
                    const Operand* up, const at::Tensor& y) {
  if (rows * n == 0) return;
  ActFwdArgs a{y.scalar_type(), y.device(), act, rows, n, x.data, x.stride,
               up ? up->data : nullptr, up ? up->stride : 0, y.data_ptr(), n};
  if (rows > 1 && x.stride == n && (!up || up->stride == n)) {
    a.rows = 1;
    a.n = rows * n;
    a.x_stride = a.up_stride = a.y_stride = a.n;
  }
  impl(a);
}

// Runs a backward into contiguous dx (and dup when up is given), both rows x n; for the packed
// form, dx and dup are the two halves of one [rows, 2n] gradient (out_stride 2n).
inline void run_bwd(ActBwdImpl impl, Activation act, int64_t rows, int64_t n, const Operand& dy,
                    const Operand& x, const Operand* up, void* dx, void* dup, int64_t out_stride,
                    const at::Tensor& like) {
  if (rows * n == 0) return;
  ActBwdArgs a{like.scalar_type(), like.device(), act, rows, n, dy.data, dy.stride, x.data,
               x.stride, up ? up->data : nullptr, up ? up->stride : 0, dx, out_stride, dup,
               out_stride};
  if (rows > 1 && dy.stride == n && x.stride == n && (!up || up->stride == n) && out_stride == n) {
    a.rows = 1;
    a.n = rows * n;
    a.dy_stride = a.x_stride = a.up_stride = a.dx_stride = a.dup_stride = a.n;
  }
  impl(a);
}

// ---- argument checks ------------------------------------------------------------------------
inline Activation check_glu(const char* op, const at::Tensor& gate, const at::Tensor& up,
                            c10::string_view activation) {
  const Activation act = parse_activation(op, activation);
  check_float_input(op, "gate", gate);
  check_like(op, "up", up, "gate", gate, /*same_shape=*/true);
  return act;
}

inline Activation check_glu_packed(const char* op, const at::Tensor& x,
                                   c10::string_view activation) {
  const Activation act = parse_activation(op, activation);
  check_float_input(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op,
              ": expected x with at least 1 dimension (the packed [..., 2 * d] gate and up), "
              "got a scalar");
  TORCH_CHECK(x.size(-1) % 2 == 0, op,
              ": expected an even last dimension of x (the gate and up halves, [..., 2 * d]), "
              "got shape ", x.sizes());
  return act;
}

inline Activation check_act(const char* op, const at::Tensor& x, c10::string_view activation) {
  const Activation act = parse_activation(op, activation);
  check_float_input(op, "x", x);
  return act;
}

// The output shape of the packed forward: x.shape[:-1] + [x.shape[-1] / 2].
inline std::vector<int64_t> packed_out_shape(const at::Tensor& x) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() /= 2;
  return s;
}

inline void check_grad_y(const char* op, const at::Tensor& dy, const at::Tensor& ref,
                         at::IntArrayRef shape, const char* shape_desc) {
  check_like(op, "grad_y", dy, "x", ref, /*same_shape=*/false);
  TORCH_CHECK(dy.sizes() == shape, op, ": expected grad_y of shape ", shape, " (", shape_desc,
              "), got ", dy.sizes());
}

// ---- the ops, over a backend --------------------------------------------------------------
// Forwards into caller-provided contiguous outputs (shared by the ops and the C++ _out API).
inline void glu_fwd_into(ActFwdImpl impl, Activation act, const at::Tensor& y,
                         const at::Tensor& gate, const at::Tensor& up) {
  const int64_t n = width_of(gate);
  if (gate.numel() == 0) return;
  const Operand g = as_rows(gate), u = as_rows(up);
  run_fwd(impl, act, gate.numel() / n, n, g, &u, y);
}

inline void glu_packed_fwd_into(ActFwdImpl impl, Activation act, const at::Tensor& y,
                                const at::Tensor& x, bool gate_first) {
  const int64_t d = x.size(-1) / 2;
  if (x.numel() == 0) return;
  const Operand p = as_rows(x);
  const Operand g = half_of(p, d, !gate_first), u = half_of(p, d, gate_first);
  run_fwd(impl, act, x.numel() / (2 * d), d, g, &u, y);
}

inline void act_fwd_into(ActFwdImpl impl, Activation act, const at::Tensor& y,
                         const at::Tensor& x) {
  const int64_t n = width_of(x);
  if (x.numel() == 0) return;
  run_fwd(impl, act, x.numel() / n, n, as_rows(x), nullptr, y);
}

template <ActFwdImpl Fwd, ActBwdImpl Bwd>
struct ActivationOps {
  static at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up,
                            c10::string_view activation) {
    const Activation act = check_glu("archext::glu_fwd", gate, up, activation);
    at::Tensor y = at::empty_like(gate, at::MemoryFormat::Contiguous);
    glu_fwd_into(Fwd, act, y, gate, up);
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& grad_y,
                                                    const at::Tensor& gate, const at::Tensor& up,
                                                    c10::string_view activation) {
    const char* op = "archext::glu_bwd";
    const Activation act = check_glu(op, gate, up, activation);
    check_like(op, "grad_y", grad_y, "gate", gate, /*same_shape=*/true);
    at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
    at::Tensor dup = at::empty_like(gate, at::MemoryFormat::Contiguous);
    const int64_t n = width_of(gate);
    if (gate.numel() > 0) {
      const Operand d = as_rows(grad_y), g = as_rows(gate), u = as_rows(up);
      run_bwd(Bwd, act, gate.numel() / n, n, d, g, &u, dgate.data_ptr(), dup.data_ptr(), n,
              gate);
    }
    return {dgate, dup};
  }

  static at::Tensor glu_packed_fwd(const at::Tensor& x, c10::string_view activation,
                                   bool gate_first) {
    const Activation act = check_glu_packed("archext::glu_packed_fwd", x, activation);
    at::Tensor y = at::empty(packed_out_shape(x), x.options());
    glu_packed_fwd_into(Fwd, act, y, x, gate_first);
    return y;
  }

  static at::Tensor glu_packed_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                   c10::string_view activation, bool gate_first) {
    const char* op = "archext::glu_packed_bwd";
    const Activation act = check_glu_packed(op, x, activation);
    const auto out_shape = packed_out_shape(x);
    check_grad_y(op, grad_y, x, out_shape, "x.shape[:-1] + [x.shape[-1] / 2]");
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    const int64_t d = x.size(-1) / 2;
    if (x.numel() > 0) {
      const Operand dy = as_rows(grad_y), p = as_rows(x);
      const Operand g = half_of(p, d, !gate_first), u = half_of(p, d, gate_first);
      char* base = static_cast<char*>(dx.data_ptr());
      const int64_t half = d * dx.element_size();
      run_bwd(Bwd, act, x.numel() / (2 * d), d, dy, g, &u, base + (gate_first ? 0 : half),
              base + (gate_first ? half : 0), 2 * d, x);
    }
    return dx;
  }

  static at::Tensor act_fwd(const at::Tensor& x, c10::string_view activation) {
    const Activation act = check_act("archext::act_fwd", x, activation);
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    act_fwd_into(Fwd, act, y, x);
    return y;
  }

  static at::Tensor act_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                            c10::string_view activation) {
    const char* op = "archext::act_bwd";
    const Activation act = check_act(op, x, activation);
    check_like(op, "grad_y", grad_y, "x", x, /*same_shape=*/true);
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    const int64_t n = width_of(x);
    if (x.numel() > 0) {
      run_bwd(Bwd, act, x.numel() / n, n, as_rows(grad_y), as_rows(x), nullptr, dx.data_ptr(),
              nullptr, n, x);
    }
    return dx;
  }
};

// Registers one backend's implementation of every activation schema (in its TORCH_LIBRARY_IMPL).
template <ActFwdImpl Fwd, ActBwdImpl Bwd>
void register_activation_ops(torch::Library& m) {
  using Ops = ActivationOps<Fwd, Bwd>;
  m.impl("glu_fwd", &Ops::glu_fwd);
  m.impl("glu_bwd", &Ops::glu_bwd);
  m.impl("glu_packed_fwd", &Ops::glu_packed_fwd);
  m.impl("glu_packed_bwd", &Ops::glu_packed_bwd);
  m.impl("act_fwd", &Ops::act_fwd);
  m.impl("act_bwd", &Ops::act_bwd);
}

}  // namespace archext
