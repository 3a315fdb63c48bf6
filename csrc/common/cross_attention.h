// Argument checks of cross_attention, cross_attention_backward and key_attention_mass (the
// Python fake kernels and the Triton launcher check the same in mmfast/ops/cross_attention.py).
// Every message names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace mmfast {

inline bool is_attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& q, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                    " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(),
                    " but q is on ", q.device());
}

// Returns true for media_mode "immediate".
inline bool check_cross_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                       const std::optional<at::Tensor>& v,
                                       const std::optional<at::Tensor>& kv_lens,
                                       const std::optional<at::Tensor>& q_media,
                                       const std::optional<at::Tensor>& kv_media,
                                       std::string_view media_mode) {
  TORCH_CHECK_VALUE(media_mode == "immediate" || media_mode == "previous", op,
                    ": media_mode must be 'immediate' or 'previous', got '", media_mode, "'");
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Lq, Hq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be [B, Lk, Hk, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(is_attention_dtype(q.scalar_type()), op,
                    ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), op, ": k dtype ", k.scalar_type(),
                    " differs from q dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": k batch size ", k.size(0),
                    " differs from q batch size ", q.size(0));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": k head dim ", k.size(3),
                    " differs from q head dim ", q.size(3));
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op,
                    ": the number of q heads (", q.size(2),
                    ") must be a multiple of the number of k heads (", k.size(2), ")");
  if (v.has_value()) {
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(),
                      ", got ", v->sizes());
    TORCH_CHECK_VALUE(v->scalar_type() == q.scalar_type(), op, ": v dtype ", v->scalar_type(),
                      " differs from q dtype ", q.scalar_type());
    TORCH_CHECK_VALUE(v->device() == q.device(), op, ": v is on ", v->device(),
                      " but q is on ", q.device());
  }
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  if (kv_lens.has_value()) check_index_tensor(op, "kv_lens", *kv_lens, q, {B});
  TORCH_CHECK_VALUE(q_media.has_value() == kv_media.has_value(), op,
                    ": q_media and kv_media must be given together (got only ",
                    q_media.has_value() ? "q_media" : "kv_media", ")");
  if (q_media.has_value()) {
    check_index_tensor(op, "q_media", *q_media, q, {B, Lq});
    check_index_tensor(op, "kv_media", *kv_media, q, {B, Lk});
  }
  return media_mode == "immediate";
}

}  // namespace mmfast
