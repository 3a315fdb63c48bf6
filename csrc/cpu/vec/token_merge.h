// Row loops of bipartite_merge and prune_tokens, one build per ISA (raw pointers only; the
// caller splits rows across threads). Element types: float32, float16, bfloat16; math in
// float32.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

// sum_c row[c]^2 in float32 (NaN and Inf propagate; the caller tells overflow from them).
MMFAST_DECLARE_ISA_KERNEL(
    float row_sumsq(c10::ScalarType dtype, const void* row, int64_t n))

// out[c] = scale * sum_k weights[k] * x[rows[k] * row_stride + c], summed in the order of
// `rows` (deterministic); acc is float32 scratch of n elements. out is written with
// cache-bypassing stores where possible (see streaming_fence).
MMFAST_DECLARE_ISA_KERNEL(
    void weighted_row_sum(c10::ScalarType dtype, const void* x, int64_t row_stride,
                          const int64_t* rows, const float* weights, int64_t count, float scale,
                          float* acc, void* out, int64_t n))

// memcpy(dst, src, bytes), with stores that bypass the cache where the ISA has them and dst is
// aligned: the merge writes a fresh output once, and reading its lines in first would only
// add memory traffic.
MMFAST_DECLARE_ISA_KERNEL(void copy_row_streaming(const void* src, void* dst, int64_t bytes))

// Orders the cache-bypassing stores of copy_row_streaming and weighted_row_sum before what
// follows (a thread calls it before its results are read by others).
MMFAST_DECLARE_ISA_KERNEL(void streaming_fence())

// dst[c] = factor * src[c]
MMFAST_DECLARE_ISA_KERNEL(
    void scale_row(c10::ScalarType dtype, const void* src, float factor, void* dst, int64_t n))

// sum_c a[c] * b[c] with float32 accumulation (both rows of `dtype`).
MMFAST_DECLARE_ISA_KERNEL(
    float row_dot(c10::ScalarType dtype, const void* a, const void* b, int64_t n))

// row_dot of two bfloat16 rows. It may use the CPU's bfloat16 dot-product instruction, which
// flushes values below 2^-126 to zero: the caller keeps rows far above that range.
MMFAST_DECLARE_ISA_KERNEL(float bf16_row_dot(const void* a, const void* b, int64_t n))

// Returns sum_c src[c]^2 (float32; NaN and Inf propagate), writes dst[c] = bfloat16(src[c])
// and *residual_sumsq = sum_c (src[c] - dst[c])^2.
MMFAST_DECLARE_ISA_KERNEL(
    float row_sumsq_to_bf16(c10::ScalarType dtype, const void* src, int64_t n,
                            c10::BFloat16* dst, float* residual_sumsq))

// Returns sum_c src[c]^2 (float32; NaN and Inf propagate) and quantizes the row symmetrically:
// with step = max_c |src[c]| / 127, q[c] = round(src[c] / step) in [-127, 127], stored as the
// byte q[c] ^ flip (flip = 0x80 gives the unsigned q + 128 of VNNI's u8 operand, 0 the signed
// q); *step_out = step, *residual_sumsq = sum_c (src[c] - q[c] step)^2, *q_sum = sum_c q[c].
// A row whose largest magnitude is below 1e-30 or not finite gives q = 0, step = 0 and
// residual = the row's sum of squares. n <= 65536 (q_sum is summed in float32, exactly).
MMFAST_DECLARE_ISA_KERNEL(
    float row_sumsq_to_int8(c10::ScalarType dtype, const void* src, int64_t n, uint8_t* dst,
                            uint8_t flip, float* step_out, float* residual_sumsq,
                            int32_t* q_sum))

// A tile's GEMM panel [rows, ldc] scores B tokens (rows) against A tokens (the first `cols`
// columns, at most 64); scan_*_rows walks it row by row, in B-token order, and keeps per column i:
//   s_j = float(c[j, i] - offset[i]) * scale[j] (int32 sums) or c[j, i] * scale[j] (float32),
//   top[i] = max_j s_j so far and arg[i] = the first j reaching it,
//   wide[i] = top[i] - width[i] rounded down, updated with each new top,
//   the list of every j with v = s_j + coef[i] * slack[j] (one fused multiply-add) >= wide[i]
//   at the time row j is scanned: idx[i * room + k] = j, value[...] = v, k < count[i],
//   nan[i] set when an s_j is NaN (float32 sums that overflowed).
// Because wide only rises, each list holds every j that would pass the final floor. With
// first_panel, the panel's own maxima are found first (top must be -inf and the lists empty
// before it), so that its lists are held to that floor from their first row. coef = 0
// and width = -inf list nothing. offset, top, wide and coef have room for `cols` rounded up to
// a whole vector (16 floats); row indices are base + j.
namespace mmfast::cpu {
struct ColumnScan {
  int64_t cols = 0;
  const int32_t* offset = nullptr;
  const float* coef = nullptr;
  const float* width = nullptr;
  float* top = nullptr;
  int32_t* arg = nullptr;
  float* wide = nullptr;
  uint8_t* nan = nullptr;
  int32_t* idx = nullptr;
  float* value = nullptr;
  int64_t room = 0;
  int64_t* count = nullptr;
};
}  // namespace mmfast::cpu
MMFAST_DECLARE_ISA_KERNEL(
    void scan_int_rows(const int32_t* c, int64_t ldc, int64_t rows, const float* scale,
                       const float* slack, int32_t base, bool first_panel,
                       ColumnScan& state))
MMFAST_DECLARE_ISA_KERNEL(
    void scan_float_rows(const float* c, int64_t ldc, int64_t rows, const float* scale,
                         const float* slack, int32_t base, bool first_panel,
                         ColumnScan& state))
