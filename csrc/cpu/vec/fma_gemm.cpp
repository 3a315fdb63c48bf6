// fma_gemm (fma_gemm.h): a GEMM in the loop order of Goto's, with float32 FMA tiles.
//
//   for each panel of kPanelCols columns of B:
//     pack the panel into float32 column strips [16 columns][K] (all threads, then all wait)
//     each work item (kFmaTileRows rows x kItemCols columns of C), over K by blocks of kKc:
//       widen its rows of A in the block into float32 rows (a [96 x 256] panel in L2)
//       for each 16-column strip of B (16 KiB for the block: it stays in L1),
//         for each 6 rows of A: acc[6 x 16] += A[6 x kc] B[kc x 16] in 12 registers
//     then the epilogue over the item's float32 sums, rounded once to the output dtype.
//
// A is read in place and widened per item; B is widened once per GEMM; the sums stay float32
// over the whole K, so float16 and bfloat16 operands get exact products and float32 sums, as
// from a float32 GEMM on widened copies, without the copies.
#include "cpu/vec/fma_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/aligned_array.h"
#include "cpu/vec/bias_gelu.h"
#include "cpu/vec/chunk.h"
#include "cpu/vec/dispatch.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define MMFAST_FMA_GEMM 1
#endif

namespace mmfast::cpu::CPU_CAPABILITY {

#if defined(MMFAST_FMA_GEMM)
namespace {

constexpr int64_t kTileRows = 6;   // rows of the register tile
constexpr int64_t kStripCols = 16;  // columns of the register tile: two float vectors
constexpr int64_t kKc = 256;        // K per block: a 16-column strip of B is 16 KiB of L1
constexpr int64_t kItemCols = 256;  // columns of C per work item
constexpr int64_t kPanelCols = kFmaPanelCols;
// kFmaTileRows rounded up to whole register tiles
constexpr int64_t kItemRows = (kFmaTileRows + kTileRows - 1) / kTileRows * kTileRows;

// acc[6 x 16] (+)= a[6 x kc] b[kc x 16]; a: rows lda apart; b: 16 floats per k, 32-byte aligned;
// acc: rows ldc apart. With accumulate false the sums start at zero. The twelve accumulators
// are named: kept in an array, GCC spilled them to the stack in every step (half the speed).
inline void tile_6x16(const float* a, int64_t lda, const float* b, int64_t kc, float* acc,
                      int64_t ldc, bool accumulate) {
#define MMFAST_ROW(r) __m256 c##r##0, c##r##1;
  MMFAST_ROW(0) MMFAST_ROW(1) MMFAST_ROW(2) MMFAST_ROW(3) MMFAST_ROW(4) MMFAST_ROW(5)
#undef MMFAST_ROW
#define MMFAST_ROW(r)                                                                   \
  c##r##0 = accumulate ? _mm256_loadu_ps(acc + r * ldc) : _mm256_setzero_ps();        \
  c##r##1 = accumulate ? _mm256_loadu_ps(acc + r * ldc + 8) : _mm256_setzero_ps();
  MMFAST_ROW(0) MMFAST_ROW(1) MMFAST_ROW(2) MMFAST_ROW(3) MMFAST_ROW(4) MMFAST_ROW(5)
#undef MMFAST_ROW
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(b + p * kStripCols);
    const __m256 b1 = _mm256_load_ps(b + p * kStripCols + 8);
#define MMFAST_ROW(r)                                 \
  {                                                   \
    const __m256 av = _mm256_broadcast_ss(a##r + p);  \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);       \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);       \
  }
    MMFAST_ROW(0) MMFAST_ROW(1) MMFAST_ROW(2) MMFAST_ROW(3) MMFAST_ROW(4) MMFAST_ROW(5)
#undef MMFAST_ROW
  }
#define MMFAST_ROW(r)                          \
  _mm256_storeu_ps(acc + r * ldc, c##r##0);    \
  _mm256_storeu_ps(acc + r * ldc + 8, c##r##1);
  MMFAST_ROW(0) MMFAST_ROW(1) MMFAST_ROW(2) MMFAST_ROW(3) MMFAST_ROW(4) MMFAST_ROW(5)
#undef MMFAST_ROW
}

// 8 consecutive elements of T as floats.
template <typename T>
inline __m256 widen8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// dst[c * ld_dst + r] = v[r][c] for an 8 x 8 block in registers.
inline void store_transposed_8x8(__m256 v[8], float* dst, int64_t ld_dst) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  // s[q] holds words (q, q+4) of rows 0-3 in its low lane and of rows 4-7 in its high one
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// dst[r * ld_dst + c] = float(src[r * rs + c * cs]) for r < rows, c < cols: a block of a
// strided matrix widened into float32 rows. Unit column stride: 8 values per load; unit row
// stride (a transposed view): 8 x 8 blocks transposed in registers; else one at a time.
template <typename T>
void widen_block(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst,
                 int64_t ld_dst) {
  if (cs == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = src + r * rs;
      float* d = dst + r * ld_dst;
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(d + c, widen8(s + c));
      for (; c < cols; ++c) d[c] = static_cast<float>(s[c]);
    }
    return;
  }
  int64_t r0 = 0;
  if (rs == 1) {
    // 8 rows of dst are 8 consecutive values of a column of src
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8) {
        __m256 v[8];
        for (int q = 0; q < 8; ++q) v[q] = widen8(src + r0 + (c0 + q) * cs);
        store_transposed_8x8(v, dst + r0 * ld_dst + c0, ld_dst);
      }
      for (int64_t r = r0; r < r0 + 8; ++r) {
        for (int64_t c = c0; c < cols; ++c) {
          dst[r * ld_dst + c] = static_cast<float>(src[r + c * cs]);
        }
      }
    }
  }
  for (int64_t r = r0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[r * ld_dst + c] = static_cast<float>(src[r * rs + c * cs]);
    }
  }
}

// Strip s of the panel (columns [16 s, 16 s + 16) from column j0 of B) as float32
// [K][16], zeros past N: a [K, 16] block of B widened (widen_block: two loads per k for B's
// rows as rows; 8 x 8 register transposes for B given transposed, a weight as stored).
template <typename T>
void pack_strip(const FmaGemm& g, int64_t j0, int64_t s, float* dst) {
  const int64_t n0 = j0 + s * kStripCols;
  const int64_t cols = std::min(kStripCols, g.n - n0);
  widen_block(static_cast<const T*>(g.b) + n0 * g.b_cs, g.b_rs, g.b_cs, g.k, cols, dst,
              kStripCols);
  if (cols < kStripCols) {
    for (int64_t p = 0; p < g.k; ++p) {
      std::fill(dst + p * kStripCols + cols, dst + (p + 1) * kStripCols, 0.0f);
    }
  }
}

template <typename T>
void epilogue_rows(const FmaGemm& g, const float* acc, int64_t i0, int64_t rows, int64_t j,
                   int64_t cols, int64_t tile) {
  T* out = static_cast<T*>(g.out);
  const T* bias = static_cast<const T*>(g.bias);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const float* ar = acc + r * kItemCols;
    switch (g.epilogue) {
      case FmaEpilogue::kStore:
      case FmaEpilogue::kBiasGelu: {
        const int64_t row = g.out_rows != nullptr ? g.out_rows[i] : i;
        T* o = out + row * g.ldo + j;
        // kBiasGelu: the rounded pre-activation goes to out2 (kept) or to out, then its GELU
        // to out, by the same row pass as bias_gelu's unfused path
        T* pre = g.epilogue == FmaEpilogue::kBiasGelu && g.out2 != nullptr
                     ? static_cast<T*>(g.out2) + i * g.ldo2 + j
                     : o;
        for_each_chunk(cols, [&](int64_t c, int64_t n) {
          fVec v0, v1;
          load2(ar + c, n, v0, v1);
          if (bias != nullptr) {
            fVec b0, b1;
            load2(bias + j + c, n, b0, b1);
            v0 = v0 + b0;
            v1 = v1 + b1;
          }
          store2(pre + c, n, v0, v1);
        });
        if (g.epilogue == FmaEpilogue::kBiasGelu) {
          bias_gelu_keep_rows(g.dtype, pre, nullptr, o, 0, 1, cols, g.tanh_form);
        }
        break;
      }
      case FmaEpilogue::kGeluGrad: {
        T* o = out + i * g.ldo + j;
        for_each_chunk(cols, [&](int64_t c, int64_t n) {
          fVec v0, v1;
          load2(ar + c, n, v0, v1);
          store2(o + c, n, v0, v1);
        });
        gelu_recompute_backward_rows(
            g.dtype, static_cast<const T*>(g.h) + i * g.ldh + j, o,
            g.out2 != nullptr ? static_cast<T*>(g.out2) + i * g.ldo2 + j : nullptr,
            g.bias_grad != nullptr ? g.bias_grad + tile * g.n + j : nullptr, 0, 1, cols,
            g.tanh_form);
        break;
      }
    }
  }
}

// One work item: rows [i0, i0 + rows) of C by columns [j, j + cols) of the panel at j0 (its
// strips packed at `panel`). a_buf: [kItemRows][kKc]; acc: [kItemRows][kItemCols].
template <typename T>
void run_item(const FmaGemm& g, const float* panel, int64_t j0, int64_t i0, int64_t rows,
              int64_t j, int64_t cols, float* a_buf, float* acc) {
  const T* a = static_cast<const T*>(g.a);
  const int64_t tiles = ceil_div(rows, kTileRows);
  const int64_t strips = ceil_div(cols, kStripCols);
  // rows past M read zeros (the register tile always has 6 rows)
  std::memset(a_buf + rows * kKc, 0, (tiles * kTileRows - rows) * kKc * sizeof(float));
  if (g.k == 0) std::fill(acc, acc + kItemRows * kItemCols, 0.0f);
  for (int64_t p0 = 0; p0 < g.k; p0 += kKc) {
    const int64_t kc = std::min(kKc, g.k - p0);
    widen_block(a + i0 * g.a_rs + p0 * g.a_cs, g.a_rs, g.a_cs, rows, kc, a_buf, kKc);
    for (int64_t s = 0; s < strips; ++s) {
      const float* b = panel + ((j - j0) / kStripCols + s) * g.k * kStripCols + p0 * kStripCols;
      for (int64_t t = 0; t < tiles; ++t) {
        tile_6x16(a_buf + t * kTileRows * kKc, kKc, b, kc,
                  acc + t * kTileRows * kItemCols + s * kStripCols, kItemCols, p0 > 0);
      }
    }
  }
  epilogue_rows<T>(g, acc, i0, rows, j, cols, i0 / kFmaTileRows);
}

template <typename T>
void run(const FmaGemm& g) {
  const int64_t threads = at::get_num_threads();
  TORCH_INTERNAL_ASSERT(g.panel != nullptr, "fma_gemm: no scratch for the packed panel");
  float* panel = g.panel;
  const int64_t row_items = fma_row_tiles(g.m);
  struct ThreadBuffers {
    AlignedArray<float> a, acc;  // [kItemRows][kKc], [kItemRows][kItemCols]
  };
  std::vector<ThreadBuffers> buffers(threads);  // made by their threads, kept for all panels
  for (int64_t j0 = 0; j0 < g.n; j0 += kPanelCols) {
    const int64_t ncols = std::min(kPanelCols, g.n - j0);
    const int64_t strips = ceil_div(ncols, kStripCols);
    at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) pack_strip<T>(g, j0, s, panel + s * g.k * kStripCols);
    });
    const int64_t col_items = ceil_div(ncols, kItemCols);
    const int64_t items = row_items * col_items;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
      const int tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid < threads, "fma_gemm: called inside another parallel region");
      auto& buf = buffers[tid];
      if (!buf.a) {
        buf.a = aligned_array<float>(kItemRows * kKc);
        buf.acc = aligned_array<float>(kItemRows * kItemCols);
      }
      for (int64_t it = next++; it < items; it = next++) {
        // consecutive items share their rows of A (still in L2 / L3 for the next)
        const int64_t i0 = (it / col_items) * kFmaTileRows;
        const int64_t j = j0 + (it % col_items) * kItemCols;
        run_item<T>(g, panel, j0, i0, std::min(kFmaTileRows, g.m - i0), j,
                    std::min(kItemCols, j0 + ncols - j), buf.a.get(), buf.acc.get());
      }
    });
  }
}

}  // namespace

void fma_gemm(const FmaGemm& g) {
  if (g.m == 0 || g.n == 0) return;
  dispatch_float_types(g.dtype, [&](auto tag) { run<decltype(tag)>(g); });
}

#else

void fma_gemm(const FmaGemm&) {
  TORCH_INTERNAL_ASSERT(false, "fma_gemm: not built without AVX2 (isa.h chooses it only where "
                        "the AVX2 build is active)");
}

#endif

}  // namespace mmfast::cpu::CPU_CAPABILITY
