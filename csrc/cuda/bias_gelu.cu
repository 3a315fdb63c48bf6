// CUDA C++ implementation of bias_gelu, registered as the internal op mmfast::_bias_gelu_cuda
// (and its backward) that the chooser in mmfast/ops/bias_gelu.py calls.
//
// Every thread owns one 16-byte vector of columns and walks kRows rows, so loads and stores are
// 16 bytes wide and coalesced along a row; the backward reduces its bias gradient over those
// rows in registers and writes one float32 partial per row block, summed afterwards in a fixed
// order (deterministic, no atomics). Needs cols % (16 / sizeof(T)) == 0 and 16-byte aligned
// rows: the chooser sends everything else to Triton.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/dispatch.cuh"
#include "common/bias_gelu.h"

namespace mmfast::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kRows = 32;

__device__ __forceinline__ float gelu_f(float v, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.79788456080286535588f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
  }
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f));
}

__device__ __forceinline__ float dgelu_f(float v, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf(0.79788456080286535588f * (v + 0.044715f * v * v * v));
    const float du = 0.79788456080286535588f * (1.0f + 3.0f * 0.044715f * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du;
  }
  const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752440f));
  return cdf + v * 0.39894228040143267794f * __expf(-0.5f * v * v);
}

// 16 bytes of T, viewed as VEC elements.
template <typename T>
struct alignas(16) Pack {
  static constexpr int VEC = 16 / sizeof(T);
  T v[VEC];
};

template <typename T>
__global__ void bias_gelu_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                         T* __restrict__ out, int64_t rows, int64_t cols,
                                         bool tanh_form) {
  using P = Pack<T>;
  const int64_t vcols = cols / P::VEC;
  const int64_t vc = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (vc >= vcols) return;
  const P b = reinterpret_cast<const P*>(bias)[vc];
  const int64_t r_end = min(rows, (blockIdx.y + int64_t(1)) * kRows);
  for (int64_t r = blockIdx.y * int64_t(kRows); r < r_end; ++r) {
    P in = reinterpret_cast<const P*>(x + r * cols)[vc];
    P o;
#pragma unroll
    for (int i = 0; i < P::VEC; ++i) {
      o.v[i] = T(gelu_f(float(in.v[i]) + float(b.v[i]), tanh_form));
    }
    reinterpret_cast<P*>(out + r * cols)[vc] = o;
  }
}

template <typename T>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                          const T* __restrict__ bias, T* __restrict__ grad_x,
                                          float* __restrict__ partial,  // [row_blocks, cols]
                                          int64_t rows, int64_t cols, bool tanh_form) {
  using P = Pack<T>;
  const int64_t vcols = cols / P::VEC;
  const int64_t vc = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (vc >= vcols) return;
  const P b = reinterpret_cast<const P*>(bias)[vc];
  float acc[P::VEC] = {};
  const int64_t r_end = min(rows, (blockIdx.y + int64_t(1)) * kRows);
  for (int64_t r = blockIdx.y * int64_t(kRows); r < r_end; ++r) {
    const P in = reinterpret_cast<const P*>(x + r * cols)[vc];
    const P g = reinterpret_cast<const P*>(grad + r * cols)[vc];
    P o;
#pragma unroll
    for (int i = 0; i < P::VEC; ++i) {
      const float d = float(g.v[i]) * dgelu_f(float(in.v[i]) + float(b.v[i]), tanh_form);
      o.v[i] = T(d);
      acc[i] += d;
    }
    reinterpret_cast<P*>(grad_x + r * cols)[vc] = o;
  }
#pragma unroll
  for (int i = 0; i < P::VEC; ++i) partial[blockIdx.y * cols + vc * P::VEC + i] = acc[i];
}

void check_vectorizable(const at::Tensor& t, const char* name, int64_t vec) {
  TORCH_CHECK(t.is_cuda(), "_bias_gelu_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.size(-1) % vec == 0, "_bias_gelu_cuda: the last dim of ", name,
              " must be a multiple of ", vec, " for 16-byte vector access, got ", t.size(-1));
}

int64_t vec_width(at::ScalarType dtype) { return 16 / c10::elementSize(dtype); }

dim3 grid_for(int64_t rows, int64_t cols, int64_t vec) {
  return dim3(static_cast<unsigned>((cols / vec + kThreads - 1) / kThreads),
              static_cast<unsigned>((rows + kRows - 1) / kRows));
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  const bool tanh_form = check_bias_gelu_args(x, bias, approximate);
  const int64_t vec = vec_width(x.scalar_type());
  check_vectorizable(x, "x", vec);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto bc = bias.contiguous();
  auto out = at::empty_like(xc);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  if (rows == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "_bias_gelu_cuda", [&](auto tag) {
    using T = decltype(tag);
    bias_gelu_forward_kernel<T><<<grid_for(rows, cols, vec), kThreads, 0, stream>>>(
        static_cast<const T*>(xc.const_data_ptr()), static_cast<const T*>(bc.const_data_ptr()),
        static_cast<T*>(out.mutable_data_ptr()), rows, cols, tanh_form);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_out,
                                                           const at::Tensor& x,
                                                           const at::Tensor& bias,
                                                           c10::string_view approximate) {
  const bool tanh_form = check_bias_gelu_backward_args(grad_out, x, bias, approximate);
  const int64_t vec = vec_width(x.scalar_type());
  check_vectorizable(x, "x", vec);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto gc = grad_out.contiguous();
  const auto bc = bias.contiguous();
  auto grad_x = at::empty_like(xc);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  auto partial = at::zeros({std::max<int64_t>(row_blocks, 1), cols}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_float_types(x.scalar_type(), "_bias_gelu_cuda", [&](auto tag) {
      using T = decltype(tag);
      bias_gelu_backward_kernel<T><<<grid_for(rows, cols, vec), kThreads, 0, stream>>>(
          static_cast<const T*>(gc.const_data_ptr()), static_cast<const T*>(xc.const_data_ptr()),
          static_cast<const T*>(bc.const_data_ptr()), static_cast<T*>(grad_x.mutable_data_ptr()),
          partial.mutable_data_ptr<float>(), rows, cols, tanh_form);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x, partial.sum(0).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("_bias_gelu_cuda", &bias_gelu_cuda);
  m.impl("_bias_gelu_backward_cuda", &bias_gelu_backward_cuda);
}

}  // namespace mmfast::cuda
