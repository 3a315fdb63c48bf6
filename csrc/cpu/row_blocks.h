// How the row-wise CPU passes split their rows: tasks for parallel_for, and the fixed blocks
// of a deterministic bias-gradient reduction.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/ceil_div.h"

namespace mmfast::cpu {

// Rows per task, so that one task touches ~64 KiB of one operand: small enough to spread over
// threads, large enough that scheduling costs nothing.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1));
}

// Rows per block of a bias-gradient reduction, a multiple of `multiple`: the bias gradient is
// summed per fixed block of rows, then the blocks' partials are summed in order, so the
// result is the same whatever the thread count, with no atomics. At most ~max_blocks blocks.
inline int64_t bias_block_rows(int64_t rows, int64_t cols, int64_t max_blocks,
                               int64_t multiple = 1) {
  const int64_t block = std::max<int64_t>(row_grain(cols), ceil_div(rows, max_blocks));
  return ceil_div(block, multiple) * multiple;
}

}  // namespace mmfast::cpu
