// CUDA C++ implementation of projector, registered as the internal ops mmfast::_projector_cuda
// and mmfast::_projector_backward_cuda that the chooser in mmfast/ops/projector.py calls.
//
// The GEMMs that carry an epilogue go through cuBLASLt; the plain ones through ATen (cuBLAS):
//   forward   tanh form:  h, act = one cuBLASLt GEMM with CUBLASLT_EPILOGUE_GELU_AUX_BIAS
//                         (D = gelu(x w1^T + b1) = act, aux = the pre-activation = h)
//             exact form: h = cuBLASLt GEMM with CUBLASLT_EPILOGUE_BIAS, then our erf-GELU
//                         kernel act = gelu(h) (cuBLASLt's GELU epilogues are the tanh form)
//             out = b2 + act w2^T
//   backward  tanh form:  grad_h = cuBLASLt GEMM g w2 with CUBLASLT_EPILOGUE_DGELU_BGRAD
//                         (times gelu'(h), aux = h; its bias gradient is b1's), and act = gelu(h)
//                         recomputed by our kernel when w2 needs a gradient
//             exact form: grad_h = g w2, then our one fused pass over h: act = gelu(h) and
//                         grad_h *= gelu'(h), with b1's float32 column partials
//             grad_w2 = g^T act, grad_b2 = sum g, grad_w1 = grad_h^T x, grad_x = grad_h w1
// Row-major [M, N] buffers are column-major [N, M] to cuBLASLt, so every call is written as
// D^T = B^T A^T. The chooser requires in/hidden/out features to be multiples of 8 (the aux
// buffer's leading dimension, and 16-byte alignment of every row).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <array>

#include "cuda/dispatch.cuh"
#include "common/projector.h"

namespace mmfast::cuda {

namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kRows = 32;

#define MMFAST_CUBLASLT_CHECK(expr)                                                      \
  do {                                                                                   \
    const cublasStatus_t status_ = (expr);                                               \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "_projector_cuda: ", #expr, " failed: ", \
                cublasLtGetStatusString(status_));                                       \
  } while (0)

__device__ __forceinline__ void gelu_and_grad(float v, bool tanh_form, float& act, float& d) {
  if (tanh_form) {
    const float t = tanhf(0.79788456080286535588f * (v + 0.044715f * v * v * v));
    act = 0.5f * v * (1.0f + t);
    d = 0.5f * (1.0f + t) +
        0.5f * v * (1.0f - t * t) * 0.79788456080286535588f * (1.0f + 3.0f * 0.044715f * v * v);
  } else {
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752440f));
    act = v * cdf;
    d = cdf + v * 0.39894228040143267794f * __expf(-0.5f * v * v);
  }
}

// One thread per column, kRows rows per block row (coalesced along rows):
//   act[r, c]  = gelu(h[r, c])                 (act != nullptr)
//   grad[r, c] = grad[r, c] * gelu'(h[r, c])    (grad != nullptr)
//   partial[blockIdx.y, c] = sum over the block's rows of the new grad (partial != nullptr)
template <typename T>
__global__ void gelu_pass_kernel(const T* __restrict__ h, T* __restrict__ grad, T* __restrict__ act,
                                 float* __restrict__ partial, int64_t rows, int64_t cols,
                                 bool tanh_form) {
  const int64_t c = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (c >= cols) return;
  float sum = 0.0f;
  const int64_t r_end = min(rows, (blockIdx.y + int64_t(1)) * kRows);
  for (int64_t r = blockIdx.y * int64_t(kRows); r < r_end; ++r) {
    const int64_t i = r * cols + c;
    float a, d;
    gelu_and_grad(float(h[i]), tanh_form, a, d);
    if (act != nullptr) act[i] = T(a);
    if (grad != nullptr) {
      const float g = float(grad[i]) * d;
      grad[i] = T(g);
      sum += g;
    }
  }
  if (partial != nullptr) partial[blockIdx.y * cols + c] = sum;
}

// h, grad, act: [rows, cols] contiguous; returns b1's gradient when want_bias_grad.
Tensor gelu_pass(const Tensor& h, const Tensor& grad, const Tensor& act, bool tanh_form,
                 bool want_bias_grad) {
  const int64_t cols = h.size(-1);
  const int64_t rows = cols == 0 ? 0 : h.numel() / cols;
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  Tensor partial = want_bias_grad ? at::zeros({std::max<int64_t>(row_blocks, 1), cols},
                                              h.options().dtype(at::kFloat))
                                  : Tensor();
  if (rows > 0) {
    const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                    static_cast<unsigned>(row_blocks));
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_float_types(h.scalar_type(), "_projector_cuda", [&](auto tag) {
      using T = decltype(tag);
      gelu_pass_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(h.const_data_ptr()),
          grad.defined() ? static_cast<T*>(grad.mutable_data_ptr()) : nullptr,
          act.defined() ? static_cast<T*>(act.mutable_data_ptr()) : nullptr,
          partial.defined() ? partial.mutable_data_ptr<float>() : nullptr, rows, cols, tanh_form);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return want_bias_grad ? partial.sum(0).to(h.scalar_type()) : Tensor();
}

cudaDataType_t cuda_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "_projector_cuda: unsupported dtype ", dtype);
  }
}

// RAII owners of the cuBLASLt descriptors of one call.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Column-major D [m, n] (ld ldd) = epilogue(op_a(A) [m, k] · op_b(B) [k, n]), with
// op_a(A) = A^T when trans_a (A stored [k, m], ld lda) and op_b(B) = B (stored [k, n], ld ldb).
// bias: [m] (BIAS / GELU_AUX_BIAS input, or DGELU_BGRAD output); aux: [m, n] with ld ldd.
void lt_matmul(cublasLtEpilogue_t epilogue, bool trans_a, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, void* d, int64_t ldd,
               void* bias, void* aux, at::ScalarType dtype) {
  const cudaDataType_t type = cuda_type(dtype);
  LtDescs desc;
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = CUBLAS_OP_N;
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias != nullptr) {
    MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)));
  }
  if (aux != nullptr) {
    MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
    MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldd, sizeof(ldd)));
    MMFAST_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &type, sizeof(type)));
  }
  MMFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, type, trans_a ? k : m, trans_a ? m : k, lda));
  MMFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, type, k, n, ldb));
  MMFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, type, m, n, ldd));

  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_size, sizeof(workspace_size)));
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  MMFAST_CUBLASLT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d,
                                                       desc.d, desc.pref, 1, &heuristic, &found));
  TORCH_CHECK(found > 0, "_projector_cuda: cuBLASLt has no algorithm for this GEMM (m=", m,
              ", n=", n, ", k=", k, ", epilogue ", static_cast<int>(epilogue), ")");
  const float alpha = 1.0f, beta = 0.0f;
  MMFAST_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.op, &alpha, a, desc.a, b, desc.b, &beta, d,
                                       desc.d, d, desc.d, &heuristic.algo, workspace,
                                       workspace_size, at::cuda::getCurrentCUDAStream()));
}

std::tuple<Tensor, Tensor> projector_cuda(const Tensor& x, const Tensor& w1,
                                          const std::optional<Tensor>& b1, const Tensor& w2,
                                          const std::optional<Tensor>& b2,
                                          c10::string_view approximate) {
  const bool tanh_form = check_projector_args("projector", x, w1, b1, w2, b2, approximate);
  TORCH_CHECK(x.is_cuda(), "_projector_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cin = w1.size(1), hidden = w1.size(0), hout = w2.size(0);
  const auto x2 = x.reshape({-1, cin}).contiguous();
  const auto w1c = w1.contiguous();
  const int64_t rows = x2.size(0);
  auto h = at::empty({rows, hidden}, x.options());
  auto act = at::empty_like(h);
  const bool has_b1 = b1.has_value() && b1->defined();
  const Tensor bias1 = has_b1 ? b1->contiguous() : Tensor();
  void* bias1_ptr = has_b1 ? const_cast<void*>(bias1.const_data_ptr()) : nullptr;
  if (rows > 0) {
    // h^T [hidden, rows] = w1 (stored [cin, hidden] column-major, transposed) · x^T [cin, rows]
    if (tanh_form) {
      lt_matmul(has_b1 ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX, true,
                hidden, rows, cin, w1c.const_data_ptr(), cin, x2.const_data_ptr(), cin,
                act.mutable_data_ptr(), hidden, bias1_ptr, h.mutable_data_ptr(), x.scalar_type());
    } else {
      lt_matmul(has_b1 ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, true, hidden, rows,
                cin, w1c.const_data_ptr(), cin, x2.const_data_ptr(), cin, h.mutable_data_ptr(),
                hidden, bias1_ptr, nullptr, x.scalar_type());
      gelu_pass(h, Tensor(), act, false, false);
    }
  }
  auto out = b2.has_value() && b2->defined() ? at::addmm(*b2, act, w2.t()) : at::mm(act, w2.t());
  auto out_shape = x.sizes().vec();
  out_shape.back() = hout;
  auto h_shape = x.sizes().vec();
  h_shape.back() = hidden;
  return {out.view(out_shape), h.view(h_shape)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> projector_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& h, const std::optional<Tensor>& w1,
    const Tensor& w2, c10::string_view approximate, std::array<bool, 5> mask) {
  const bool tanh_form = check_projector_backward_args("projector_backward", grad_out, x, h, w1,
                                                       w2, approximate, mask[0]);
  TORCH_CHECK(x.is_cuda(), "_projector_backward_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = h.size(-1), hout = w2.size(0);
  const auto g = grad_out.reshape({-1, hout}).contiguous();
  const auto h2 = h.reshape({-1, hidden}).contiguous();
  const auto x2 = x.reshape({-1, x.size(-1)});
  const auto w2c = w2.contiguous();
  const int64_t rows = h2.size(0);
  const bool need_grad_h = mask[0] || mask[1] || mask[2];
  std::array<Tensor, 5> grads;
  Tensor act = mask[3] ? at::empty_like(h2) : Tensor();
  Tensor grad_h = need_grad_h ? at::empty_like(h2) : Tensor();
  if (need_grad_h && rows > 0 && tanh_form) {
    // grad_h^T [hidden, rows] = w2 (stored [hidden, hout] column-major) · g^T [hout, rows],
    // times gelu'(h) in the epilogue, which also sums b1's gradient over rows.
    Tensor bgrad = at::empty({hidden}, x.options());
    lt_matmul(CUBLASLT_EPILOGUE_DGELU_BGRAD, false, hidden, rows, hout, w2c.const_data_ptr(),
              hidden, g.const_data_ptr(), hout, grad_h.mutable_data_ptr(), hidden,
              bgrad.mutable_data_ptr(), const_cast<void*>(h2.const_data_ptr()), x.scalar_type());
    if (mask[2]) grads[2] = bgrad;
    if (mask[3]) gelu_pass(h2, Tensor(), act, true, false);
  } else if (need_grad_h) {
    if (rows > 0) at::mm_out(grad_h, g, w2c); else grad_h.zero_();
    grads[2] = gelu_pass(h2, grad_h, act, tanh_form, mask[2]);
  } else if (mask[3]) {
    gelu_pass(h2, Tensor(), act, tanh_form, false);
  }
  if (mask[2] && !grads[2].defined()) grads[2] = at::zeros({hidden}, x.options());
  if (mask[3]) {
    grads[3] = at::mm(g.t(), act);
    act.reset();
  }
  if (mask[4]) grads[4] = g.sum(0);
  if (mask[1]) grads[1] = at::mm(grad_h.t(), x2);
  if (mask[0]) grads[0] = at::mm(grad_h, *w1).view(x.sizes());
  for (auto& t : grads) {
    if (!t.defined()) t = at::empty({0}, x.options());
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("_projector_cuda", &projector_cuda);
  m.impl("_projector_backward_cuda", &projector_backward_cuda);
}

}  // namespace mmfast::cuda
