// Argument validation shared by every launcher (CPU and CUDA). Each check names the op and the
// argument, and says what was expected and what was given, so that bad input fails with a
// readable TORCH_CHECK error before any kernel runs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace archext {

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

// x must be a floating tensor of a supported dtype; float64 only on the CPU (it exists for
// gradcheck, the CUDA kernels are not instantiated for it).
inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected ", name,
              " to be float32, float16, bfloat16 (or float64 on the CPU), got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() != c10::kDouble || t.device().is_cpu(), op, ": ", name,
              " is float64 on ", t.device(), "; float64 is supported on the CPU only");
}

// `other` must match `ref` (named ref_name) in dtype, device and, when `same_shape`, shape.
inline void check_like(const char* op, const char* name, const at::Tensor& other,
                       const char* ref_name, const at::Tensor& ref, bool same_shape) {
  TORCH_CHECK(other.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(other.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              " (the device of ", ref_name, "), got ", other.device());
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ",
              ref.scalar_type(), " (the dtype of ", ref_name, "), got ", other.scalar_type());
  if (same_shape) {
    TORCH_CHECK(other.sizes() == ref.sizes(), op, ": expected ", name, " of shape ", ref.sizes(),
                " (the shape of ", ref_name, "), got ", other.sizes());
  }
}

// A per-feature parameter (weight or bias): 1-D of length n, same dtype and device as x.
inline void check_param(const char* op, const char* name, const c10::optional<at::Tensor>& p,
                        const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return;
  check_like(op, name, *p, "x", x, /*same_shape=*/false);
  const int64_t n = x.size(-1);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, op, ": expected ", name, " of shape [", n,
              "] (the last dimension of x), got ", p->sizes());
}

// Per-row statistics saved by a forward (mean, rstd): shape x.shape[:-1], dtype float32
// (float64 for float64 input), on x's device.
inline void check_stats(const char* op, const char* name, const at::Tensor& s,
                        const at::Tensor& x) {
  TORCH_CHECK(s.defined(), op, ": ", name, " is undefined");
  const auto acc = x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
  TORCH_CHECK(s.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ",
              s.device());
  TORCH_CHECK(s.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, ", got ",
              s.scalar_type());
  TORCH_CHECK(s.numel() * x.size(-1) == x.numel() && s.sizes() == x.sizes().slice(0, x.dim() - 1),
              op, ": expected ", name, " of shape ", x.sizes().slice(0, x.dim() - 1),
              " (x.shape[:-1]), got ", s.sizes());
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A tensor an op writes must not have elements that share memory (an expanded tensor): two
// threads would write one location. As PyTorch's in-place and out= ops.
inline void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " is written but has elements that share memory (an expanded tensor, strides ",
              t.strides(), "); pass a tensor with its own memory per element");
}

// A tensor an op writes (`out`) and another it reads or writes (`other`) must not share memory,
// partly or wholly; `allow_same` admits the very same memory, shape and strides (an elementwise
// op in place). Views whose overlap cannot be decided cheaply (not dense) pass, as in PyTorch.
inline void check_no_overlap(const char* op, const char* out_name, const at::Tensor& out,
                             const char* other_name, const at::Tensor& other,
                             bool allow_same = false) {
  const at::MemOverlapStatus s = at::get_overlap_status(out, other);
  TORCH_CHECK(s != at::MemOverlapStatus::Partial &&
                  (allow_same || s != at::MemOverlapStatus::Full),
              op, ": ", out_name, " and ", other_name, " share memory",
              s == at::MemOverlapStatus::Full ? "" : " in part",
              allow_same ? " (only the very same tensor is allowed)" : "",
              "; pass tensors that do not overlap");
}

}  // namespace archext
