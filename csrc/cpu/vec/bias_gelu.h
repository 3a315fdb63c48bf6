// Row loops of bias_gelu, one build per ISA. Rows are contiguous, `cols` long, with a row
// stride; the caller splits rows across threads.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

MMFAST_DECLARE_ISA_KERNEL(
    void bias_gelu_rows(c10::ScalarType dtype, const void* x, const void* bias, void* out,
                        int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form))

// grad_x[r] = grad[r] * gelu'(x[r] + bias); bias_partial[c] += sum over rows of grad_x[r, c]
// (float32, the bias gradient of this block of rows).
MMFAST_DECLARE_ISA_KERNEL(
    void bias_gelu_backward_rows(c10::ScalarType dtype, const void* grad, const void* x,
                                 const void* bias, void* grad_x, float* bias_partial,
                                 int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form))

// Projector forward epilogue: h[r] += bias (bias may be null: h already holds the
// pre-activation), act[r] = gelu(h[r]). One pass; h is kept for the backward, unless act == h
// (in place: inference).
MMFAST_DECLARE_ISA_KERNEL(
    void bias_gelu_keep_rows(c10::ScalarType dtype, void* h, const void* bias, void* act,
                             int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form))

// Projector backward epilogue, one pass over the saved pre-activation h that recomputes the
// activation and the GELU derivative together (they share erf/exp, or tanh):
//   act[r]  = gelu(h[r])                         (when act is not null)
//   grad[r] = grad[r] * gelu'(h[r])               (in place, when grad is not null)
//   bias_partial[c] += sum over rows of grad[r, c] (float32, when not null; needs grad)
MMFAST_DECLARE_ISA_KERNEL(
    void gelu_recompute_backward_rows(c10::ScalarType dtype, const void* h, void* grad, void* act,
                                      float* bias_partial, int64_t row_begin, int64_t row_end,
                                      int64_t cols, bool tanh_form))
