// Runs fn with a value of the C++ type of a float32/float16/bfloat16 dtype (and returns its
// result), so that one templated loop serves all three. The callers' argument checks reject
// other dtypes first; reaching here with one is a bug, reported rather than misread memory.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace mmfast::cpu::CPU_CAPABILITY {

template <typename Fn>
inline auto dispatch_float_types(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    default: break;
  }
  C10_THROW_ERROR(ValueError, "mmfast CPU kernel: unsupported dtype");
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
