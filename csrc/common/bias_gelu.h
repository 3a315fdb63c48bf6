// Argument checks of bias_gelu shared by its CPU and CUDA C++ kernels (the Triton path and
// the fake kernel check the same in mmfast/ops/bias_gelu.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

namespace mmfast {

// Returns true for the tanh form.
inline bool check_bias_gelu_args(const at::Tensor& x, const at::Tensor& bias,
                                 std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh",
                    "bias_gelu: approximate must be 'none' or 'tanh', got '", approximate, "'");
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_gelu: x must have at least one dimension");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1),
                    "bias_gelu: bias must have shape [", x.size(-1),
                    "] (the last dim of x), got ", bias.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                        x.scalar_type() == at::kBFloat16,
                    "bias_gelu: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(bias.scalar_type() == x.scalar_type(), "bias_gelu: bias dtype ",
                    bias.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(bias.device() == x.device(), "bias_gelu: bias is on ", bias.device(),
                    " but x is on ", x.device());
  return approximate == "tanh";
}

inline bool check_bias_gelu_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& bias, std::string_view approximate) {
  const bool tanh_form = check_bias_gelu_args(x, bias, approximate);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
                    "bias_gelu_backward: grad_out must match x in shape and dtype, got ",
                    grad_out.sizes(), " ", grad_out.scalar_type(), " vs ", x.sizes(), " ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "bias_gelu_backward: grad_out is on ",
                    grad_out.device(), " but x is on ", x.device());
  return tanh_form;
}

}  // namespace mmfast
