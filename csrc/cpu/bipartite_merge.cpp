// CPU kernels of mmfast::bipartite_merge and mmfast::bipartite_merge_backward (ToMe bipartite
// soft matching + size-weighted merge).
//
// Forward, per sample: (1) inverse L2 norms of the metric rows (non-finite rows are an error);
// (2) for tiles of up to kTileA A tokens, int8, bfloat16 or float32 brgemm calls score a panel of
// B tokens at a time against the tile, each panel is scanned while in cache for the B tokens
// near each A token's maximum, and those are re-scored exactly in float32 (see best_matches):
// the A x B matrix never exists; (3) the r
// best A tokens by (score desc, index asc); (4) every output row is the size-weighted mean of
// its group, summed in a fixed order (the row's own token, then its merged A tokens by index):
// deterministic whatever the thread count.
//
// Norms scale the dot products afterwards, so the choice of merged tokens differs from an
// exact (float64) computation only by the float32 rounding of one dot product per pair.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <vector>

#include "common/bipartite_merge.h"
#include "common/ceil_div.h"
#include "cpu/isa.h"
#include "cpu/vec/token_merge.h"
#include "cpu/vec/transpose.h"

namespace mmfast::cpu {

namespace {

// A tokens per GEMM tile: the columns of each GEMM panel, in whole vectors of 16 (a partial
// vector of columns costs the GEMM a full one).
constexpr int64_t kTileA = 64;

double element_as_double(at::ScalarType dtype, const char* row, int64_t c) {
  switch (dtype) {
    case at::kHalf: return static_cast<float>(reinterpret_cast<const c10::Half*>(row)[c]);
    case at::kBFloat16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[c]);
    default: return reinterpret_cast<const float*>(row)[c];
  }
}

// Rows per task, a multiple of `multiple` (or all rows), when each of bsz samples splits its
// `rows` into blocks of at most max_rows: a size that gives every thread the same number of
// blocks if up to twice as many blocks allow it (ATen's pool hands each thread one contiguous
// range of tasks: 23 blocks on 2 threads would leave one thread idle for 1/12 of the time).
int64_t balanced_block(int64_t bsz, int64_t rows, int64_t max_rows, int64_t multiple = 1) {
  const int64_t threads = at::get_num_threads();
  const auto block_for = [&](int64_t blocks) {
    return std::min(rows, ceil_div(ceil_div(rows, blocks), multiple) * multiple);
  };
  const int64_t fewest = ceil_div(rows, max_rows);
  for (int64_t blocks = fewest; blocks <= 2 * fewest && blocks <= rows; ++blocks) {
    const int64_t block = block_for(blocks);
    if (bsz * ceil_div(rows, block) % threads == 0) return block;
  }
  return std::max<int64_t>(1, block_for(fewest));
}

// The approximate GEMM that scores every pair before the exact re-score of near-best pairs
// (merge_gemm in isa.h picks it per CPU). int8: products are exact integers and VNNI runs them
// at twice the bfloat16 rate, and four times float32. Without VNNI, oneDNN's u8 x s8 kernels
// may saturate 16-bit partial sums, so bfloat16 is used there (and in the AVX2/generic builds
// on an AVX-512 CPU, which lets the tests run both). Without AVX-512 ATen has no bfloat16
// brgemm on VNNI-packed operands (it raises an error), and its float32 one runs: the metric is
// read as float32 (widened once when it is not), with nothing rounded.
enum class FirstPass { kInt8, kBFloat16, kFloat32 };

// Up to 65536 columns, the int32 sums of u8 x s8 products (|each| <= 255 * 127) cannot
// overflow. ATen's bfloat16 brgemm also needs oneDNN enabled (torch.backends.mkldnn), which a
// user can switch off at any time.
FirstPass first_pass(int64_t columns) {
  const MergeGemm choice = merge_gemm();
  if (choice == MergeGemm::kInt8 && columns <= 65536) return FirstPass::kInt8;
  if (choice != MergeGemm::kFloat32 && bf16_brgemm_runs() &&
      at::globalContext().userEnabledMkldnn()) {
    return FirstPass::kBFloat16;
  }
  return FirstPass::kFloat32;
}

// The GEMM reads the metric in place (B rows as they are, A rows as 32-bit words transposed:
// bfloat16 pairs into the VNNI layout, or float32 values) when its rows are whole words of the
// pass's type: a float32 metric for the float32 pass, for bfloat16 whole, aligned pairs.
bool needs_copy(const at::Tensor& metric, FirstPass pass) {
  if (pass == FirstPass::kFloat32) {
    return metric.scalar_type() != at::kFloat || metric.stride(2) != 1;
  }
  return pass == FirstPass::kInt8 || metric.scalar_type() != at::kBFloat16 ||
         metric.size(2) % 2 != 0 || metric.stride(2) != 1 || metric.stride(1) % 2 != 0 ||
         reinterpret_cast<uintptr_t>(metric.const_data_ptr()) % 4 != 0;
}

// Per metric row: inv_norm = 1 / |m| (0 for a zero row, whose similarity is then 0 to all).
// With `gemm`, also the approximate GEMM's operands: when the metric has to be rounded for it
// (to int8, or to bfloat16), rho = |m - m~| / |m|, the relative size of the rounding (bounds
// the GEMM's error); the rounding never changes the result, since best_matches re-scores the
// near-best candidates exactly. Rounded rows have K' columns (zero padded): K rounded up to
// even for bfloat16, to a multiple of 4 for int8, where B rows (odd tokens: the GEMM's
// row-major operand) are stored as u8 = q + 128 and A rows (even tokens: its VNNI operand)
// as s8 = q.
struct PreparedMetric {
  bool copy = false;    // the GEMM reads rounded rows, not the metric itself
  bool int8 = false;
  bool f32 = false;     // float32 GEMM on the metric in place (never a copy)
  int64_t k = 0;        // K'
  int64_t op_size = 0;  // bytes per GEMM operand element
  at::Tensor inv_norm;  // [B, N] float32
  at::Tensor rho;       // [B, N] float32 (zeros without rounding)
  at::Tensor b_rows;    // with a copy: the rounded B rows [B, Nb, K']
  at::Tensor step;      // int8: [B, N] float32, each row's quantization step (m~ = q * step)
  at::Tensor q_offset;  // int8: [B, N] int32, 128 * sum_c q[c]: the +128 of B's u8 operand
                        // adds this (of A row t) to every product with A row t
};

// Nonzero metric rows must have a norm of at least 2^-50: the product of two such norms
// (2^-100) keeps every float32 dot product far above the range where float32 loses
// precision (2^-126), and the bfloat16 dot-product instruction's flushing of values below
// 2^-126 changes a sum by less than 2^-66 of |a| |b| (Cm <= 65536).
constexpr double kMinSumSq = 0x1p-100;

// Rows are read every other one (A or B tokens) or in an order known just before (the exact
// re-scores): the hardware prefetcher misses them, so the next row is fetched while the
// current one is summed.
void prefetch(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

const char* metric_row(const at::Tensor& metric, int64_t b, int64_t t) {
  return static_cast<const char*>(metric.const_data_ptr()) +
         (b * metric.stride(0) + t * metric.stride(1)) * metric.element_size();
}

// Row t of sample b: its statistics, and (with a copy) its rounded row to dst (K' elements).
void prepare_row(const at::Tensor& metric, PreparedMetric& prep, int64_t b, int64_t t,
                 char* dst) {
  const int64_t n = metric.size(1), cm = metric.size(2), kp = prep.k;
  const int64_t flat = b * n + t;
  const auto dtype = metric.scalar_type();
  const char* row = metric_row(metric, b, t);
  float residual = 0.0f;
  double ss;
  if (prep.int8) {
    const uint8_t flip = t % 2 == 1 ? 0x80 : 0;  // B rows become u8 = q + 128
    int32_t q_sum = 0;
    ss = MMFAST_PICK_ISA(row_sumsq_to_int8)(dtype, row, cm, reinterpret_cast<uint8_t*>(dst),
                                            flip, prep.step.mutable_data_ptr<float>() + flat,
                                            &residual, &q_sum);
    std::fill(dst + cm, dst + kp, static_cast<char>(flip));
    prep.q_offset.mutable_data_ptr<int32_t>()[flat] = 128 * q_sum;
  } else if (prep.copy) {
    auto* d16 = reinterpret_cast<at::BFloat16*>(dst);
    ss = MMFAST_PICK_ISA(row_sumsq_to_bf16)(dtype, row, cm, d16, &residual);
    if (kp > cm) d16[cm] = at::BFloat16(0.0f);
  } else {
    ss = MMFAST_PICK_ISA(row_sumsq)(dtype, row, cm);
  }
  // A non-finite float32 sum is a NaN/Inf value or an overflow of the sum; one below
  // kMinSumSq is a zero row (similarity 0 to all) or one too small for float32 dot products
  // (its products with another such row would fall below float32's normal range). Tell them
  // apart in double.
  if (!std::isfinite(ss) || ss < kMinSumSq) {
    const bool small = ss < kMinSumSq;
    ss = 0.0;
    for (int64_t c = 0; c < cm; ++c) {
      const double v = element_as_double(dtype, row, c);
      TORCH_CHECK_VALUE(std::isfinite(v), "bipartite_merge: metric has a non-finite value "
                        "at [", b, ", ", t, ", ", c, "]; similarities would be NaN");
      ss += v * v;
    }
    if (small) {
      TORCH_CHECK_VALUE(ss == 0.0, "bipartite_merge: metric row [", b, ", ", t, "] has norm ",
                        std::sqrt(ss), ", below 2^-50 but not 0: its float32 similarities "
                        "would lose their precision; scale the metric up (cosine similarity "
                        "does not depend on its scale)");
    }
  }
  prep.inv_norm.mutable_data_ptr<float>()[flat] =
      ss > 0.0 ? static_cast<float>(1.0 / std::sqrt(ss)) : 0.0f;
  // 1% slack covers the rounding of rho itself; an overflowed residual (values beyond the
  // copy's range) gives rho = inf, which makes every B token a candidate.
  if (prep.copy && ss > 0.0) {
    prep.rho.mutable_data_ptr<float>()[flat] =
        static_cast<float>(1.01 * std::sqrt(residual / ss));
  }
}

// Without `gemm`, the statistics of every row (non-finite values are an error whatever r is).
// With it, those of the B rows, rounded into b_rows when the GEMM needs a copy; best_matches
// prepares the A rows of each tile itself, into a buffer that stays in cache until their
// exact re-scores.
PreparedMetric prepare_metric(const at::Tensor& metric, FirstPass pass, bool gemm) {
  const int64_t bsz = metric.size(0), n = metric.size(1), cm = metric.size(2);
  const int64_t nb = n / 2;
  const auto opts = metric.options();
  PreparedMetric out;
  out.copy = gemm && needs_copy(metric, pass);
  out.int8 = out.copy && pass == FirstPass::kInt8;
  out.f32 = gemm && pass == FirstPass::kFloat32;
  TORCH_INTERNAL_ASSERT(!(out.f32 && out.copy), "the float32 pass reads a widened metric");
  out.k = out.int8 ? (cm + 3) / 4 * 4 : out.f32 ? cm : cm + cm % 2;
  out.op_size = out.int8 ? 1 : out.f32 ? 4 : 2;
  out.inv_norm = at::empty({bsz, n}, opts.dtype(at::kFloat));
  out.rho = at::zeros({bsz, n}, opts.dtype(at::kFloat));
  if (out.copy) {
    out.b_rows = at::empty({bsz, nb, out.k}, opts.dtype(out.int8 ? at::kByte : at::kBFloat16));
  }
  if (out.int8) {
    out.step = at::empty({bsz, n}, opts.dtype(at::kFloat));
    out.q_offset = at::empty({bsz, n}, opts.dtype(at::kInt));
  }
  char* b_rows = out.copy ? static_cast<char*>(out.b_rows.mutable_data_ptr()) : nullptr;
  const int64_t row_bytes = cm * metric.element_size();
  // A task: a block of up to 64 rows of one sample (B rows only with `gemm`).
  const int64_t rows = gemm ? nb : n;
  const int64_t block = balanced_block(bsz, rows, 64);
  const int64_t blocks = ceil_div(rows, block);
  at::parallel_for(0, bsz * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / blocks, r0 = (task % blocks) * block;
      const int64_t count = std::min(block, rows - r0);
      for (int64_t q = 0; q < count; ++q) {
        const auto token = [&](int64_t r) { return gemm ? 2 * r + 1 : r; };
        if (q + 1 < count) prefetch(metric_row(metric, b, token(r0 + q + 1)), row_bytes);
        prepare_row(metric, out, b, token(r0 + q),
                    out.copy ? b_rows + (b * nb + r0 + q) * out.k * out.op_size : nullptr);
      }
    }
  });
  return out;
}

// Bound, in units of |a| (the score s_j = a . b_j / |b_j| of an A row a), on |s~_j - s_j| +
// |s^_j - s_j|: s~ from the GEMM on rounded rows (relative rounding rho_a, rho_b), s^ the
// exact float32 re-score. With a = a~ + da, |a . b - a~ . b~| <= |da||b| + |a~||db| gives
// rho_a + rho_b + rho_a rho_b; each float32 sum of k products adds gamma_k (1 + rho)^2; the
// float32 scalings by the inverse norms add a few units of 2^-24. The bound is affine in
// rho_b: alpha + beta rho_b.
struct ScoreBound {
  double alpha, beta;
};

ScoreBound score_error_bound(int64_t k, double rho_a) {
  const double gamma = 1.01 * static_cast<double>(k + 2) * std::ldexp(1.0, -24);
  return {rho_a + gamma * (1.0 + rho_a) + gamma + std::ldexp(1.0, -20),
          1.0 + rho_a + gamma * (1.0 + rho_a)};
}

// B tokens per GEMM call: its output ([kPanelRows, kTileA], 512 KiB) stays in L2 while it is
// scanned, and a LLaVA-NeXT image (1440 B tokens) fits in one panel.
constexpr int64_t kPanelRows = 2048;
// Most candidate rows fetched ahead of their exact re-scores.
constexpr int64_t kPrefetchRows = 8;

// One A row of a tile: its bound's terms, then (after the scan) the top of s~ and the first j
// reaching it, and how many j its list holds.
struct RowScan {
  float unit = 0.0f;
  double alpha = 0.0;
  float top = -INFINITY;
  int64_t arg = 0;
  int64_t count = 0;
  bool scan = false;  // false for a zero row (similarity 0 everywhere) or without a bound
  bool all = false;   // no usable bound: every j is re-scored
};

// node_max[b, i] = max_j cos(a_i, b_j), node_idx[b, i] = the first j reaching it.
//
// Per tile of A tokens, approximate GEMM calls score a panel of kPanelRows B tokens at a time
// against the tile's A tokens, the panel's columns (the A x B matrix never exists): s~_j, in
// units u of the cosine; bfloat16 or float32, s~_j = (a . b_j)~ / |b_j| and u = 1 / |a|; int8,
// s~_j = q_a . q_b_j * step_b_j / |b_j| and u = step_a / |a|. An exact score (a float32 dot
// of the metric rows as given) is within e(rho_b) = alpha + beta rho_b of s~_j u. While the
// panel is in cache, it is scanned in B-token order (scan_*_rows): each column keeps its
// running maximum s~_top, the first j reaching it, and every j with
//   s~_j + (beta / u) rho_b_j >= s~_top - (2 alpha + beta rho_max) / u
// at the time j is scanned, a superset (s~_top only grows) of the j that can beat or tie the
// exact score of the final top, which is at least s~_top u - e(rho_max). After the last
// panel, the first j reaching the top is scored exactly, the list narrows to
//   s~_j + (beta / u) rho_b_j >= (exact_top / |a| - alpha) / u,
// and those are re-scored: the best of them, lowest index on ties, is the argmax of the
// cosine over all j. Exact scores depend only on the two rows, so equal rows give equal
// scores wherever they sit in a tile.
void best_matches(const at::Tensor& metric, PreparedMetric& prep, float* node_max,
                  int64_t* node_idx, bool protect_first) {
  const at::Tensor& inv_norm = prep.inv_norm;
  const int64_t bsz = metric.size(0), n = metric.size(1), cm = metric.size(2);
  const int64_t na = (n + 1) / 2, nb = n / 2;
  const float* inv = inv_norm.const_data_ptr<float>();
  if (nb == 0 || cm == 0) {  // no partner, or all similarities 0
    std::fill(node_max, node_max + bsz * na, nb == 0 ? -INFINITY : 0.0f);
    std::fill(node_idx, node_idx + bsz * na, 0);
  } else {
    TORCH_CHECK_VALUE(nb <= std::numeric_limits<int32_t>::max(), "bipartite_merge: metric has ",
                      n, " tokens; the CPU kernel takes fewer than 2^32");
    const bool int8 = prep.int8;
    const auto rho = prep.rho.const_data_ptr<float>();
    const auto rho_b_all = prep.rho.slice(1, 1, n, 2).contiguous();  // [B, Nb]
    const auto rho_b_max = std::get<0>(at::max(rho_b_all, 1)).contiguous();  // [B]
    const auto inv_b_all = inv_norm.slice(1, 1, n, 2).contiguous();  // [B, Nb]
    // int8: what turns q_a . q_b into s~ (per B token).
    const auto scale_b_all = int8 ? at::mul(prep.step.slice(1, 1, n, 2), inv_b_all)
                                  : at::Tensor();
    const float* step = int8 ? prep.step.const_data_ptr<float>() : nullptr;
    const int32_t* q_offset = int8 ? prep.q_offset.const_data_ptr<int32_t>() : nullptr;
    const int64_t tile_cols = balanced_block(bsz, na, kTileA, 16);
    const int64_t tiles = ceil_div(na, tile_cols);
    const auto dot = MMFAST_PICK_ISA(row_dot);
    const auto bf16_dot = MMFAST_PICK_ISA(bf16_row_dot);
    const auto scan_int = MMFAST_PICK_ISA(scan_int_rows);
    const auto scan_float = MMFAST_PICK_ISA(scan_float_rows);
    const auto transpose = MMFAST_PICK_ISA(transpose32);
    const auto dtype = metric.scalar_type();
    const int64_t esize = metric.element_size();
    const int64_t op_size = prep.op_size;
    const int64_t words = prep.k * op_size / 4;  // 32-bit words per GEMM row
    const int64_t row_bytes = cm * esize;
    // The GEMM's row-major operand: the rounded B rows, or (bfloat16 without a copy) the
    // metric's B rows in place.
    const int64_t ld_b = prep.copy ? prep.k : 2 * metric.stride(1);
    const auto b_operand = [&](int64_t b) {
      return prep.copy ? static_cast<const char*>(prep.b_rows.const_data_ptr()) +
                             b * nb * prep.k * op_size
                       : metric_row(metric, b, 1);
    };
    // Tiles are handed out one at a time from a shared counter: a thread slowed by other
    // load on the machine takes fewer, instead of leaving the others waiting at the end.
    std::atomic<int64_t> next_tile{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      // Uninitialized: every element is written before it is read. The candidate lists
      // have room for every j of every row but are touched only as far as they fill.
      const auto a_rows =
          std::make_unique_for_overwrite<char[]>(prep.copy ? kTileA * prep.k * op_size : 0);
      // The tile's A rows in the VNNI layout: [words][kTileA] 32-bit groups.
      const auto a_vnni = std::make_unique_for_overwrite<int32_t[]>(words * kTileA);
      // The GEMM's output block [kPanelRows, kTileA]: int32 sums (int8) or float32.
      const auto panel = std::make_unique_for_overwrite<int32_t[]>(kPanelRows * kTileA);
      const int64_t room = nb;
      const auto cand_idx = std::make_unique_for_overwrite<int32_t[]>(kTileA * room);
      const auto cand_value = std::make_unique_for_overwrite<float[]>(kTileA * room);
      std::vector<RowScan> rows(kTileA);
      std::vector<int32_t> offset(kTileA, 0), arg(kTileA);
      std::vector<float> coef(kTileA), width(kTileA), top(kTileA), wide(kTileA);
      std::vector<uint8_t> nan(kTileA);
      std::vector<int64_t> count(kTileA);
      ColumnScan state;
      state.offset = offset.data();
      state.coef = coef.data();
      state.width = width.data();
      state.top = top.data();
      state.arg = arg.data();
      state.wide = wide.data();
      state.nan = nan.data();
      state.idx = cand_idx.get();
      state.value = cand_value.get();
      state.room = room;
      state.count = count.data();
      for (int64_t t = next_tile++; t < bsz * tiles; t = next_tile++) {
        const int64_t b = t / tiles, i0 = (t % tiles) * tile_cols;
        const int64_t m = std::min(tile_cols, na - i0);
        state.cols = m;
        const float* inv_b = inv_b_all.const_data_ptr<float>() + b * nb;
        const float* slack = rho_b_all.const_data_ptr<float>() + b * nb;
        const float rho_max = rho_b_max.const_data_ptr<float>()[b];
        // Lanes past m (up to the vector) list nothing and are never read back.
        std::fill(coef.begin(), coef.end(), 0.0f);
        std::fill(width.begin(), width.end(), -INFINITY);
        std::fill(top.begin(), top.end(), -INFINITY);
        std::fill(wide.begin(), wide.end(), -INFINITY);
        std::fill(nan.begin(), nan.end(), 0);
        std::fill(count.begin(), count.end(), 0);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t tok_a = 2 * (i0 + i);
          if (i + 1 < m) prefetch(metric_row(metric, b, tok_a + 2), row_bytes);
          prepare_row(metric, prep, b, tok_a,
                      prep.copy ? a_rows.get() + i * prep.k * op_size : nullptr);
          RowScan& row = rows[i];
          const float inv_a = inv[b * n + tok_a];
          const auto e = score_error_bound(cm, rho[b * n + tok_a]);
          row.unit = int8 ? inv_a * step[b * n + tok_a] : inv_a;
          row.alpha = e.alpha;
          row.arg = 0;
          row.count = 0;
          const float row_coef = static_cast<float>(e.beta / row.unit);
          const float row_width = std::nextafter(
              static_cast<float>((2.0 * e.alpha + e.beta * rho_max) / row.unit), INFINITY);
          row.all = !std::isfinite(row_coef) || !std::isfinite(row_width);
          row.scan = inv_a > 0.0f && !row.all;
          if (row.scan) {
            coef[i] = row_coef;
            width[i] = row_width;
          }
          if (int8) offset[i] = q_offset[b * n + tok_a];
        }
        const char* a_src = prep.copy ? a_rows.get() : metric_row(metric, b, 2 * i0);
        const int64_t ld_a_words = prep.copy ? words : 2 * metric.stride(1) * esize / 4;
        transpose(a_src, ld_a_words, a_vnni.get(), kTileA, m, words);
        const char* b_src = b_operand(b);
        for (int64_t j0 = 0; j0 < nb; j0 += kPanelRows) {
          const int64_t panel_rows = std::min(kPanelRows, nb - j0);
          const char* b_panel = b_src + j0 * ld_b * op_size;
          if (int8) {
            at::native::cpublas::brgemm(
                panel_rows, m, prep.k, ld_b, kTileA, kTileA, false,
                reinterpret_cast<const unsigned char*>(b_panel),
                reinterpret_cast<const signed char*>(a_vnni.get()), panel.get(), true);
            scan_int(panel.get(), kTileA, panel_rows,
                     scale_b_all.const_data_ptr<float>() + b * nb + j0, slack + j0,
                     static_cast<int32_t>(j0), j0 == 0, state);
          } else if (prep.f32) {
            at::native::cpublas::brgemm(
                panel_rows, m, prep.k, ld_b, kTileA, kTileA, false,
                reinterpret_cast<const float*>(b_panel),
                reinterpret_cast<const float*>(a_vnni.get()),
                reinterpret_cast<float*>(panel.get()), false);
            scan_float(reinterpret_cast<const float*>(panel.get()), kTileA, panel_rows,
                       inv_b + j0, slack + j0, static_cast<int32_t>(j0), j0 == 0, state);
          } else {
            at::native::cpublas::brgemm(
                panel_rows, m, prep.k, ld_b, kTileA, kTileA, false,
                reinterpret_cast<const at::BFloat16*>(b_panel),
                reinterpret_cast<const at::BFloat16*>(a_vnni.get()),
                reinterpret_cast<float*>(panel.get()), true);
            scan_float(reinterpret_cast<const float*>(panel.get()), kTileA, panel_rows,
                       inv_b + j0, slack + j0, static_cast<int32_t>(j0), j0 == 0, state);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          RowScan& row = rows[i];
          if (!row.scan) continue;
          row.arg = arg[i];
          row.count = count[i];
          // No finite floor (no finite score), or NaN scores (overflowed float32 sums).
          if (!(wide[i] > -INFINITY) || nan[i]) row.all = true;
        }
        // Two sweeps over the tile's rows, each fetching rows it will need a step ahead
        // (their addresses are known): the exact scores of the tops, which narrow the lists,
        // then the exact scores of what the lists keep.
        const auto row_b = [&](int64_t j) { return metric_row(metric, b, 2 * j + 1); };
        const auto exact_score = [&](int64_t i, int64_t j) {
          const char* row_a = metric_row(metric, b, 2 * (i0 + i));
          return (dtype == at::kBFloat16 ? bf16_dot(row_a, row_b(j), cm)
                                         : dot(dtype, row_a, row_b(j), cm)) *
                 inv_b[j];
        };
        for (int64_t i = 0; i < std::min<int64_t>(m, 2); ++i) {
          prefetch(row_b(rows[i].arg), row_bytes);
        }
        for (int64_t i = 0; i < m; ++i) {
          RowScan& row = rows[i];
          if (i + 2 < m) prefetch(row_b(rows[i + 2].arg), row_bytes);
          const float inv_a = inv[b * n + 2 * (i0 + i)];
          if (inv_a == 0.0f) {  // a zero row scores 0 everywhere: arg 0
            row.top = 0.0f;
            row.arg = 0;
            row.count = 0;
            continue;
          }
          row.top = exact_score(i, row.arg);  // from here on, exact
          const float floor = std::nextafter(
              static_cast<float>((static_cast<double>(row.top) * inv_a - row.alpha) /
                                 row.unit),
              -INFINITY);
          if (row.all || std::isnan(floor) || floor == -INFINITY) {
            row.all = true;
            row.count = nb;
            continue;
          }
          int32_t* kept = cand_idx.get() + i * room;
          const float* value = cand_value.get() + i * room;
          int64_t count = 0;
          for (int64_t c = 0; c < row.count; ++c) {
            if (value[c] >= floor) kept[count++] = kept[c];
          }
          row.count = count;
        }
        for (int64_t i = 0; i < m; ++i) {
          RowScan& row = rows[i];
          if (i + 1 < m && !rows[i + 1].all) {
            const int32_t* next = cand_idx.get() + (i + 1) * room;
            for (int64_t c = 0; c < std::min(rows[i + 1].count, kPrefetchRows); ++c) {
              prefetch(row_b(next[c]), row_bytes);
            }
          }
          const int64_t first = row.arg;
          for (int64_t c = 0; c < row.count; ++c) {
            const int64_t j = row.all ? c : cand_idx[i * room + c];
            if (j == first) continue;
            const float exact = exact_score(i, j);
            // Candidates come in index order: the lowest index wins a tie.
            if (exact > row.top || (exact == row.top && j < row.arg)) {
              row.top = exact;
              row.arg = j;
            }
          }
          node_max[b * na + i0 + i] = row.top * inv[b * n + 2 * (i0 + i)];
          node_idx[b * na + i0 + i] = row.arg;
        }
      }
      at::native::cpublas::brgemm_release(!prep.f32);
    });
  }
  if (protect_first) {
    for (int64_t b = 0; b < bsz; ++b) node_max[b * na] = -INFINITY;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cpu(
    const at::Tensor& x, const at::Tensor& metric_in, int64_t r,
    const std::optional<at::Tensor>& size, bool protect_first) {
  check_bipartite_merge_args(x, metric_in, r, size, protect_first);
  const int64_t bsz = x.size(0), n = x.size(1), c = x.size(2);
  const int64_t na = (n + 1) / 2, m_out = n - r;
  const int64_t cm = metric_in.size(2);
  const bool gemm = r > 0 && n > 1 && cm > 0;
  const FirstPass pass = first_pass(cm);
  // The float32 pass reads a float32 metric: any other is widened once (exactly), so that its
  // GEMM and its exact re-scores read the same values in place.
  const auto metric = gemm && pass == FirstPass::kFloat32 && needs_copy(metric_in, pass)
                          ? metric_in.to(at::kFloat).contiguous()
                      : metric_in.stride(2) == 1 ? metric_in
                                                 : metric_in.contiguous();
  const auto xc = x.stride(2) == 1 ? x : x.contiguous();
  const auto sizes = size.has_value() ? size->to(at::kFloat).contiguous() : at::Tensor();

  // (1) + (2): the best B match of every A token. Non-finite metric rows are an error even
  // when r == 0, so that the op's contract does not depend on r.
  auto prep = prepare_metric(metric, pass, gemm);
  std::vector<float> node_max(bsz * na);
  std::vector<int64_t> node_idx(bsz * na);
  if (r > 0) best_matches(metric, prep, node_max.data(), node_idx.data(), protect_first);

  // (3) selection and the groups: for every output row, its tokens in summation order.
  auto dest = at::empty({bsz, n}, x.options().dtype(at::kLong));
  std::vector<int64_t> group_start(bsz * (m_out + 1));
  std::vector<int64_t> group_tokens(bsz * n);
  int64_t* dest_ptr = dest.mutable_data_ptr<int64_t>();
  at::parallel_for(0, bsz, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(na), merged_into(na), count(n);
    for (int64_t b = b0; b < b1; ++b) {
      const float* score = node_max.data() + b * na;
      std::iota(order.begin(), order.end(), 0);
      // Only the set of the r best matters (outputs follow token order), so a partition
      // suffices: O(Na) instead of sorting.
      if (r < na) {
        std::nth_element(order.begin(), order.begin() + r, order.end(),
                         [&](int64_t p, int64_t q) {
                           return score[p] > score[q] || (score[p] == score[q] && p < q);
                         });
      }
      std::fill(merged_into.begin(), merged_into.end(), -1);
      for (int64_t k = 0; k < r; ++k) {
        merged_into[order[k]] = 2 * node_idx[b * na + order[k]] + 1;  // token index
      }
      int64_t* d = dest_ptr + b * n;
      // Output rows: surviving tokens in order; count[t] = size of token t's group.
      std::fill(count.begin(), count.end(), 0);
      int64_t row = 0;
      for (int64_t t = 0; t < n; ++t) {
        if (t % 2 == 0 && merged_into[t / 2] >= 0) continue;
        d[t] = row++;
        count[t] = 1;
      }
      for (int64_t i = 0; i < na; ++i) {
        if (merged_into[i] >= 0) {
          d[2 * i] = d[merged_into[i]];
          ++count[merged_into[i]];
        }
      }
      int64_t* start = group_start.data() + b * (m_out + 1);
      int64_t* tokens = group_tokens.data() + b * n;
      start[0] = 0;
      std::vector<int64_t> fill(m_out);
      for (int64_t t = 0, o = 0; t < n; ++t) {
        if (count[t] == 0) continue;
        tokens[start[o]] = t;  // the row's own token first
        fill[o] = start[o] + 1;
        start[o + 1] = start[o] + count[t];
        ++o;
      }
      for (int64_t i = 0; i < na; ++i) {  // then its merged A tokens, by index
        if (merged_into[i] >= 0) tokens[fill[d[2 * i]]++] = 2 * i;
      }
    }
  });

  // (4) the size-weighted mean of every group.
  auto merged = at::empty({bsz, m_out, c}, x.options());
  auto merged_size = at::empty({bsz, m_out}, x.options().dtype(at::kFloat));
  const float* size_ptr = sizes.defined() ? sizes.const_data_ptr<float>() : nullptr;
  float* msize_ptr = merged_size.mutable_data_ptr<float>();
  const auto dtype = x.scalar_type();
  const int64_t esize = x.element_size();
  const char* xbase = static_cast<const char*>(xc.const_data_ptr());
  char* obase = static_cast<char*>(merged.mutable_data_ptr());
  const auto wsum = MMFAST_PICK_ISA(weighted_row_sum);
  const auto copy_row = MMFAST_PICK_ISA(copy_row_streaming);
  const auto fence = MMFAST_PICK_ISA(streaming_fence);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(c, 1));
  at::parallel_for(0, bsz * m_out, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(c);
    std::vector<float> weights;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / m_out, o = t % m_out;
      const int64_t* start = group_start.data() + b * (m_out + 1);
      const int64_t* tokens = group_tokens.data() + b * n + start[o];
      const int64_t count = start[o + 1] - start[o];
      const char* xb = xbase + b * xc.stride(0) * esize;
      char* out_row = obase + t * c * esize;
      weights.resize(count);
      float total = 0.0f;
      for (int64_t k = 0; k < count; ++k) {
        weights[k] = size_ptr ? size_ptr[b * n + tokens[k]] : 1.0f;
        total += weights[k];
      }
      msize_ptr[t] = total;
      // A merged group's rows are scattered over the sample: fetch the next group's while
      // this one is summed.
      if (t + 1 < t1 && o + 1 < m_out && start[o + 2] - start[o + 1] > 1) {
        const int64_t* next = group_tokens.data() + b * n + start[o + 1];
        for (int64_t k = 0; k < start[o + 2] - start[o + 1]; ++k) {
          prefetch(xb + next[k] * xc.stride(1) * esize, c * esize);
        }
      }
      if (count == 1) {  // a token that merged with nothing is copied exactly
        copy_row(xb + tokens[0] * xc.stride(1) * esize, out_row, c * esize);
      } else {
        wsum(dtype, xb, xc.stride(1), tokens, weights.data(), count, 1.0f / total, acc.data(),
             out_row, c);
      }
    }
    fence();
  });
  return {merged, merged_size, dest};
}

// grad_x[b, t] = grad_merged[b, dest[b, t]] * size[b, t] / merged_size[b, dest[b, t]]
at::Tensor bipartite_merge_backward_cpu(const at::Tensor& grad_merged, const at::Tensor& dest,
                                        const std::optional<at::Tensor>& size,
                                        const at::Tensor& merged_size) {
  check_bipartite_merge_backward_args(grad_merged, dest, size, merged_size);
  const int64_t bsz = dest.size(0), n = dest.size(1);
  const int64_t m = grad_merged.size(1), c = grad_merged.size(2);
  const auto g = grad_merged.contiguous();
  const auto d = dest.contiguous();
  const auto ms = merged_size.contiguous();
  const auto sizes = size.has_value() ? size->to(at::kFloat).contiguous() : at::Tensor();
  auto grad_x = at::empty({bsz, n, c}, grad_merged.options());
  const auto scale = MMFAST_PICK_ISA(scale_row);
  const auto dtype = g.scalar_type();
  const int64_t esize = g.element_size();
  const char* gbase = static_cast<const char*>(g.const_data_ptr());
  char* obase = static_cast<char*>(grad_x.mutable_data_ptr());
  const int64_t* dp = d.const_data_ptr<int64_t>();
  const float* msp = ms.const_data_ptr<float>();
  const float* sp = sizes.defined() ? sizes.const_data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(c, 1));
  at::parallel_for(0, bsz * n, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n, o = dp[t];
      TORCH_CHECK_INDEX(o >= 0 && o < m, "bipartite_merge_backward: dest[", b, ", ", t % n,
                        "] = ", o, " is outside [0, ", m, ")");
      const float w = sp ? sp[t] : 1.0f;
      scale(dtype, gbase + (b * m + o) * c * esize, w / msp[b * m + o], obase + t * c * esize,
            c);
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("bipartite_merge", &bipartite_merge_cpu);
  m.impl("bipartite_merge_backward", &bipartite_merge_backward_cpu);
}

}  // namespace mmfast::cpu
