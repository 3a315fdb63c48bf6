// Argument checks of projector and projector_splice shared by their CPU and CUDA C++ kernels
// (the fake kernels and the Triton path check the same in mmfast/ops/projector.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string_view>

namespace mmfast {

inline void check_projector_operand(const char* op, const char* name, const at::Tensor& t,
                                    const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ",
                    t.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

// x [..., Cin] of a float dtype, w1 [H, Cin] (shape only: the caller checks w1 as an operand).
inline void check_projector_input(const char* op, const at::Tensor& x, const at::Tensor& w1) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                        x.scalar_type() == at::kBFloat16,
                    op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == x.size(-1), op,
                    ": w1 must have shape [hidden, ", x.size(-1), "] (in_features = the last dim of x), got ",
                    w1.sizes());
}

// x [..., Cin], w1 [H, Cin], b1 [H]?, w2 [Hout, H], b2 [Hout]?. Returns true for the tanh form.
inline bool check_projector_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                 const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                 const std::optional<at::Tensor>& b2,
                                 std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  check_projector_input(op, x, w1);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(1) == w1.size(0), op,
                    ": w2 must have shape [out_features, ", w1.size(0), "] (hidden = w1.shape[0]), got ",
                    w2.sizes());
  check_projector_operand(op, "w1", w1, x);
  check_projector_operand(op, "w2", w2, x);
  if (b1.has_value() && b1->defined()) {
    TORCH_CHECK_VALUE(b1->dim() == 1 && b1->size(0) == w1.size(0), op, ": b1 must have shape [",
                      w1.size(0), "] (hidden = w1.shape[0]), got ", b1->sizes());
    check_projector_operand(op, "b1", *b1, x);
  }
  if (b2.has_value() && b2->defined()) {
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == w2.size(0), op, ": b2 must have shape [",
                      w2.size(0), "] (out_features = w2.shape[0]), got ", b2->sizes());
    check_projector_operand(op, "b2", *b2, x);
  }
  return approximate == "tanh";
}

// The splice's extra operands: x [N, Cin] (one row per image token), embeds [..., Hout],
// image_mask bool of embeds' shape without the last dim. The count of True positions against
// N is checked where it can be without a host synchronisation (the CPU kernel).
// `embeds_name` is "embeds" in the forward and "grad_out" in the backward.
inline void check_splice_args(const char* op, const at::Tensor& x, const at::Tensor& w2,
                              const at::Tensor& embeds, const at::Tensor& image_mask,
                              const char* embeds_name = "embeds") {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [N, in_features] (N = number of True "
                    "positions in image_mask), got ", x.sizes());
  TORCH_CHECK_VALUE(embeds.dim() >= 2 && embeds.size(-1) == w2.size(0), op, ": ", embeds_name,
                    " must have shape [..., ", w2.size(0), "] (out_features = w2.shape[0]), got ",
                    embeds.sizes());
  check_projector_operand(op, embeds_name, embeds, x);
  TORCH_CHECK_VALUE(image_mask.scalar_type() == at::kBool, op, ": image_mask must be bool, got ",
                    image_mask.scalar_type());
  TORCH_CHECK_VALUE(image_mask.sizes() == embeds.sizes().slice(0, embeds.dim() - 1), op,
                    ": image_mask must have shape ", embeds.sizes().slice(0, embeds.dim() - 1),
                    " (", embeds_name, " without its last dim), got ", image_mask.sizes());
  TORCH_CHECK_VALUE(image_mask.device() == x.device(), op, ": image_mask is on ",
                    image_mask.device(), " but x is on ", x.device());
}

// Backward operands: grad_out [..., Hout] (rows: x's leading dims, or embeds' for the splice),
// x [..., Cin], h [..., H] with x's leading dims, w1 [H, Cin] (only needed for grad_x), w2 [Hout, H].
// Returns true for the tanh form.
inline bool check_projector_backward_args(const char* op, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& h,
                                          const std::optional<at::Tensor>& w1,
                                          const at::Tensor& w2, std::string_view approximate,
                                          bool need_grad_x) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  TORCH_CHECK_VALUE(x.dim() >= 1 && h.dim() == x.dim() &&
                        h.sizes().slice(0, h.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    op, ": h must have x's leading dims, got ", h.sizes(), " for x ", x.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(1) == h.size(-1), op, ": w2 must have shape [out_features, ",
                    h.size(-1), "] (hidden = h.shape[-1]), got ", w2.sizes());
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && grad_out.size(-1) == w2.size(0), op,
                    ": grad_out's last dim must be ", w2.size(0), " (out_features), got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(!need_grad_x || (w1.has_value() && w1->defined()), op,
                    ": w1 is needed for the gradient of x");
  if (w1.has_value() && w1->defined()) {
    TORCH_CHECK_VALUE(w1->dim() == 2 && w1->size(0) == h.size(-1) && w1->size(1) == x.size(-1),
                      op, ": w1 must have shape [", h.size(-1), ", ", x.size(-1), "], got ",
                      w1->sizes());
    check_projector_operand(op, "w1", *w1, x);
  }
  check_projector_operand(op, "grad_out", grad_out, x);
  check_projector_operand(op, "h", h, x);
  check_projector_operand(op, "w2", w2, x);
  return approximate == "tanh";
}

}  // namespace mmfast
