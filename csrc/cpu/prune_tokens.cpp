// CPU kernels of mmfast::prune_tokens and mmfast::prune_tokens_backward: a per-sample top-k
// by (score desc, index asc), the kept indices sorted back into token order, and row copies.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/prune_tokens.h"

namespace mmfast::cpu {

namespace {

std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& x, const at::Tensor& scores,
                                                    int64_t keep) {
  check_prune_tokens_args(x, scores, keep);
  const int64_t bsz = x.size(0), n = x.size(1), c = x.size(2);
  const auto s = scores.to(at::kFloat).contiguous();  // exact for every float dtype
  const auto xc = x.stride(2) == 1 ? x : x.contiguous();
  auto index = at::empty({bsz, keep}, x.options().dtype(at::kLong));
  auto kept = at::empty({bsz, keep, c}, x.options());
  const float* sp = s.const_data_ptr<float>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  const int64_t esize = x.element_size();
  const char* xbase = static_cast<const char*>(xc.const_data_ptr());
  char* kbase = static_cast<char*>(kept.mutable_data_ptr());
  at::parallel_for(0, bsz, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(n);
    for (int64_t b = b0; b < b1; ++b) {
      const float* score = sp + b * n;
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK_VALUE(!std::isnan(score[i]), "prune_tokens: scores[", b, ", ", i,
                          "] is NaN; the ranking would be undefined");
      }
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + keep, order.end(),
                       [&](int64_t p, int64_t q) {
                         return score[p] > score[q] || (score[p] == score[q] && p < q);
                       });
      std::sort(order.begin(), order.begin() + keep);
      for (int64_t k = 0; k < keep; ++k) {
        ip[b * keep + k] = order[k];
        std::memcpy(kbase + (b * keep + k) * c * esize,
                    xbase + (b * xc.stride(0) + order[k] * xc.stride(1)) * esize, c * esize);
      }
    }
  });
  return {kept, index};
}

// grad_x = zeros [B, n, C] with grad_x[b, index[b, k]] = grad_kept[b, k]
at::Tensor prune_tokens_backward_cpu(const at::Tensor& grad_kept, const at::Tensor& index,
                                     int64_t n) {
  check_prune_tokens_backward_args(grad_kept, index, n);
  const int64_t bsz = grad_kept.size(0), keep = grad_kept.size(1), c = grad_kept.size(2);
  const auto g = grad_kept.contiguous();
  const auto idx = index.contiguous();
  auto grad_x = at::zeros({bsz, n, c}, grad_kept.options());
  const int64_t esize = g.element_size();
  const char* gbase = static_cast<const char*>(g.const_data_ptr());
  char* obase = static_cast<char*>(grad_x.mutable_data_ptr());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, bsz, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t k = 0; k < keep; ++k) {
        const int64_t t = ip[b * keep + k];
        TORCH_CHECK_INDEX(t >= 0 && t < n, "prune_tokens_backward: index[", b, ", ", k, "] = ",
                          t, " is outside [0, ", n, ")");
        std::memcpy(obase + (b * n + t) * c * esize, gbase + (b * keep + k) * c * esize,
                    c * esize);
      }
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("prune_tokens", &prune_tokens_cpu);
  m.impl("prune_tokens_backward", &prune_tokens_backward_cpu);
}

}  // namespace mmfast::cpu
