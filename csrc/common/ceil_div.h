// ceil(a / b) for non-negative a and positive b: tile and block counts.
#pragma once

#include <cstdint>

namespace mmfast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mmfast
