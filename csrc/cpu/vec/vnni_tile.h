// A bfloat16 tile product on AVX512_BF16 dot products (vdpbf16ps), B in the VNNI layout:
//
//   acc[i][j] (+)= sum_{p < k2} A[i][2p] B[2p][j] + A[i][2p+1] B[2p+1][j],   j < 64,
//   packed[p][j][e] = B[2p + e][j],
//
// in float32. Included by the AVX512 build of packed_gemm only.
//
// Why our own and not ATen's cpublas::brgemm (oneDNN's ukernel): on Zen 4 one vdpbf16ps zmm
// issues per cycle (64 flops: 234 GFLOP/s per core at 3.66 GHz, measured with a register-only
// loop). This loop, 6 rows x 64 columns in 24 accumulators, ran a [252 x 64] x 2048 tile at
// 224-232 GFLOP/s per core with A (up to 16 MiB) streamed from L3 and both cores busy, brgemm
// at ~215 (micro-benchmarks, not suite figures).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace mmfast::cpu::CPU_CAPABILITY {

constexpr int64_t kVnniCols = 64;  // four zmm of float32 accumulators per row
constexpr int kVnniRows = 6;       // 24 accumulators; a broadcast and four B rows in registers

// Rows [0, R) of the tile. a: row stride lda (elements); acc: row stride kVnniCols.
template <int R>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void vnni_rows(
    const c10::BFloat16* a, int64_t lda, const c10::BFloat16* packed, int64_t k2, float* acc,
    bool accumulate) {
  __m512 c[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) {
      c[r][j] = accumulate ? _mm512_loadu_ps(acc + r * kVnniCols + 16 * j) : _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 2
  for (int64_t p = 0; p < k2; ++p) {
    const c10::BFloat16* b = packed + p * 2 * kVnniCols;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(b + 96);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      int32_t pair;  // A[r][2p], A[r][2p + 1]: memcpy, as a row need not be 4-byte aligned
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
      c[r][2] = _mm512_dpbf16_ps(c[r][2], av, b2);
      c[r][3] = _mm512_dpbf16_ps(c[r][3], av, b3);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + r * kVnniCols + 16 * j, c[r][j]);
  }
}

// acc [rows, 64] (+)= A [rows, 2 k2] (row stride lda) x packed [k2][64][2].
__attribute__((target("avx512f,avx512bf16"))) inline void vnni_tile(
    int64_t rows, int64_t k2, const c10::BFloat16* a, int64_t lda,  // a: [rows, 2 k2]
    const c10::BFloat16* packed,                                    // [k2, 64, 2]
    float* acc, bool accumulate) {                                  // [rows, 64]
  int64_t i = 0;
  for (; i + kVnniRows <= rows; i += kVnniRows) {
    vnni_rows<kVnniRows>(a + i * lda, lda, packed, k2, acc + i * kVnniCols, accumulate);
  }
  const c10::BFloat16* at = a + i * lda;
  float* ct = acc + i * kVnniCols;
  switch (rows - i) {
    case 1: vnni_rows<1>(at, lda, packed, k2, ct, accumulate); break;
    case 2: vnni_rows<2>(at, lda, packed, k2, ct, accumulate); break;
    case 3: vnni_rows<3>(at, lda, packed, k2, ct, accumulate); break;
    case 4: vnni_rows<4>(at, lda, packed, k2, ct, accumulate); break;
    case 5: vnni_rows<5>(at, lda, packed, k2, ct, accumulate); break;
    default: break;
  }
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
