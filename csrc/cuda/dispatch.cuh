// Runs fn with a value of the C++ type of a float32/float16/bfloat16 tensor dtype, so that one
// templated launch serves all three.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace mmfast::cuda {

template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", dtype);
  }
}

}  // namespace mmfast::cuda
