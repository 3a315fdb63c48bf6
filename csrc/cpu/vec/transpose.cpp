// 32-bit word transposes, compiled once per ISA (declarations in transpose.h).
#include "cpu/vec/transpose.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace mmfast::cpu::CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

// One block of up to 16 x 16 words: rows of src (cols words each) become rows of dst. Four
// shuffle stages in registers, one load per source row and one store per destination row.
// (ATen's transpose_mxn spills its registers to the stack in this build.)
inline void transpose_words_16x16(const float* s, int64_t ld_s, float* d, int64_t ld_d, int rows,
                                  int cols) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, s + i * ld_s) : _mm512_setzero_ps();
  }
  // Per 128-bit lane k (words 4k..4k+3 of each row): pairs of rows interleaved ...
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // ... then quads: u[4g + w] holds word 4k + w of rows 4g..4g+3 in lane k.
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * g]), pd(t[4 * g + 2])));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * g]), pd(t[4 * g + 2])));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * g + 1]), pd(t[4 * g + 3])));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * g + 1]), pd(t[4 * g + 3])));
  }
  // Lanes regrouped: for word w, 0x88 keeps lanes (0, 2) of each source, 0xdd lanes (1, 3).
  for (int w = 0; w < 4; ++w) {
    const __m512 even01 = _mm512_shuffle_f32x4(u[w], u[4 + w], 0x88);   // words w, 8+w
    const __m512 odd01 = _mm512_shuffle_f32x4(u[w], u[4 + w], 0xdd);    // words 4+w, 12+w
    const __m512 even23 = _mm512_shuffle_f32x4(u[8 + w], u[12 + w], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + w], u[12 + w], 0xdd);
    const __m512 out[4] = {_mm512_shuffle_f32x4(even01, even23, 0x88),   // word w
                           _mm512_shuffle_f32x4(odd01, odd23, 0x88),     // word 4 + w
                           _mm512_shuffle_f32x4(even01, even23, 0xdd),   // word 8 + w
                           _mm512_shuffle_f32x4(odd01, odd23, 0xdd)};    // word 12 + w
    for (int k = 0; k < 4; ++k) {
      const int word = 4 * k + w;
      if (word < cols) _mm512_mask_storeu_ps(d + word * ld_d, row_mask, out[k]);
    }
  }
}

}  // namespace
#endif

void transpose32(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows,
                 int64_t cols) {
  // Words are moved as float bit patterns: the vector shuffles never change a bit.
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t r = 0; r < rows; r += 16) {
    for (int64_t c = 0; c < cols; c += 16) {
      transpose_words_16x16(s + r * ld_src + c, ld_src, d + c * ld_dst + r, ld_dst,
                            static_cast<int>(std::min<int64_t>(16, rows - r)),
                            static_cast<int>(std::min<int64_t>(16, cols - c)));
    }
  }
#else
  constexpr int64_t kBlock = 64;  // a 64 x 64 block of words (16 KiB) stays in L1
  for (int64_t r = 0; r < rows; r += kBlock) {
    for (int64_t c = 0; c < cols; c += kBlock) {
      at::vec::transpose_mxn<float>(s + r * ld_src + c, ld_src, d + c * ld_dst + r, ld_dst,
                                    static_cast<int>(std::min(kBlock, rows - r)),
                                    static_cast<int>(std::min(kBlock, cols - c)));
    }
  }
#endif
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
