// CPU kernels of mmfast::bias_gelu and mmfast::bias_gelu_backward: one pass over memory,
// rows split across threads, the per-ISA row loops of csrc/cpu/vec/bias_gelu.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/bias_gelu.h"
#include "common/ceil_div.h"
#include "cpu/row_blocks.h"
#include "cpu/vec/bias_gelu.h"

namespace mmfast::cpu {

namespace {

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  const bool tanh_form = check_bias_gelu_args(x, bias, approximate);
  const auto xc = x.contiguous();
  const auto bc = bias.contiguous();
  auto out = at::empty_like(xc);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  const auto kernel = MMFAST_PICK_ISA(bias_gelu_rows);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    kernel(x.scalar_type(), xc.const_data_ptr(), bc.const_data_ptr(), out.mutable_data_ptr(), r0,
           r1, cols, tanh_form);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& x,
                                                          const at::Tensor& bias,
                                                          c10::string_view approximate) {
  const bool tanh_form = check_bias_gelu_backward_args(grad_out, x, bias, approximate);
  const auto xc = x.contiguous();
  const auto gc = grad_out.contiguous();
  const auto bc = bias.contiguous();
  auto grad_x = at::empty_like(xc);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  const int64_t block = bias_block_rows(rows, cols, 256);
  const int64_t nblocks = ceil_div(rows, block);
  auto partial = at::zeros({std::max<int64_t>(nblocks, 1), cols}, x.options().dtype(at::kFloat));
  const auto kernel = MMFAST_PICK_ISA(bias_gelu_backward_rows);
  float* partial_ptr = partial.mutable_data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      kernel(x.scalar_type(), gc.const_data_ptr(), xc.const_data_ptr(), bc.const_data_ptr(),
             grad_x.mutable_data_ptr(), partial_ptr + b * cols, b * block,
             std::min(rows, (b + 1) * block), cols, tanh_form);
    }
  });
  return {grad_x, partial.sum(0).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace mmfast::cpu
