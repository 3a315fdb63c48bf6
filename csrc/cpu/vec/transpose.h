// 32-bit word transposes, one build per ISA.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

// dst[c * ld_dst + r] = src[r * ld_src + c] for 32-bit words, r < rows, c < cols: float32
// transposes, and bfloat16 rows viewed as pairs become the VNNI layout (pairs of K rows
// interleaved) of bfloat16 dot products.
MMFAST_DECLARE_ISA_KERNEL(
    void transpose32(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows,
                     int64_t cols))
