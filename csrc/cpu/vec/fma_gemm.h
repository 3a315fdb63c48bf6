// The projector's GEMMs on CPUs with AVX2 and FMA but no AVX-512, on our own tile kernel:
// float32 products and sums of float32, float16 or bfloat16 operands, widened as they are
// packed, with the projector's elementwise work done in each output tile's epilogue while the
// tile is in cache.
//
// Why our own there: ATen's bfloat16 and float16 GEMMs are scalar loops on such a CPU
// (0.4-16 GFLOP/s on a Zen 3), and widening whole operands to float32 for MKL costs memory
// (a float32 copy of A: 72 MiB at LLaVA-1.5-7B). In float32 it ran the projector's GEMMs at
// 110-132 GFLOP/s on the Zen 3's 2 threads against eager's MKL at 97-114 in a full suite run;
// in a faster phase of that shared VM MKL ran 8-10% ahead of it at LLaVA-1.5-13B's shapes
// (~174 against ~161: NOTES). Its 6 x 16 register tile runs at the FMA peak (94 GFLOP/s per
// core there) when its operands are in L1.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>

#include "common/ceil_div.h"
#include "cpu/isa.h"

namespace mmfast::cpu {

enum class FmaEpilogue : int {
  // out[row(i), j] = acc + bias[j]; row(i) = out_rows[i] (null: i)
  kStore,
  // v = round(acc + bias[j]); out2[i, j] = v (when out2); out[i, j] = gelu(v). The activation
  // is taken of the rounded pre-activation, the value the backward sees.
  kBiasGelu,
  // d = round(acc) * gelu'(h[i, j]); out[i, j] = d; out2[i, j] = gelu(h[i, j]) (when out2);
  // bias_grad[i / kFmaTileRows, j] += d (float32 partial sums per tile of rows, when not null)
  kGeluGrad,
};

// Rows of A per work item: the float32 tile of sums of an item (kFmaTileRows x 256) and its
// panel of A (kFmaTileRows x 256) stay in L2 (512 KiB per core on a Zen 3).
constexpr int64_t kFmaTileRows = 96;

// C [M, N] = A [M, K] B [K, N], then the epilogue. All operands and outputs are of one dtype
// (float32, float16 or bfloat16); A and B may have any strides.
struct FmaGemm {
  int64_t m = 0, n = 0, k = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  const void* a = nullptr;  // A[i][p] at a + i * a_rs + p * a_cs (elements)
  int64_t a_rs = 0, a_cs = 0;
  const void* b = nullptr;  // B[p][j] at b + p * b_rs + j * b_cs
  int64_t b_rs = 0, b_cs = 0;
  const void* bias = nullptr;  // [N] or null (kStore, kBiasGelu)
  void* out = nullptr;         // row stride ldo, unit column stride
  int64_t ldo = 0;
  const int64_t* out_rows = nullptr;  // [M] or null (kStore)
  FmaEpilogue epilogue = FmaEpilogue::kStore;
  void* out2 = nullptr;  // row stride ldo2
  int64_t ldo2 = 0;
  const void* h = nullptr;  // [M, N] (kGeluGrad), row stride ldh
  int64_t ldh = 0;
  float* bias_grad = nullptr;  // [fma_row_tiles(m), N] zeros, or null (kGeluGrad)
  bool tanh_form = false;
  // scratch of fma_panel_numel(*this) floats on a cache line (the caller's: it may sit on
  // huge pages, huge_pages.h)
  float* panel = nullptr;
};

inline int64_t fma_row_tiles(int64_t m) { return ceil_div(m, kFmaTileRows); }

// Columns of B per packed panel: [512 x K] float32 (8 MiB at K = 4096), shared by the threads
// through L3.
constexpr int64_t kFmaPanelCols = 512;

// Floats of the scratch that holds one packed panel of B for g (FmaGemm::panel).
inline int64_t fma_panel_numel(const FmaGemm& g) {
  return std::min(kFmaPanelCols, ceil_div(g.n, int64_t(16)) * 16) * std::max<int64_t>(g.k, 1);
}

}  // namespace mmfast::cpu

// Runs g on at::get_num_threads() threads (its own parallel regions). Implemented in the AVX2
// and AVX512 builds (the AVX512 one for tests that force this kernel); the generic build asserts.
MMFAST_DECLARE_ISA_KERNEL(void fma_gemm(const ::mmfast::cpu::FmaGemm& g))
