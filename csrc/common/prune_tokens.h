// Argument checks of prune_tokens shared by its CPU and CUDA C++ kernels (the fake kernel
// checks the same in mmfast/ops/prune_tokens.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/bipartite_merge.h"

namespace mmfast {

inline void check_prune_tokens_args(const at::Tensor& x, const at::Tensor& scores, int64_t keep) {
  TORCH_CHECK_VALUE(x.dim() == 3, "prune_tokens: x must have shape [B, N, C], got ", x.sizes());
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == x.size(0) &&
                        scores.size(1) == x.size(1),
                    "prune_tokens: scores must have shape [B, N] = [", x.size(0), ", ",
                    x.size(1), "], got ", scores.sizes());
  TORCH_CHECK_VALUE(is_float_type(scores.scalar_type()),
                    "prune_tokens: scores must be float32, float16 or bfloat16, got ",
                    scores.scalar_type());
  TORCH_CHECK_VALUE(scores.device() == x.device(), "prune_tokens: scores is on ",
                    scores.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(keep >= 0 && keep <= x.size(1), "prune_tokens: keep must be in [0, N = ",
                    x.size(1), "], got ", keep);
}

inline void check_prune_tokens_backward_args(const at::Tensor& grad_kept,
                                             const at::Tensor& index, int64_t n) {
  TORCH_CHECK_VALUE(grad_kept.dim() == 3, "prune_tokens_backward: grad_kept must be [B, keep, C]");
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == grad_kept.size(0) &&
                        index.size(1) == grad_kept.size(1) && index.scalar_type() == at::kLong,
                    "prune_tokens_backward: index must be int64 [B, keep] = [",
                    grad_kept.size(0), ", ", grad_kept.size(1), "], got ", index.scalar_type(),
                    " ", index.sizes());
  TORCH_CHECK_VALUE(n >= grad_kept.size(1), "prune_tokens_backward: n must be >= keep = ",
                    grad_kept.size(1), ", got ", n);
  TORCH_CHECK_VALUE(index.device() == grad_kept.device(),
                    "prune_tokens_backward: index must be on ", grad_kept.device());
}

}  // namespace mmfast
