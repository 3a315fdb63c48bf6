// bias_gelu inner loops: y = gelu(x + b) over rows, in one pass, math in float32.
// Compiled once per ISA (setup.py); declarations in bias_gelu.h.
#include "cpu/vec/bias_gelu.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/vec/chunk.h"
#include "cpu/vec/dispatch.h"
#include "cpu/vec/gelu.h"

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace mmfast::cpu::CPU_CAPABILITY {

namespace {

template <typename T>
void forward_rows(const T* x, const T* bias, T* out, int64_t r0, int64_t r1, int64_t cols,
                  bool tanh_form) {
  const GeluForm gelu(tanh_form);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * cols;
    T* yr = out + r * cols;
    for_each_chunk(cols, [&](int64_t c, int64_t n) {
      fVec x0, x1, b0, b1;
      load2(xr + c, n, x0, x1);
      load2(bias + c, n, b0, b1);
      store2(yr + c, n, gelu(x0 + b0), gelu(x1 + b1));
    });
  }
}

template <typename T>
void backward_rows(const T* grad, const T* x, const T* bias, T* grad_x, float* bias_partial,
                   int64_t r0, int64_t r1, int64_t cols, bool tanh_form) {
  const GeluForm gelu(tanh_form);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * cols;
    const T* gr = grad + r * cols;
    T* dxr = grad_x + r * cols;
    for_each_chunk(cols, [&](int64_t c, int64_t n) {
      fVec x0, x1, b0, b1, g0, g1;
      load2(xr + c, n, x0, x1);
      load2(bias + c, n, b0, b1);
      load2(gr + c, n, g0, g1);
      const fVec d0 = g0 * gelu.grad(x0 + b0);
      const fVec d1 = g1 * gelu.grad(x1 + b1);
      store2(dxr + c, n, d0, d1);
      if (bias_partial != nullptr) accumulate2(bias_partial + c, n, d0, d1);
    });
  }
}

template <typename T>
void keep_rows(T* h, const T* bias, T* act, int64_t r0, int64_t r1, int64_t cols, bool tanh_form) {
  const GeluForm gelu(tanh_form);
  for (int64_t r = r0; r < r1; ++r) {
    T* hr = h + r * cols;
    T* ar = act + r * cols;
    for_each_chunk(cols, [&](int64_t c, int64_t n) {
      fVec v0, v1;
      load2(hr + c, n, v0, v1);
      if (bias != nullptr) {
        fVec b0, b1;
        load2(bias + c, n, b0, b1);
        v0 = v0 + b0;
        v1 = v1 + b1;
        // h is stored rounded to T; gelu is taken of that stored value, so the backward,
        // which only sees the stored h, recomputes exactly this activation.
        store2(hr + c, n, v0, v1);
        if constexpr (!std::is_same_v<T, float>) load2(hr + c, n, v0, v1);
      }
      store2(ar + c, n, gelu(v0), gelu(v1));
    });
  }
}

template <typename T>
void recompute_backward_rows(const T* h, T* grad, T* act, float* bias_partial, int64_t r0,
                             int64_t r1, int64_t cols, bool tanh_form) {
  const GeluForm gelu(tanh_form);
  for (int64_t r = r0; r < r1; ++r) {
    const T* hr = h + r * cols;
    T* gr = grad == nullptr ? nullptr : grad + r * cols;
    T* ar = act == nullptr ? nullptr : act + r * cols;
    for_each_chunk(cols, [&](int64_t c, int64_t n) {
      fVec v0, v1, a0, a1, d0, d1;
      load2(hr + c, n, v0, v1);
      gelu.both(v0, a0, d0);
      gelu.both(v1, a1, d1);
      if (ar != nullptr) store2(ar + c, n, a0, a1);
      if (gr != nullptr) {
        fVec g0, g1;
        load2(gr + c, n, g0, g1);
        g0 = g0 * d0;
        g1 = g1 * d1;
        store2(gr + c, n, g0, g1);
        if (bias_partial != nullptr) accumulate2(bias_partial + c, n, g0, g1);
      }
    });
  }
}

}  // namespace

void bias_gelu_rows(c10::ScalarType dtype, const void* x, const void* bias, void* out,
                    int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_rows(static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(out),
                 row_begin, row_end, cols, tanh_form);
  });
}

void bias_gelu_backward_rows(c10::ScalarType dtype, const void* grad, const void* x,
                             const void* bias, void* grad_x, float* bias_partial,
                             int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_rows(static_cast<const T*>(grad), static_cast<const T*>(x),
                  static_cast<const T*>(bias), static_cast<T*>(grad_x), bias_partial, row_begin,
                  row_end, cols, tanh_form);
  });
}

void bias_gelu_keep_rows(c10::ScalarType dtype, void* h, const void* bias, void* act,
                         int64_t row_begin, int64_t row_end, int64_t cols, bool tanh_form) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    keep_rows(static_cast<T*>(h), static_cast<const T*>(bias), static_cast<T*>(act), row_begin,
              row_end, cols, tanh_form);
  });
}

void gelu_recompute_backward_rows(c10::ScalarType dtype, const void* h, void* grad, void* act,
                                  float* bias_partial, int64_t row_begin, int64_t row_end,
                                  int64_t cols, bool tanh_form) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    recompute_backward_rows(static_cast<const T*>(h), static_cast<T*>(grad), static_cast<T*>(act),
                            bias_partial, row_begin, row_end, cols, tanh_form);
  });
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
