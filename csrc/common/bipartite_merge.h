// Argument checks of bipartite_merge shared by its CPU and CUDA C++ kernels (the fake kernel
// and the Triton path check the same in mmfast/ops/bipartite_merge.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace mmfast {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The largest r allowed: every merged token needs a B partner, and a protected first token
// never merges.
inline int64_t bipartite_merge_max_r(int64_t n, bool protect_first) {
  return std::max<int64_t>(n - (protect_first ? 1 : 0), 0) / 2;
}

inline void check_bipartite_merge_args(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                       const std::optional<at::Tensor>& size,
                                       bool protect_first) {
  TORCH_CHECK_VALUE(x.dim() == 3, "bipartite_merge: x must have shape [B, N, C], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(metric.dim() == 3 && metric.size(0) == x.size(0) &&
                        metric.size(1) == x.size(1),
                    "bipartite_merge: metric must have shape [B, N, Cm] with x's B and N = [",
                    x.size(0), ", ", x.size(1), "], got ", metric.sizes());
  TORCH_CHECK_VALUE(is_float_type(x.scalar_type()),
                    "bipartite_merge: x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(metric.scalar_type() == x.scalar_type(), "bipartite_merge: metric dtype ",
                    metric.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(metric.device() == x.device(), "bipartite_merge: metric is on ",
                    metric.device(), " but x is on ", x.device());
  const int64_t max_r = bipartite_merge_max_r(x.size(1), protect_first);
  TORCH_CHECK_VALUE(r >= 0 && r <= max_r, "bipartite_merge: r must be in [0, ", max_r,
                    "] for N = ", x.size(1), protect_first ? " with protect_first" : "",
                    ", got r = ", r);
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->dim() == 2 && size->size(0) == x.size(0) &&
                          size->size(1) == x.size(1),
                      "bipartite_merge: size must have shape [B, N] = [", x.size(0), ", ",
                      x.size(1), "], got ", size->sizes());
    TORCH_CHECK_VALUE(is_float_type(size->scalar_type()),
                      "bipartite_merge: size must be float32, float16 or bfloat16, got ",
                      size->scalar_type());
    TORCH_CHECK_VALUE(size->device() == x.device(), "bipartite_merge: size is on ",
                      size->device(), " but x is on ", x.device());
  }
}

inline void check_bipartite_merge_backward_args(const at::Tensor& grad_merged,
                                                const at::Tensor& dest,
                                                const std::optional<at::Tensor>& size,
                                                const at::Tensor& merged_size) {
  TORCH_CHECK_VALUE(grad_merged.dim() == 3 && is_float_type(grad_merged.scalar_type()),
                    "bipartite_merge_backward: grad_merged must be a float [B, M, C] tensor, got ",
                    grad_merged.scalar_type(), " ", grad_merged.sizes());
  TORCH_CHECK_VALUE(dest.dim() == 2 && dest.size(0) == grad_merged.size(0) &&
                        dest.scalar_type() == at::kLong,
                    "bipartite_merge_backward: dest must be int64 [B, N] with B = ",
                    grad_merged.size(0), ", got ", dest.scalar_type(), " ", dest.sizes());
  TORCH_CHECK_VALUE(merged_size.dim() == 2 && merged_size.size(0) == grad_merged.size(0) &&
                        merged_size.size(1) == grad_merged.size(1) &&
                        merged_size.scalar_type() == at::kFloat,
                    "bipartite_merge_backward: merged_size must be float32 [B, M] = [",
                    grad_merged.size(0), ", ", grad_merged.size(1), "], got ",
                    merged_size.scalar_type(), " ", merged_size.sizes());
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->sizes() == dest.sizes() && is_float_type(size->scalar_type()),
                      "bipartite_merge_backward: size must be a float tensor shaped like dest ",
                      dest.sizes(), ", got ", size->sizes());
  }
  for (const at::Tensor* t : {&dest, &merged_size}) {
    TORCH_CHECK_VALUE(t->device() == grad_merged.device(),
                      "bipartite_merge_backward: all tensors must be on ", grad_merged.device());
  }
}

}  // namespace mmfast
