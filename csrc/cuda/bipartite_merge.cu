// CUDA C++ merge step of bipartite_merge (mmfast::_bipartite_merge_cuda) and its backward
// (mmfast::_bipartite_merge_backward_cuda), called by the chooser in
// mmfast/ops/bipartite_merge.py after the Triton matching kernel and the selection.
//
// Segmented and deterministic: the tokens of each output row arrive as one segment of `perm`
// (perm[b, starts[b, o] .. starts[b, o + 1]) lists them in token order), one thread block owns
// one output row, and each thread sums its columns over the segment in that fixed order: no
// atomics, the same bits on every run. Rows move as 16-byte vectors when C and the pointers
// allow it, else element by element.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

#include "cuda/dispatch.cuh"
#include "common/bipartite_merge.h"

namespace mmfast::cuda {

namespace {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// merged[b, o] = sum_k w[t_k] x[b, t_k] / sum_k w[t_k] over the segment t_k of row o.
template <typename T, int V>
__global__ void merge_groups_kernel(const T* __restrict__ x,          // [B, N, C]
                                    const float* __restrict__ w,      // [B, N] or null (ones)
                                    const int64_t* __restrict__ perm,    // [B, N]
                                    const int64_t* __restrict__ starts,  // [B, M + 1]
                                    T* __restrict__ out,              // [B, M, C]
                                    float* __restrict__ out_size,     // [B, M]
                                    int64_t n, int64_t m, int64_t c) {
  const int64_t o = blockIdx.x, b = blockIdx.y;
  const int64_t s0 = starts[b * (m + 1) + o], s1 = starts[b * (m + 1) + o + 1];
  const int64_t* tokens = perm + b * n;
  float total = 0.0f;
  for (int64_t p = s0; p < s1; ++p) total += w ? w[b * n + tokens[p]] : 1.0f;
  if (threadIdx.x == 0) out_size[b * m + o] = total;
  const float inv = 1.0f / total;
  T* out_row = out + (b * m + o) * c;
  for (int64_t vc = threadIdx.x; vc < c / V; vc += blockDim.x) {
    if (s1 - s0 == 1) {  // a token that merged with nothing is copied exactly
      *reinterpret_cast<Pack<T, V>*>(out_row + vc * V) =
          load_pack<T, V>(x + (b * n + tokens[s0]) * c + vc * V);
      continue;
    }
    float acc[V] = {};
    for (int64_t p = s0; p < s1; ++p) {
      const int64_t t = tokens[p];
      const float wt = w ? w[b * n + t] : 1.0f;
      const Pack<T, V> in = load_pack<T, V>(x + (b * n + t) * c + vc * V);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += wt * static_cast<float>(in.v[i]);
    }
    Pack<T, V> res;
#pragma unroll
    for (int i = 0; i < V; ++i) res.v[i] = static_cast<T>(acc[i] * inv);
    *reinterpret_cast<Pack<T, V>*>(out_row + vc * V) = res;
  }
}

// grad_x[b, t] = grad[b, dest[b, t]] * w[b, t] / merged_size[b, dest[b, t]]
template <typename T, int V>
__global__ void merge_backward_kernel(const T* __restrict__ grad,        // [B, M, C]
                                      const int64_t* __restrict__ dest,  // [B, N]
                                      const float* __restrict__ w,       // [B, N] or null
                                      const float* __restrict__ msize,   // [B, M]
                                      T* __restrict__ grad_x,            // [B, N, C]
                                      int64_t n, int64_t m, int64_t c) {
  const int64_t t = blockIdx.x, b = blockIdx.y;
  const int64_t o = dest[b * n + t];
  if (o < 0 || o >= m) return;  // checked on the host before launch
  const float f = (w ? w[b * n + t] : 1.0f) / msize[b * m + o];
  const T* src = grad + (b * m + o) * c;
  T* dst = grad_x + (b * n + t) * c;
  for (int64_t vc = threadIdx.x; vc < c / V; vc += blockDim.x) {
    const Pack<T, V> in = load_pack<T, V>(src + vc * V);
    Pack<T, V> res;
#pragma unroll
    for (int i = 0; i < V; ++i) res.v[i] = static_cast<T>(f * static_cast<float>(in.v[i]));
    *reinterpret_cast<Pack<T, V>*>(dst + vc * V) = res;
  }
}

// 16-byte vectors when every row starts on a 16-byte boundary, else one element at a time.
bool vectorizable(const at::Tensor& t, int64_t c) {
  const int64_t vec = 16 / t.element_size();
  return c % vec == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

int threads_for(int64_t vectors) {
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (vectors + 31) / 32 * 32)));
}

template <typename Launch>
void launch_vec_or_scalar(const at::Tensor& a, const at::Tensor& b, int64_t c, Launch&& launch) {
  dispatch_float_types(a.scalar_type(), "_bipartite_merge_cuda", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (vectorizable(a, c) && vectorizable(b, c)) {
      launch(T{}, std::integral_constant<int, V>{});
    } else {
      launch(T{}, std::integral_constant<int, 1>{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bipartite_merge_cuda(const at::Tensor& x,
                                                        const at::Tensor& perm,
                                                        const at::Tensor& starts,
                                                        const std::optional<at::Tensor>& size) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 3 && is_float_type(x.scalar_type()),
                    "_bipartite_merge_cuda: x must be a float CUDA tensor [B, N, C]");
  const int64_t bsz = x.size(0), n = x.size(1), c = x.size(2);
  TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong && perm.sizes() == at::IntArrayRef({bsz, n}),
                    "_bipartite_merge_cuda: perm must be int64 [B, N]");
  TORCH_CHECK_VALUE(starts.scalar_type() == at::kLong && starts.dim() == 2 &&
                        starts.size(0) == bsz && starts.size(1) >= 1,
                    "_bipartite_merge_cuda: starts must be int64 [B, M + 1]");
  const int64_t m = starts.size(1) - 1;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto pc = perm.contiguous();
  const auto sc = starts.contiguous();
  const auto w = size.has_value() ? size->to(at::kFloat).contiguous() : at::Tensor();
  auto merged = at::empty({bsz, m, c}, x.options());
  auto merged_size = at::empty({bsz, m}, x.options().dtype(at::kFloat));
  if (bsz == 0 || m == 0) return {merged, merged_size};
  const auto stream = at::cuda::getCurrentCUDAStream();
  launch_vec_or_scalar(xc, merged, c, [&](auto tag, auto vec) {
    using T = decltype(tag);
    constexpr int V = decltype(vec)::value;
    merge_groups_kernel<T, V><<<dim3(m, bsz), threads_for(c / V), 0, stream>>>(
        static_cast<const T*>(xc.const_data_ptr()),
        w.defined() ? w.const_data_ptr<float>() : nullptr, pc.const_data_ptr<int64_t>(),
        sc.const_data_ptr<int64_t>(), static_cast<T*>(merged.mutable_data_ptr()),
        merged_size.mutable_data_ptr<float>(), n, m, c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {merged, merged_size};
}

at::Tensor bipartite_merge_backward_cuda(const at::Tensor& grad_merged, const at::Tensor& dest,
                                         const std::optional<at::Tensor>& size,
                                         const at::Tensor& merged_size) {
  check_bipartite_merge_backward_args(grad_merged, dest, size, merged_size);
  const int64_t bsz = dest.size(0), n = dest.size(1);
  const int64_t m = grad_merged.size(1), c = grad_merged.size(2);
  const c10::cuda::CUDAGuard guard(grad_merged.device());
  const auto g = grad_merged.contiguous();
  const auto d = dest.contiguous();
  const auto ms = merged_size.contiguous();
  const auto w = size.has_value() ? size->to(at::kFloat).contiguous() : at::Tensor();
  if (n > 0) {
    TORCH_CHECK_INDEX(d.min().item<int64_t>() >= 0 && d.max().item<int64_t>() < m,
                      "bipartite_merge_backward: dest has values outside [0, ", m, ")");
  }
  auto grad_x = at::empty({bsz, n, c}, g.options());
  if (bsz == 0 || n == 0) return grad_x;
  const auto stream = at::cuda::getCurrentCUDAStream();
  launch_vec_or_scalar(g, grad_x, c, [&](auto tag, auto vec) {
    using T = decltype(tag);
    constexpr int V = decltype(vec)::value;
    merge_backward_kernel<T, V><<<dim3(n, bsz), threads_for(c / V), 0, stream>>>(
        static_cast<const T*>(g.const_data_ptr()), d.const_data_ptr<int64_t>(),
        w.defined() ? w.const_data_ptr<float>() : nullptr, ms.const_data_ptr<float>(),
        static_cast<T*>(grad_x.mutable_data_ptr()), n, m, c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("_bipartite_merge_cuda", &bipartite_merge_cuda);
  m.impl("_bipartite_merge_backward_cuda", &bipartite_merge_backward_cuda);
}

}  // namespace mmfast::cuda
