// packed_gemm_bf16, compiled once per ISA (declarations in packed_gemm.h).
//
// A packed block of B holds its columns [n0, n0 + 64) in the VNNI layout of the bfloat16
// dot-product instructions, pairs of K rows interleaved, zeros past K and N (BlockLayout).
#include "cpu/vec/packed_gemm.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include "cpu/vec/amx_tile.h"
#include "cpu/vec/vnni_tile.h"
#endif

#include <algorithm>

#include "cpu/vec/chunk.h"
#include "cpu/vec/gelu.h"
#include "cpu/vec/pair_interleave.h"
#include "cpu/vec/transpose.h"

namespace mmfast::cpu::CPU_CAPABILITY {

using BF16 = c10::BFloat16;

// Only the AVX512 build runs (the projector calls packed_gemm on CPUs with avx512_bf16 and
// that build active); the others define the entry point to fail loudly.
#if defined(CPU_CAPABILITY_AVX512)

namespace {

static_assert(kVnniCols == kPackCols, "a packed block is one vnni_tile wide");
static_assert(kAmxItemBlocks <= kAmxMaxBlocks, "amx_tile takes an item's blocks in one call");

// K per tile pass (even): 2048 x 64 of B is 256 KiB, held in L2. With brgemm as the tile
// kernel, at K = 5120 passes of 2048 ran the GEMM at ~420 GFLOP/s, one pass over all of K at
// ~395-410; with vnni_tile both took the same time (LLaVA-1.5-13B forward, 696 ms; timing
// script), and the smaller block leaves more of L2 to A.
constexpr int64_t kDepth = 2048;

// Prefetches bytes [p, p + bytes), one line (64 bytes) at a time: rows a stride apart, which
// the hardware prefetcher does not follow.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// The epilogues convert to bfloat16 with avx512_bf16's vcvtne2ps2bf16: one instruction for 32
// values, where ATen's conversion (its build has no avx512_bf16) takes ~15 integer ops. Both
// round to nearest even; this one also flushes float32 denormals (below 1.2e-38) to zero. The
// functions that use it carry the target themselves (loops, not lambdas: a lambda does not
// inherit its function's target and could not inline these).
#define MMFAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

MMFAST_BF16_TARGET inline __m512i to_bf16(const fVec& lo, const fVec& hi) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // hi's values go on top
}

// Values [0, n) of the pair (n <= kChunk) to p as bfloat16.
MMFAST_BF16_TARGET inline void store_bf16(BF16* p, int64_t n, const fVec& lo, const fVec& hi) {
  const __m512i v = to_bf16(lo, hi);
  if (n == kChunk) {
    _mm512_storeu_si512(p, v);
  } else {
    _mm512_mask_storeu_epi16(p, first_lanes(n), v);
  }
}

// 16 bfloat16 values as floats: bfloat16 bits are a float's upper 16 bits.
MMFAST_BF16_TARGET inline fVec widen_bf16(__m256i bits) {
  return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
}

// The float pair rounded to bfloat16 and widened back: the value a bfloat16 tensor would hold.
MMFAST_BF16_TARGET inline void round_bf16(fVec& lo, fVec& hi) {
  const __m512i v = to_bf16(lo, hi);
  lo = widen_bf16(_mm512_castsi512_si256(v));
  hi = widen_bf16(_mm512_extracti64x4_epi64(v, 1));
}

// A tile of float32 rows (stride kPackCols) -> bfloat16 rows of dst, transposed:
// dst[c * ld + i] = tile[i][c]. Through a float32 transpose in cache (t: kPackCols x kGemmRows).
MMFAST_BF16_TARGET void store_transposed(const float* tile, int64_t rows, int64_t cols,
                                         BF16* dst, int64_t ld, float* t) {
  transpose32(tile, kPackCols, t, kGemmRows, rows, cols);
  for (int64_t c = 0; c < cols; ++c) {
    const float* src = t + c * kGemmRows;
    BF16* out = dst + c * ld;
    for (int64_t i = 0; i < rows; i += kChunk) {
      const int64_t n = std::min(kChunk, rows - i);
      fVec lo, hi;
      load2(src + i, n, lo, hi);
      store_bf16(out + i, n, lo, hi);
    }
  }
}

// Where B[2 r + e][n0 + j] of a packed block (K/2 = k2 pair rows) lies: groups of `width`
// columns, each k2 pair rows of `width` pairs, packed[j / width][r][j % width][e]. The
// vdpbf16ps tiles (vnni_tile.h) read one group of 64 (a pair row is 64 pairs); AMX's
// (amx_tile.h) read four of 16, so that a B tile (16 pair rows of a group) is 1 KiB in one
// piece. Read with a 256-byte stride instead (one group of 64), the tile loads ran a GEMM
// whose operands sat in L2 at 0.58-0.64 TFLOP/s per core against 0.76-0.82 in one piece
// (micro-benchmark, one thread).
struct BlockLayout {
  BlockLayout(bool amx, int64_t k2) : width(amx ? kAmxGroupCols : kPackCols), k2(k2) {}
  int64_t width, k2;
  int64_t pair(int64_t r, int64_t j) const {  // offset of pair (r, j) in the block
    return (j / width) * k2 * 2 * width + r * 2 * width + 2 * (j % width);
  }
};

// Pair row r of a block from B's rows first, second (second null: zeros), `cols` columns, 32
// at a time (interleave_32): the pairs of columns [j, j + 16) and [j + 16, j + 32) go to
// pair(r, j) and pair(r, j + 16), one line each in both layouts; past `cols` they are zeros.
// With a masked load of 16 columns from each row per AMX group (8 loads per pair row instead of
// 4), SigLIP's g w2 GEMM, whose B (w2) each work item packs from rows 8 KiB apart, took 33.7 ms
// against 24.6 (bf16 training step, medians of 16 alternating rounds in one process).
void pack_pair_row(const BlockLayout& layout, const BF16* first, const BF16* second,
                   int64_t cols, int64_t r, BF16* packed) {
  static_assert(kPackCols % 32 == 0 && kAmxGroupCols == 16, "32 columns fill two groups' lines");
  for (int64_t j = 0; j < kPackCols; j += 32) {
    __m512i lo, hi;
    interleave_32(first + j, second != nullptr ? second + j : nullptr,
                  std::clamp<int64_t>(cols - j, 0, 32), lo, hi);
    _mm512_storeu_si512(packed + layout.pair(r, j), lo);
    _mm512_storeu_si512(packed + layout.pair(r, j + 16), hi);
  }
}

struct Tile {
  int64_t m0, rows, n0, cols, mblock;
};

// Row i, columns [c, c + n) of the tile plus the bias (when there is one).
inline void load_biased(const PackedGemm& g, const Tile& t, const float* acc, int64_t i,
                        int64_t c, int64_t n, fVec& lo, fVec& hi) {
  load2(acc + i * kPackCols + c, n, lo, hi);
  if (g.bias != nullptr) {
    fVec b0, b1;
    load2(g.bias + t.n0 + c, n, b0, b1);
    lo = lo + b0;
    hi = hi + b1;
  }
}

MMFAST_BF16_TARGET void store_rows(const PackedGemm& g, const Tile& t, const float* acc) {
  for (int64_t i = 0; i < t.rows; ++i) {
    const int64_t row = g.out_rows != nullptr ? g.out_rows[t.m0 + i] : t.m0 + i;
    BF16* dst = g.out + row * g.ldo + t.n0;
    for (int64_t c = 0; c < t.cols; c += kChunk) {
      const int64_t n = std::min(kChunk, t.cols - c);
      fVec lo, hi;
      load_biased(g, t, acc, i, c, n, lo, hi);
      store_bf16(dst + c, n, lo, hi);
    }
  }
}

MMFAST_BF16_TARGET void bias_gelu_rows(const PackedGemm& g, const Tile& t, const float* acc) {
  const GeluForm gelu(g.tanh_form);
  for (int64_t i = 0; i < t.rows; ++i) {
    BF16* act = g.out + (t.m0 + i) * g.ldo + t.n0;
    BF16* pre = g.out2 == nullptr ? nullptr : g.out2 + (t.m0 + i) * g.ldo2 + t.n0;
    for (int64_t c = 0; c < t.cols; c += kChunk) {
      const int64_t n = std::min(kChunk, t.cols - c);
      fVec lo, hi;
      load_biased(g, t, acc, i, c, n, lo, hi);
      round_bf16(lo, hi);
      if (pre != nullptr) store_bf16(pre + c, n, lo, hi);
      store_bf16(act + c, n, gelu(lo), gelu(hi));
    }
  }
}

// bias_gelu_rows' activation into the AMX A tiles at g.out (PackedGemm::a_tiled's layout):
// each 32-value step of a row is one 64-byte line of a tile. Steps are written whole, zeros
// past N (an odd K's padding value included): the next GEMM multiplies them by B's zero rows,
// and a NaN left there by the buffer's last owner would spread into the row's sums. The last
// tile of rows also writes the zero rows that pad M to a multiple of 16, as pack_a_tiles
// does: the tile kernel computes those rows (and never stores them) from defined values.
MMFAST_BF16_TARGET void bias_gelu_tiles(const PackedGemm& g, const Tile& t, const float* acc) {
  static_assert(kChunk == kAmxTileDepth, "a chunk of a row is one step of an A tile");
  constexpr int64_t kTile = kAmxTileRows * kAmxTileDepth;
  const GeluForm gelu(g.tanh_form);
  const bool last = t.m0 + t.rows == g.m;
  const int64_t rows = last ? ceil_div(t.rows, kAmxTileRows) * kAmxTileRows : t.rows;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = t.m0 + i;
    BF16* tile_row =
        g.out + (r / kAmxTileRows) * g.ldo * kAmxTileRows + (r % kAmxTileRows) * kAmxTileDepth;
    BF16* pre = g.out2 == nullptr || i >= t.rows ? nullptr : g.out2 + r * g.ldo2 + t.n0;
    for (int64_t c = 0; c < t.cols; c += kChunk) {
      const int64_t n = std::min(kChunk, t.cols - c);
      __m512i v = _mm512_setzero_si512();
      if (i < t.rows) {
        fVec lo, hi;
        load_biased(g, t, acc, i, c, n, lo, hi);
        round_bf16(lo, hi);
        if (pre != nullptr) store_bf16(pre + c, n, lo, hi);
        v = _mm512_maskz_mov_epi16(first_lanes(n), to_bf16(gelu(lo), gelu(hi)));
      }
      _mm512_storeu_si512(tile_row + (t.n0 + c) / kAmxTileDepth * kTile, v);
    }
  }
}

// acc becomes the gradient tile and act the activation tile (both float32, stride kPackCols).
MMFAST_BF16_TARGET void gelu_grad_rows(const PackedGemm& g, const Tile& t, float* acc,
                                       float* act) {
  // The tile's rows of h (128 bytes each, a row of h apart) miss every cache (their loads
  // cost ~5% of this GEMM in a timing script); fetched kPrefetchRows ahead, their latency
  // overlaps the work. (Fetched earlier, while the tile's last pass over K ran, they made
  // SigLIP's training step 0.6-1.5% slower in A/B timings.)
  constexpr int64_t kPrefetchRows = 8;
  const auto prefetch_h = [&](int64_t i) {
    prefetch_span(g.h + (t.m0 + i) * g.ldh + t.n0, t.cols * sizeof(BF16));
  };
  for (int64_t i = 0; i < std::min(kPrefetchRows, t.rows); ++i) prefetch_h(i);
  float colsum[kPackCols] = {};
  const GeluForm gelu(g.tanh_form);
  for (int64_t i = 0; i < t.rows; ++i) {
    if (i + kPrefetchRows < t.rows) prefetch_h(i + kPrefetchRows);
    const BF16* h = g.h + (t.m0 + i) * g.ldh + t.n0;
    float* d = acc + i * kPackCols;
    float* a = act + i * kPackCols;
    for (int64_t c = 0; c < t.cols; c += kChunk) {
      const int64_t n = std::min(kChunk, t.cols - c);
      fVec g0, g1, h0, h1, a0, a1, d0, d1;
      load2(d + c, n, g0, g1);
      round_bf16(g0, g1);  // the bfloat16 grad of the activation, as an unfused backward has it
      load2(h + c, n, h0, h1);
      gelu.both(h0, a0, d0);
      gelu.both(h1, a1, d1);
      g0 = g0 * d0;
      g1 = g1 * d1;
      store2(d + c, n, g0, g1);
      if (g.out2 != nullptr) store2(a + c, n, a0, a1);
      if (g.bias_grad != nullptr) accumulate2(colsum + c, n, g0, g1);
    }
  }
  if (g.bias_grad != nullptr) {
    float* dst = g.bias_grad + t.mblock * g.n + t.n0;
    for (int64_t c = 0; c < t.cols; ++c) dst[c] += colsum[c];
  }
}

// Columns [n0, n0 + cols) of B from B^T [N, k] rows (stride ld) into `packed`.
void pack_block_from_nk(const BlockLayout& layout, const BF16* src, int64_t ld, int64_t k,
                        int64_t n0, int64_t cols, BF16* packed) {
  const int64_t k2 = layout.k2, width = layout.width;
  // Rows of B^T viewed as 32-bit pairs are already VNNI pairs: one word transpose per group.
  if (k % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    for (int64_t j = 0; j < cols; j += width) {
      transpose32(src + (n0 + j) * ld, ld / 2, packed + layout.pair(0, j), width,
                  std::min(width, cols - j), k2);
    }
  } else {
    for (int64_t j = 0; j < cols; ++j) {
      const BF16* row = src + (n0 + j) * ld;
      for (int64_t kk = 0; kk < 2 * k2; ++kk) {
        packed[layout.pair(kk / 2, j) + kk % 2] = kk < k ? row[kk] : BF16(0.0f);
      }
    }
  }
  for (int64_t j = cols / width * width; j < kPackCols; j += width) {
    const int64_t from = std::max<int64_t>(cols - j, 0);  // zeros from this word of the group
    for (int64_t r = 0; r < k2; ++r) {
      BF16* row = packed + layout.pair(r, j);
      std::fill(row + 2 * from, row + 2 * width, BF16(0.0f));
    }
  }
}

// Columns [n0, n0 + cols) of B from its rows: row r at src + (rows ? rows[r] : r) * ld, r < k.
void pack_block_from_kn(const BlockLayout& layout, const BF16* src, int64_t ld,
                        const int64_t* rows, int64_t k, int64_t n0, int64_t cols, BF16* packed) {
  const int64_t k2 = layout.k2;
  const auto row = [&](int64_t r) { return src + (rows != nullptr ? rows[r] : r) * ld + n0; };
  // The rows are a row of B apart (10 KiB for a 13B weight), which the hardware prefetcher
  // does not follow: the loads below took ~40% of this function's samples in a profile of
  // LLaVA-1.5-13B's training step. Fetched kPrefetchPairs pairs ahead, their latency overlaps.
  constexpr int64_t kPrefetchPairs = 32;
  const auto prefetch_pair = [&](int64_t r) {
    for (int64_t kk = 2 * r; kk < std::min(2 * r + 2, k); ++kk) {
      prefetch_span(row(kk), cols * sizeof(BF16));
    }
  };
  for (int64_t r = 0; r < std::min(kPrefetchPairs, k2); ++r) prefetch_pair(r);
  for (int64_t r = 0; r < k2; ++r) {
    if (r + kPrefetchPairs < k2) prefetch_pair(r + kPrefetchPairs);
    pack_pair_row(layout, row(2 * r), 2 * r + 1 < k ? row(2 * r + 1) : nullptr, cols, r, packed);
  }
}

void wait_for(const std::atomic<int64_t>& count, int64_t target) {
  while (count.load(std::memory_order_acquire) < target) _mm_pause();
}

// Rows [0, rows) of A (row stride lda, k values) into AMX A tiles: tile (rt, q) of 16 rows x 32
// values at dst + (rt * steps + q) * 512, zeros past k and past `rows` up to a multiple of 16.
void pack_a_tiles(const BF16* a, int64_t lda, int64_t rows, int64_t k, int64_t steps, BF16* dst) {
  constexpr int64_t kTile = kAmxTileRows * kAmxTileDepth;
  const int64_t padded = ceil_div(rows, kAmxTileRows) * kAmxTileRows;
  for (int64_t r = 0; r < padded; ++r) {
    BF16* row = dst + (r / kAmxTileRows) * steps * kTile + (r % kAmxTileRows) * kAmxTileDepth;
    for (int64_t q = 0; q < steps; ++q) {
      const int64_t n = r < rows ? std::min(kAmxTileDepth, k - q * kAmxTileDepth) : 0;
      const __mmask32 mask = first_lanes(n);
      _mm512_storeu_si512(row + q * kTile,
                          _mm512_maskz_loadu_epi16(mask, a + r * lda + q * kAmxTileDepth));
    }
  }
}

// Rows [m0, m0 + rows) of A = gelu(h)^T into AMX A tiles laid out as pack_a_tiles lays them
// out: A[i][t] = bf16(gelu(h[t * ldh + m0 + i])), zeros past `tokens` and past `rows` up to a
// multiple of 16. Each tile is 32 tokens x 16 units of h taken through the GELU in float32 (the
// value an unfused backward's bfloat16 activation has) and transposed into 16 rows of 32.
MMFAST_BF16_TARGET void pack_a_tiles_gelu_t(const BF16* h, int64_t ldh, int64_t tokens,
                                            int64_t m0, int64_t rows, int64_t steps,
                                            bool tanh_form, BF16* dst) {
  constexpr int64_t kTile = kAmxTileRows * kAmxTileDepth;
  const GeluForm gelu(tanh_form);
  alignas(64) float act[kAmxTileDepth * kAmxTileRows];  // [token][unit]
  alignas(64) float t[kAmxTileRows * kAmxTileDepth];    // [unit][token]
  const int64_t groups = ceil_div(rows, kAmxTileRows);
  for (int64_t q = 0; q < steps; ++q) {
    for (int64_t rt = 0; rt < groups; ++rt) {
      const int64_t units = std::min(kAmxTileRows, rows - rt * kAmxTileRows);
      const __mmask16 mask = static_cast<__mmask16>((1u << units) - 1);
      const BF16* src = h + m0 + rt * kAmxTileRows;
      for (int64_t kk = 0; kk < kAmxTileDepth; ++kk) {
        const int64_t token = q * kAmxTileDepth + kk;
        __m512 v = _mm512_setzero_ps();
        if (token < tokens) v = gelu(widen_bf16(_mm256_maskz_loadu_epi16(mask, src + token * ldh)));
        _mm512_store_ps(act + kk * kAmxTileRows, v);
      }
      transpose32(act, kAmxTileRows, t, kAmxTileDepth, kAmxTileDepth, kAmxTileRows);
      BF16* tile = dst + (rt * steps + q) * kTile;
      for (int64_t r = 0; r < kAmxTileRows; ++r) {
        store_bf16(tile + r * kAmxTileDepth, kAmxTileDepth,
                   fVec::loadu(t + r * kAmxTileDepth), fVec::loadu(t + r * kAmxTileDepth + 16));
      }
    }
  }
}

// The epilogue of tile t from its accumulator acc (act, scratch: kGemmRows x kPackCols floats
// of room, for kGeluGradT and the transposed stores).
MMFAST_BF16_TARGET void epilogue(const PackedGemm& g, const Tile& t, float* acc, float* act,
                                 float* scratch) {
  switch (g.epilogue) {
    case GemmEpilogue::kStore: store_rows(g, t, acc); break;
    case GemmEpilogue::kStoreT:
      store_transposed(acc, t.rows, t.cols, g.out + t.n0 * g.ldo + t.m0, g.ldo, scratch);
      break;
    case GemmEpilogue::kBiasGelu: bias_gelu_rows(g, t, acc); break;
    case GemmEpilogue::kBiasGeluTiles: bias_gelu_tiles(g, t, acc); break;
    case GemmEpilogue::kGeluGradT:
      gelu_grad_rows(g, t, acc, act);
      if (g.out != nullptr) {
        store_transposed(acc, t.rows, t.cols, g.out + t.n0 * g.ldo + t.m0, g.ldo, scratch);
      }
      if (g.out2 != nullptr) {
        store_transposed(act, t.rows, t.cols, g.out2 + t.n0 * g.ldo2 + t.m0, g.ldo2, scratch);
      }
      break;
  }
}

}  // namespace

void packed_gemm_bf16(const PackedGemm& g, GemmQueue* queue, int64_t threads) {
  TORCH_INTERNAL_ASSERT(queue->amx || !(g.a_gelu_t || g.a_tiled ||
                                        g.epilogue == GemmEpilogue::kBiasGeluTiles),
                        "a_gelu_t, a_tiled and kBiasGeluTiles need the AMX tiles");
  const int64_t mblocks = ceil_div(g.m, kGemmRows), nblocks = ceil_div(g.n, kPackCols);
  const bool amx = queue->amx;
  // Column blocks per compute item, and the items' column groups of that many blocks.
  const int64_t width = amx ? amx_item_blocks(g, threads) : 1;
  const int64_t groups = ceil_div(nblocks, width);
  const bool transposed =
      g.epilogue == GemmEpilogue::kStoreT || g.epilogue == GemmEpilogue::kGeluGradT;
  // The tile kernels load and store these by whole cache lines (aligned_array.h).
  const auto packed_block =
      aligned_array<BF16>(g.b_packed == nullptr ? width * g.k * kPackCols : 0);
  const auto acc_tile = zeroed_array<float>(width * kGemmRows * kPackCols);
  const auto act_tile =
      zeroed_array<float>(g.epilogue == GemmEpilogue::kGeluGradT ? kGemmRows * kPackCols : 0);
  const auto scratch_tile = zeroed_array<float>(transposed ? kPackCols * kGemmRows : 0);
  BF16* packed = packed_block.get();
  float* acc = acc_tile.get();
  // Work items are (panel of A rows, column group of `width` blocks of B), panel-major: the
  // threads work on the same panel (<= kPanelBytes of A, read from L3 once per group) at a
  // time, and A comes from memory once. Without panels an A larger than L3 (LLaVA's 8 images:
  // 4608 x 4096) was streamed from memory once per column block: the forward ran 4-7% slower
  // (timing script). With AMX tiles each panel's items are preceded by items that pack its A
  // tiles.
  const int64_t panel_tiles = gemm_panel_tiles(g);
  const int64_t npanels = gemm_panels(g);
  // The last `threads` groups of the last panel are split into one item per tile: the threads
  // then finish within about a tile of each other rather than a whole group (a block of w2
  // over SigLIP's 729 tokens is 1.6 ms of work), at the price of packing those blocks once per
  // tile. libgomp's waiting fell from 1.3% to 0.6% of the 13B forward's samples (with the
  // overlapped panels of forward_packed), the SigLIP forward gained ~0.4% in A/B timings.
  const int64_t last_tiles = mblocks - (npanels - 1) * panel_tiles;
  const int64_t tail_groups = last_tiles > 1 ? std::min<int64_t>(groups, threads) : 0;
  const BlockLayout layout{amx, g.k / 2};
  const bool pack_a = amx && !g.a_tiled;
  const int64_t pack_items = pack_a ? panel_tiles : 0;  // per whole panel
  const int64_t panel_items = pack_items + groups;
  const int64_t last_begin = (npanels - 1) * panel_items;
  const int64_t last_packs = pack_a ? last_tiles : 0;
  const int64_t last_whole = groups - tail_groups;
  const auto compute_items = [&](int64_t p) {
    return p + 1 < npanels ? groups : last_whole + tail_groups * last_tiles;
  };
  const int64_t items = last_begin + last_packs + compute_items(npanels - 1);
  const int64_t a_tile_elems = kGemmRows * queue->a_steps * kAmxTileDepth;
  for (int64_t item; (item = queue->next.fetch_add(1)) < items;) {
    const int64_t panel = std::min(item / panel_items, npanels - 1);
    const int64_t local = item - panel * panel_items;
    const int64_t packs = panel + 1 < npanels ? pack_items : last_packs;
    BF16* a_panel = pack_a ? queue->a_panels[panel % queue->a_buffers].get() : nullptr;
    const BF16* a_tiles = g.a_tiled ? g.a + panel * panel_tiles * a_tile_elems : a_panel;
    if (local < packs) {
      // The buffer last held panel - a_buffers, whose items were all taken before this one.
      const int64_t previous = panel - queue->a_buffers;
      if (previous >= 0) wait_for(queue->done_items[previous], compute_items(previous));
      const int64_t m0 = (panel * panel_tiles + local) * kGemmRows;
      const int64_t rows = std::min(kGemmRows, g.m - m0);
      if (g.a_gelu_t) {
        pack_a_tiles_gelu_t(g.a, g.lda, g.b_k, m0, rows, queue->a_steps, g.tanh_form,
                            a_panel + local * a_tile_elems);
      } else {
        // A's values past b_k (an odd K's padding column) meet B's zero row: packed as zeros
        // rather than read, A need not have that column zeroed (first_layer_backward).
        pack_a_tiles(g.a + m0 * g.lda, g.lda, rows, g.b_k, queue->a_steps,
                     a_panel + local * a_tile_elems);
      }
      queue->packed_tiles[panel].fetch_add(1, std::memory_order_release);
      continue;
    }
    const int64_t c = local - packs;
    int64_t group, mblock_begin, mblock_end;
    if (panel + 1 < npanels || c < last_whole) {
      group = c;
      mblock_begin = panel * panel_tiles;
      mblock_end = std::min(mblocks, mblock_begin + panel_tiles);
    } else {
      group = last_whole + (c - last_whole) / last_tiles;
      mblock_begin = panel * panel_tiles + (c - last_whole) % last_tiles;
      mblock_end = mblock_begin + 1;
    }
    if (amx) wait_for(queue->packed_tiles[panel], packs);
    const int64_t nb0 = group * width, blocks = std::min(width, nblocks - nb0);
    const int64_t block_elems = g.k * kPackCols;  // a packed block, here and in b_packed
    const BF16* block = g.b_packed != nullptr ? g.b_packed + nb0 * block_elems : packed;
    for (int64_t b = 0; b < blocks && g.b_packed == nullptr; ++b) {
      const int64_t n0 = (nb0 + b) * kPackCols, cols = std::min(kPackCols, g.n - n0);
      if (g.b_nk) {
        pack_block_from_nk(layout, g.b, g.ldb, g.b_k, n0, cols, packed + b * block_elems);
      } else {
        pack_block_from_kn(layout, g.b, g.ldb, g.b_rows, g.b_k, n0, cols,
                           packed + b * block_elems);
      }
    }
    constexpr int64_t kAccElems = kGemmRows * kPackCols;  // one block's accumulator tile
    for (int64_t mblock = mblock_begin; mblock < mblock_end; ++mblock) {
      const int64_t m0 = mblock * kGemmRows, rows = std::min(kGemmRows, g.m - m0);
      for (int64_t k0 = 0; k0 < g.k; k0 += kDepth) {
        const int64_t k2 = std::min(kDepth, g.k - k0) / 2;
        if (amx) {
          amx_tile(rows, k2,
                   a_tiles + (mblock - panel * panel_tiles) * a_tile_elems +
                       k0 / kAmxTileDepth * kAmxTileRows * kAmxTileDepth,
                   queue->a_steps, block + layout.pair(k0 / 2, 0),
                   layout.pair(0, kAmxGroupCols), blocks, block_elems, acc, kAccElems, k0 > 0);
        } else {
          vnni_tile(rows, k2, g.a + m0 * g.lda + k0, g.lda, block + k0 * kPackCols, acc,
                    k0 > 0);
        }
      }
      for (int64_t b = 0; b < blocks; ++b) {
        Tile t;
        t.mblock = mblock;
        t.m0 = m0;
        t.rows = rows;
        t.n0 = (nb0 + b) * kPackCols;
        t.cols = std::min(kPackCols, g.n - t.n0);
        epilogue(g, t, acc + b * kAccElems, act_tile.get(), scratch_tile.get());
      }
    }
    if (amx) queue->done_items[panel].fetch_add(1, std::memory_order_release);
  }
}

void pack_b_rows_bf16(const BF16* b, int64_t ldb, int64_t b_k, int64_t k, int64_t n,
                      bool amx_layout, int64_t pair_begin, int64_t pair_end, BF16* packed) {
  const BlockLayout layout{amx_layout, k / 2};
  const int64_t nblocks = ceil_div(n, kPackCols);
  // By runs of 16 pair rows (32 rows of B, 16 KiB each at 4096 columns, still in L2 when the
  // next block reads them): each AMX group then gets 1 KiB in a row rather than one line every
  // k / 2 * 64 bytes. A 4096 x 4096 B packed in 2.2-3.4 ms this way, 6-6.8 ms pair row by pair
  // row over all blocks with 16 columns per step (micro-benchmark, 2 threads).
  constexpr int64_t kRun = 16;
  for (int64_t r0 = pair_begin; r0 < pair_end; r0 += kRun) {
    const int64_t r1 = std::min(pair_end, r0 + kRun);
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      const int64_t n0 = nb * kPackCols;
      for (int64_t r = r0; r < r1; ++r) {
        const BF16* first = b + 2 * r * ldb + n0;
        const BF16* second = 2 * r + 1 < b_k ? first + ldb : nullptr;
        pack_pair_row(layout, first, second, std::min(kPackCols, n - n0), r,
                      packed + nb * k * kPackCols);
      }
    }
  }
}

void pack_b_nk_bf16(const BF16* b, int64_t ldb, int64_t b_k, int64_t k, int64_t n,
                    bool amx_layout, int64_t block_begin, int64_t block_end, BF16* packed) {
  const BlockLayout layout{amx_layout, k / 2};
  for (int64_t nb = block_begin; nb < block_end; ++nb) {
    const int64_t n0 = nb * kPackCols;
    pack_block_from_nk(layout, b, ldb, b_k, n0, std::min(kPackCols, n - n0),
                       packed + nb * k * kPackCols);
  }
}

#else

void pack_b_nk_bf16(const BF16*, int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t,
                    BF16*) {
  TORCH_INTERNAL_ASSERT(false, "pack_b_nk_bf16 runs only in the AVX512 build");
}

void packed_gemm_bf16(const PackedGemm&, GemmQueue*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "packed_gemm_bf16 runs only in the AVX512 build");
}

void pack_b_rows_bf16(const BF16*, int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t,
                      BF16*) {
  TORCH_INTERNAL_ASSERT(false, "pack_b_rows_bf16 runs only in the AVX512 build");
}

#endif

}  // namespace mmfast::cpu::CPU_CAPABILITY
