// Every archext op schema, in one place. Backends register their kernels with
// TORCH_LIBRARY_IMPL in their own files (cpu/*_cpu.cpp, cuda/*_cuda.cu); autograd and fake
// (meta) kernels are registered from Python (archext/ops/).
//
// Conventions: inputs of any leading shape, normalised over the last dimension; per-row
// statistics (mean, rstd) have shape x.shape[:-1] and dtype float32 (float64 for float64 x);
// a gradient that was not requested is returned as an empty [0] tensor.
#include <torch/library.h>

#include "common/cuda_vector_paths.h"
#include "common/schemas.h"
#include "cpu/prefault.h"

namespace archext {

void define_ops(torch::Library& m) {
  // ---- norm family ----------------------------------------------------------------------
  // Mixed precision, a float32 residual stream beside bfloat16/float16 activations (as
  // Megatron's fp32 residual connection): an add forward with a 16-bit x and a float32 residual
  // returns h in float32 and y in x's dtype; a plain forward of a float32 x with out_dtype
  // bfloat16/float16 writes y in out_dtype (otherwise y has x's dtype; out_dtype None = x's).
  // Weight and bias are then in y's dtype or float32. A backward with a float32 x and a 16-bit
  // grad_y returns grad_x (and takes grad_h) in float32, and the weight and bias gradients in
  // x's dtype (float32: summed in float32, rounded by the caller to the parameters' dtype).
  // y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset); weight_offset = 1 for Gemma.
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps, float weight_offset, ScalarType? out_dtype=None) -> (Tensor y, Tensor rstd)");
  // h = x + residual; y = rms_norm(h). Returns h for the next residual add.
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps, float weight_offset) -> (Tensor y, Tensor h, Tensor rstd)");
  // x is the normalised input (h for the add variant); grad_h, the gradient arriving on h
  // from its other use, is summed into grad_x.
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, float weight_offset, Tensor? grad_h, bool compute_dweight) -> (Tensor grad_x, Tensor grad_weight)");
  // y = (x - mean) * rstd * weight + bias; weight and bias each optional.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType? out_dtype=None) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? grad_h, bool compute_dweight, bool compute_dbias) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // ---- positions: rotary embedding ---------------------------------------------------------
  // q [B, S, Hq, D] and k [B, S, Hk, D] (any strides, unit stride on D) rotated by the float32
  // cos/sin cache [P, R/2] (R = rotary_dim <= D) at positions [S] or [B, S] (int64, in [0, P)).
  // interleaved: GPT-J pairs (2i, 2i+1); else GPT-NeoX / Llama rotate_half pairs (i, i + R/2).
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, bool interleaved) -> (Tensor q_out, Tensor k_out)");
  // The inverse rotation (the backward of rope_fwd).
  m.def("rope_bwd(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, Tensor positions, bool interleaved) -> (Tensor grad_q_in, Tensor grad_k_in)");
  // In place, for inference (e.g. into a KV cache).
  m.def("rope_fwd_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions, bool interleaved) -> ()");

  // ---- activation family ----------------------------------------------------------------
  // `activation` is one of "relu", "gelu" (erf, F.gelu(approximate='none')), "gelu_tanh"
  // (F.gelu(approximate='tanh')), "silu". Elementwise over any shape; outputs are contiguous.
  // The backwards recompute the activation from the inputs (nothing else is saved) and give
  // every gradient of the op in one pass.
  // Gated (GLU variants: ReGLU, GeGLU, SwiGLU): y = act(gate) * up, gate and up of one shape.
  m.def("glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("glu_bwd(Tensor grad_y, Tensor gate, Tensor up, str activation) -> (Tensor grad_gate, Tensor grad_up)");
  // Packed: x = [..., 2 * d], the output of one fused gate+up projection; gate_first says
  // which half is the gate (x[..., :d] when true). y = [..., d]; grad_x is [..., 2 * d].
  m.def("glu_packed_fwd(Tensor x, str activation, bool gate_first) -> Tensor");
  m.def("glu_packed_bwd(Tensor grad_y, Tensor x, str activation, bool gate_first) -> Tensor grad_x");
  // Plain: y = act(x).
  m.def("act_fwd(Tensor x, str activation) -> Tensor");
  m.def("act_bwd(Tensor grad_y, Tensor x, str activation) -> Tensor grad_x");
  // ---- stability family -----------------------------------------------------------------
  // Cross-entropy over logits [N, V] (unit stride on V) and target [N] (int64): per row, with
  // z = softcap * tanh(logits / softcap) (softcap 0: z = logits) and lse = logsumexp(z),
  // loss = (1 - eps)(lse - z[t]) + eps (lse - mean z) + z_loss_coef lse^2, z_loss =
  // z_loss_coef lse^2, both 0 where target == ignore_index. Per-row results in float32
  // (float64 for float64 logits); lse is saved for the backward.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, float z_loss_coef, float softcap) -> (Tensor loss, Tensor z_loss, Tensor lse)");
  // grad_loss / grad_z_loss: per-row gradients of the two outputs; grad_logits is contiguous.
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor? grad_z_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing, float z_loss_coef, float softcap) -> Tensor grad_logits");
  // Attention softmax over the last dim of x [..., Sq, Sk] (rank 2 to 4): s = softcap(scale x)
  // + bias (bias broadcast to x), keys outside the causal / sliding window (window >= 1, or -1
  // for none; bottom-right aligned) get probability 0; a row with no visible key is zeros.
  m.def("softmax_fwd(Tensor x, Tensor? bias, float scale, float softcap, bool causal, int window) -> Tensor y");
  // grad_scores (when asked) is the gradient of s, i.e. of the bias before its broadcast.
  m.def("softmax_bwd(Tensor grad_y, Tensor y, Tensor? x, float scale, float softcap, bool want_grad_scores) -> (Tensor grad_x, Tensor grad_scores)");
  // y = cap * tanh(x / cap), elementwise; outputs contiguous.
  m.def("softcap_fwd(Tensor x, float cap) -> Tensor");
  m.def("softcap_bwd(Tensor grad_y, Tensor x, float cap) -> Tensor grad_x");
  // ---- attention --------------------------------------------------------------------------
  // Tiled (flash-style) attention with an online softmax: the [Sq, Sk] scores are never held.
  // q [B, Sq, Hq, D], k and v [B, Sk, Hk, D] (Hq a multiple of Hk: grouped-query; unit stride
  // on D, any other strides). Query i sits at key position p = i + Sk - Sq (bottom-right, as
  // softmax_fwd). Its logit for key j is s = softcap * tanh(scale q.k / softcap) (softcap 0:
  // scale q.k) + rel_bias[h, j - p + Sk - 1] (rel_bias [Hq, Sq + Sk - 1], float32 (float64 for
  // float64 q): ALiBi, T5 buckets); key j is visible when (!causal or j <= p) and (window < 1 or
  // p - j < window) and (segment_ids absent or segment_ids[b, p] == segment_ids[b, j]), with
  // segment_ids [B, Sk] int32 (packed documents). o [B, Sq, Hq, D] contiguous in q's dtype; lse
  // [B, Hq, Sq] float32 (float64 for float64), -inf on a row with no visible key, whose o is 0.
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? segment_ids, float scale, float softcap, bool causal, int window) -> (Tensor o, Tensor lse)");
  // grad_bias [Hq, Sq + Sk - 1] when want_grad_bias (and rel_bias given), else an empty [0].
  m.def("flash_attn_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? rel_bias, Tensor? segment_ids, float scale, float softcap, bool causal, int window, bool want_grad_bias) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias)");
  // QK-norm fused with RoPE, q [B, S, Hq, D] and k [B, S, Hk, D] (any strides): RMSNorm of each
  // head over D (per_head, weights [D] shared by the heads) or of each token over all its heads
  // (weights [H * D]), times (weight + weight_offset), then the rotation of rope_fwd. rstd:
  // [B, S, H] (per head) or [B, S], float32 (float64 for float64 inputs).
  m.def("qk_norm_rope_fwd(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, Tensor positions, float eps, float weight_offset, bool per_head, bool interleaved) -> (Tensor q_out, Tensor k_out, Tensor q_rstd, Tensor k_rstd)");
  m.def("qk_norm_rope_bwd(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, Tensor positions, Tensor q_rstd, Tensor k_rstd, float weight_offset, bool per_head, bool interleaved) -> (Tensor grad_q_in, Tensor grad_k_in, Tensor grad_q_weight, Tensor grad_k_weight)");
}

}  // namespace archext

TORCH_LIBRARY(archext, m) { archext::define_ops(m); }

#ifdef ARCHEXT_WITH_CUDA_EMU
// The CPU kernels again under archext_cpu, where the emulated CUDA backend sends float64 (which
// it has no kernels for, as the real one has none).
TORCH_LIBRARY(archext_cpu, m) { archext::define_ops(m); }
#endif


// Test hooks, not API: the CPU kernels' vectorised elementary functions (fn: exp, erf, tanh,
// erf_fast) on a float32 tensor, at the current CPU ISA, for tests/test_activation.py; the
// number of output blocks prefaulted and of outputs written with streaming stores so far
// (cpu/prefault.h), for tests/test_reliability.py.
TORCH_LIBRARY(archext_testing, m) {
  m.def("vec_math(Tensor x, str fn) -> Tensor");
  m.def("prefault_blocks() -> int", [] { return archext::cpu::prefault_blocks(); });
  m.def("streamed_outputs() -> int", [] { return archext::cpu::streamed_outputs(); });
  // The CUDA kernels' packed paths on (1) or off (0), or as they are (-1); returns the former
  // state (common/cuda_vector_paths.h).
  m.def("cuda_vector_paths(int on) -> bool", [](int64_t on) {
    const bool before = archext::cuda_vector_paths();
    if (on >= 0) archext::cuda_vector_paths_state.store(on != 0 ? 1 : 0);
    return before;
  });
}
