// Every schema of the mmfast operator library, in one place. Kernels register per device:
// CPU in csrc/cpu/*.cpp, CUDA C++ internals (mmfast::_<op>_cuda) in csrc/cuda/*.cu, and the
// public CUDA kernels from Python (mmfast/ops/*.py), which choose among Triton and CUDA C++.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

// `import mmfast._C` only needs to load this library so that the registrations below run.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace {

std::string cpu_isa() { return mmfast::cpu::isa_name(mmfast::cpu::active_isa()); }

std::string cpu_bf16_gemm() { return mmfast::cpu::bf16_gemm_path(); }
std::string cpu_f16_gemm() { return mmfast::cpu::f16_gemm_path(); }
std::string cpu_f32_gemm() { return mmfast::cpu::f32_gemm_path(); }
std::string cpu_xattn_bf16() { return mmfast::cpu::xattn_bf16_path(); }
std::string cpu_merge_gemm() { return mmfast::cpu::merge_gemm_path(); }

bool cpu_bf16_tile_gemm() { return mmfast::cpu::bf16_tile_gemm(); }

bool has_cuda_kernels() {
#ifdef MMFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(mmfast, m) {
  // Build facts: which vectorized CPU build runs, what runs the projector's bfloat16 GEMMs on
  // CPU, whether CUDA C++ kernels were compiled.
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_cpu_bf16_gemm() -> str", &cpu_bf16_gemm);
  m.def("_cpu_f16_gemm() -> str", &cpu_f16_gemm);
  m.def("_cpu_f32_gemm() -> str", &cpu_f32_gemm);
  m.def("_cpu_xattn_bf16() -> str", &cpu_xattn_bf16);
  m.def("_cpu_merge_gemm() -> str", &cpu_merge_gemm);
  m.def("_cpu_bf16_tile_gemm() -> bool", &cpu_bf16_tile_gemm);
  m.def("_has_cuda_kernels() -> bool", &has_cuda_kernels);

  m.def("bias_gelu(Tensor x, Tensor bias, str approximate=\"none\") -> Tensor");
  m.def("bias_gelu_backward(Tensor grad_out, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)");
  m.def("_bias_gelu_cuda(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def("_bias_gelu_backward_cuda(Tensor grad_out, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)");

  // Image-token compression (issue 5). bipartite_merge returns (merged [B, N-r, C],
  // merged_size [B, N-r] float32, dest [B, N] int64); prune_tokens returns (kept, index).
  m.def("bipartite_merge(Tensor x, Tensor metric, int r, Tensor? size=None, bool protect_first=False) -> (Tensor, Tensor, Tensor)");
  m.def("bipartite_merge_backward(Tensor grad_merged, Tensor dest, Tensor? size, Tensor merged_size) -> Tensor");
  m.def("_bipartite_merge_cuda(Tensor x, Tensor perm, Tensor starts, Tensor? size) -> (Tensor, Tensor)");
  m.def("_bipartite_merge_backward_cuda(Tensor grad_merged, Tensor dest, Tensor? size, Tensor merged_size) -> Tensor");
  m.def("prune_tokens(Tensor x, Tensor scores, int keep) -> (Tensor, Tensor)");
  m.def("prune_tokens_backward(Tensor grad_kept, Tensor index, int n) -> Tensor");

  // cross_attention returns (out, lse) always; the Python wrapper drops lse unless return_lse.
  // The mask tensors are not keyword-only in the schema: register_autograd requires that.
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens=None, Tensor? q_media=None, Tensor? kv_media=None, str media_mode=\"immediate\", float? scale=None) -> (Tensor, Tensor)");
  m.def("cross_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? kv_lens, Tensor? q_media, Tensor? kv_media, str media_mode, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("key_attention_mass(Tensor q, Tensor k, Tensor? kv_lens=None, Tensor? q_media=None, Tensor? kv_media=None, str media_mode=\"immediate\", float? scale=None) -> Tensor");

  // projector: out = gelu(x w1^T + b1) w2^T + b2; also returns the pre-activation h that the
  // backward needs (mmfast.ops.projector returns out only). output_mask: (x, w1, b1, w2, b2);
  // a gradient not asked for comes back as an empty tensor. w1 is needed only for grad_x (a
  // frozen x needs none, and then the forward does not keep w1).
  // keep_h=False (no gradient will be taken): the GELU runs in place and h comes back empty, so
  // inference holds one [N, hidden] buffer less.
  m.def("projector(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate=\"none\", bool keep_h=True) -> (Tensor, Tensor)");
  m.def("projector_backward(Tensor grad_out, Tensor x, Tensor h, Tensor? w1, Tensor w2, str approximate, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CPU training graph as two autograd nodes, so that w2's gradient reaches w2.grad before
  // w1's is computed (csrc/cpu/projector.cpp): link = _projector_link(x, w1) [H, M] (zero
  // strides) stands for the first layer's output; _projector_linked is projector's forward,
  // also taking link; its backward (_head, output_mask: link, b1, w2, b2) returns grad_h^T
  // [H, M] as link's gradient, from which link's (_tail, output_mask: x, w1) takes x's and w1's.
  m.def("_projector_link(Tensor x, Tensor w1) -> Tensor");
  m.def("_projector_linked(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor link, str approximate=\"none\") -> (Tensor, Tensor)");
  m.def("_projector_backward_head(Tensor grad_out, Tensor x, Tensor h, Tensor w2, str approximate, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_projector_backward_tail(Tensor grad_link, Tensor x, Tensor? w1, bool[2] output_mask) -> (Tensor, Tensor)");
  // Inference with weights packed once (CPU, mmfast's bfloat16 tile GEMMs; used by
  // mmfast.nn.Projector.prepack): a weight [N, K] packed as [ceil(N/64), ceil(K/2), 64, 2],
  // then the forward from both packed copies (the weights they were made from are passed for
  // the shape checks).
  m.def("_projector_pack_weight(Tensor w) -> Tensor");
  m.def("_projector_prepacked(Tensor x, Tensor w1, Tensor w1_packed, Tensor? b1, Tensor w2, Tensor w2_packed, Tensor? b2, str approximate=\"none\") -> Tensor");
  m.def("_projector_cuda(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate) -> (Tensor, Tensor)");
  m.def("_projector_backward_cuda(Tensor grad_out, Tensor x, Tensor h, Tensor? w1, Tensor w2, str approximate, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // projector_splice: embeds with the image_mask rows replaced, in order, by projector(x) rows;
  // returns (out, h) (h empty when keep_h=False). output_mask: (x, w1, b1, w2, b2, embeds).
  m.def("projector_splice(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor embeds, Tensor image_mask, str approximate=\"none\", bool keep_h=True) -> (Tensor, Tensor)");
  m.def("projector_splice_backward(Tensor grad_out, Tensor x, Tensor h, Tensor? w1, Tensor w2, Tensor image_mask, str approximate, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
