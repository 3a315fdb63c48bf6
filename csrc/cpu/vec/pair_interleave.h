// Two bfloat16 rows interleaved element by element: the VNNI layout of a GEMM's B operand
// whose K runs down the rows (pairs of K rows side by side), as the bfloat16 dot-product
// instructions (vdpbf16ps, AMX) read it. Included by the per-ISA builds of csrc/cpu/vec.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace mmfast::cpu::CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
// A mask of the first n (<= 32) 16-bit lanes.
inline __mmask32 first_lanes(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
}

// Columns [0, 32) of the two rows interleaved: lo holds the pairs of columns [0, 16), hi those of
// [16, 32) (one 64-byte line each). Columns from n (<= 32) on, and all of a null second row,
// are read as zeros.
inline void interleave_32(const c10::BFloat16* first, const c10::BFloat16* second, int64_t n,
                          __m512i& lo, __m512i& hi) {
  // Word 2j of the interleave takes element j of the first row, word 2j + 1 element j of the
  // second (vpermt2w: indices >= 32 pick from the second operand).
  alignas(64) static const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                               37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                               11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                               53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                               27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __mmask32 mask = first_lanes(n);
  const __m512i a = _mm512_maskz_loadu_epi16(mask, first);
  const __m512i b =
      second != nullptr ? _mm512_maskz_loadu_epi16(mask, second) : _mm512_setzero_si512();
  lo = _mm512_permutex2var_epi16(a, _mm512_load_si512(kLo), b);
  hi = _mm512_permutex2var_epi16(a, _mm512_load_si512(kHi), b);
}
#endif

// d[2 j + e] = (e ? second : first)[j] for j < cols, zeros for cols <= j < width and for a null
// second row (cols <= width; d holds 2 width values).
inline void interleave_pair(const c10::BFloat16* first, const c10::BFloat16* second,
                            int64_t cols, int64_t width, c10::BFloat16* d) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t j0 = 0; j0 < width; j0 += 32) {
    __m512i lo, hi;
    interleave_32(first + j0, second != nullptr ? second + j0 : nullptr,
                  std::clamp<int64_t>(cols - j0, 0, 32), lo, hi);
    const int64_t out = std::min<int64_t>(32, width - j0);  // pairs written from this step
    _mm512_mask_storeu_epi16(d + 2 * j0, first_lanes(2 * std::min<int64_t>(out, 16)), lo);
    if (out > 16) _mm512_mask_storeu_epi16(d + 2 * j0 + 32, first_lanes(2 * (out - 16)), hi);
  }
#else
  for (int64_t j = 0; j < width; ++j) {
    d[2 * j] = j < cols ? first[j] : c10::BFloat16(0.f);
    d[2 * j + 1] = j < cols && second != nullptr ? second[j] : c10::BFloat16(0.f);
  }
#endif
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
