// bfloat16 GEMMs of the projector on our own tile kernels, with B packed block by block and
// the projector's elementwise work done in the epilogue of each output tile while it is in
// cache. The tile kernel is AMX's (amx_tile.h) on CPUs with AMX-BF16, vdpbf16ps's elsewhere
// (vnni_tile.h: 6 x 64 outputs in registers).
//
// Why not ATen's mm / oneDNN's matmul: on a CPU with avx512_bf16 but no AMX (Zen 4) they ran
// the projector's GEMMs at 385-408 GFLOP/s on 2 threads in a micro-benchmark. oneDNN's brgemm
// ukernel driven over [256 x 64] tiles, each thread's 64-column block of B held in L2, ran at
// 415-430; vnni_tile's loop at 224-232 per core (peak: 234 per core). On an AMX CPU the AMX
// tiles with A packed into tiles beat oneDNN's AMX GEMMs in most suite rows (README).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "common/ceil_div.h"
#include "cpu/aligned_array.h"
#include "cpu/isa.h"

namespace mmfast::cpu {

// One task computes a [kGemmRows, kPackCols] tile of C over the whole of K.
constexpr int64_t kPackCols = 64;
constexpr int64_t kGemmRows = 256;

// Bytes of A per panel: a part of L3 (32 MiB here, shared). In a timing script 4 and 16 MiB
// ran LLaVA-1.5-7B's training step 2-3% slower.
constexpr int64_t kPanelBytes = int64_t(8) << 20;

enum class GemmEpilogue : int {
  // out[row(m), n] = acc + bias[n]; row(m) = out_rows[m] (null: m)
  kStore,
  // out[n, m] = acc (C written transposed)
  kStoreT,
  // v = bf16(acc + bias[n]); out[m, n] = gelu(v); out2[m, n] = v (when out2). The activation is
  // taken of the rounded pre-activation, the value the backward sees.
  kBiasGelu,
  // d = bf16(acc) * gelu'(h[m, n]); out[n, m] = d (when out); out2[n, m] = gelu(h[m, n]) (when
  // out2); bias_grad[m / kGemmRows, n] = sum over the tile's rows of d (float32, when not null).
  kGeluGradT,
  // kBiasGelu with the activation written as AMX A tiles (PackedGemm::a_tiled's layout, ldo
  // its lda; zeros past N, and in the last row tile's rows past M): the next GEMM's A
  // operand as its tile kernel reads it, with no [M, N] activation and no packing pass. AMX
  // tiles only.
  kBiasGeluTiles,
};

// C [M, N] = A [M, K] B [K, N], then the epilogue. K is even: callers pad an odd K with a zero
// column of A (B's missing row is packed as zeros; the AMX tiles do not read that column).
struct PackedGemm {
  int64_t m = 0, n = 0, k = 0;
  const c10::BFloat16* a = nullptr;  // [M, K], row stride lda
  int64_t lda = 0;
  // A given transposed, with the GELU (tanh_form) applied as its tiles are packed: A[i][t] =
  // gelu(a[t * lda + i]) for t < b_k, zeros past b_k (a: the pre-activation h [tokens, M],
  // whose activation the GEMM then reads without an [M, tokens] copy). AMX tiles only.
  bool a_gelu_t = false;
  // A given as AMX A tiles rather than rows (the kBiasGeluTiles epilogue writes them): the
  // 16-row x 32-value tile (rt, q) of A's rows [16 rt, 16 rt + 16) and values [32 q, 32 q + 32)
  // at a + (rt * steps + q) * 512, steps = ceil(k / 32), zeros past k and past M in the last
  // row tile; lda = 32 steps. AMX tiles only.
  bool a_tiled = false;
  // B, given either as B^T [N, b_k] (a weight as stored: b_nk) or as rows [b_k, N] (row r at
  // b + b_rows[r] * ldb; b_rows null: r). b_k is k or k - 1.
  const c10::BFloat16* b = nullptr;
  int64_t ldb = 0;
  int64_t b_k = 0;
  bool b_nk = false;
  const int64_t* b_rows = nullptr;
  GemmEpilogue epilogue = GemmEpilogue::kStore;
  const c10::BFloat16* bias = nullptr;  // [N] or null
  c10::BFloat16* out = nullptr;         // row stride ldo
  int64_t ldo = 0;
  const int64_t* out_rows = nullptr;    // [M] (kStore) or null
  c10::BFloat16* out2 = nullptr;        // row stride ldo2
  int64_t ldo2 = 0;
  const c10::BFloat16* h = nullptr;     // [M, N] (kGeluGradT), row stride ldh
  int64_t ldh = 0;
  float* bias_grad = nullptr;           // [ceil(M / kGemmRows), N] (kGeluGradT) or null
  bool tanh_form = false;
  // B packed ahead by pack_b_rows_bf16 or pack_b_nk_bf16 in the layout of the tile kernel
  // that runs (block nb at b_packed + nb * k * kPackCols), or null:
  // then each work item packs its block itself.
  const c10::BFloat16* b_packed = nullptr;
};

// Tiles of kGemmRows rows per panel of A (<= kPanelBytes, at least one tile).
inline int64_t gemm_panel_tiles(const PackedGemm& g) {
  const int64_t row_elems = g.a_gelu_t || g.a_tiled ? g.k : g.lda;
  return std::max<int64_t>(1, kPanelBytes / (row_elems * 2 * kGemmRows));
}

// Panels of A rows the GEMM walks (packed_gemm_bf16); each packs every block of B once.
inline int64_t gemm_panels(const PackedGemm& g) {
  return ceil_div(ceil_div(g.m, kGemmRows), gemm_panel_tiles(g));
}

// Elements of B packed whole for g (the b_packed layout).
inline int64_t packed_b_numel(const PackedGemm& g) {
  return ceil_div(g.n, kPackCols) * kPackCols * g.k;
}

// AMX's A tiles are 16 rows x 32 values (1 KiB). Read in place, a tile's 16 rows are a row of A
// apart, 8 KiB for the projector's 4096-wide activations, which maps them to one L1 set; copied
// into consecutive bytes they load without those misses.
constexpr int64_t kAmxTileRows = 16;
constexpr int64_t kAmxTileDepth = 32;
// Columns of a B tile: a packed block is 4 groups of them in the AMX layout (packed_gemm.cpp).
constexpr int64_t kAmxGroupCols = 16;

// Panels of A from which the AMX tiles pack A into two buffers in turn; with fewer, into one.
// A second buffer lets a thread pack panel p + 1 while the other still computes panel p: it
// saves a wait of at most one work item per panel boundary (<= ~0.7 ms on 2 threads), and costs
// a panel (up to kPanelBytes) held through the GEMM. With two panels (one boundary) that
// buffer was the backward's largest transient at InternVL's shapes: every phase of the
// training step held one.
constexpr int64_t kDoubleBufferPanels = 3;

// Column blocks per work item on AMX tiles (at most; amx_item_blocks). The tile kernel
// multiplies each 32-row strip of A by all the item's blocks in turn: the strip comes from L3
// once per item and from L2 for the other blocks, where an item of one block streams all of A
// from L3 for every 64 columns of C. In a micro-benchmark (one thread, A of 1024-2048 rows
// from L3, K = 1024 and 4096) items of 1, 2 and 4 blocks ran 840-926, 996-1151 and
// 1042-1306 GFLOP/s; in the projector (same process, alternating) 2 blocks ran best: bf16
// forward SigLIP 20.5 / 18.3 / 18.8 ms, InternVL 76.8 / 67.3 / 70.3, training step SigLIP
// 82.3 / 74.4 / 74.8. With 4, the items that end a GEMM one tile each pack twice as much B.
constexpr int64_t kAmxItemBlocks = 2;

// Blocks per AMX work item for g: kAmxItemBlocks, halved while that leaves a panel fewer than
// 4 items per thread (the threads would then wait longer for each other at the end).
inline int64_t amx_item_blocks(const PackedGemm& g, int64_t threads) {
  const int64_t nblocks = ceil_div(g.n, kPackCols);
  int64_t blocks = kAmxItemBlocks;
  while (blocks > 1 && ceil_div(nblocks, blocks) < 4 * threads) blocks /= 2;
  return blocks;
}

// The shared state of one GEMM's work items (packed_gemm_bf16), made before the parallel region.
// With AMX tiles the threads also pack each panel of A into tiles (into a_buffers buffers in
// turn) as work items of their own, and count per panel the A tiles packed and the compute
// items done.
struct GemmQueue {
  explicit GemmQueue(const PackedGemm& g, bool amx_tiles);
  std::atomic<int64_t> next{0};
  bool amx = false;
  int64_t a_steps = 0;  // K steps of kAmxTileDepth, the last one zero-padded
  // A-panel buffers in a_panels: 1, or 2 from kDoubleBufferPanels on; none for an A given
  // as tiles (a_tiled)
  int64_t a_buffers = 0;
  AlignedArray<c10::BFloat16> a_panels[2];  // tiles loaded whole: on cache lines
  std::unique_ptr<std::atomic<int64_t>[]> packed_tiles, done_items;  // per panel
};

inline GemmQueue::GemmQueue(const PackedGemm& g, bool amx_tiles)
    : amx(amx_tiles && g.m > 0 && g.n > 0) {
  if (!amx) return;
  a_steps = ceil_div(g.k, kAmxTileDepth);
  const int64_t panels = gemm_panels(g);
  // A panel holds at most the tiles A has (SigLIP's act: 3 of the 4 that 8 MiB would hold).
  const int64_t tiles = std::min(gemm_panel_tiles(g), ceil_div(g.m, kGemmRows));
  const int64_t panel_elems = tiles * kGemmRows * a_steps * kAmxTileDepth;
  a_buffers = g.a_tiled ? 0 : panels >= kDoubleBufferPanels ? 2 : 1;
  for (int64_t b = 0; b < a_buffers; ++b) {
    a_panels[b] = aligned_array<c10::BFloat16>(panel_elems);
  }
  packed_tiles.reset(new std::atomic<int64_t>[panels]());  // zeros
  done_items.reset(new std::atomic<int64_t>[panels]());
}

}  // namespace mmfast::cpu

// Every one of the `threads` threads of a parallel region calls this. A thread takes a work
// item (a panel of A's rows and a group of 64-column blocks of B, one block or on AMX tiles
// amx_item_blocks; in the last panel, the last `threads` groups go one tile at a time) from the
// shared counter `queue->next`, packs the blocks into the VNNI layout its tile kernel reads
// (K x 128 bytes each, which then stay in its L2; the AMX tiles' layout keeps each B tile in
// one piece: BlockLayout in packed_gemm.cpp) and computes the item's tiles, until no item is
// left. Packing inside the GEMM saves a pass over B through memory. With AMX tiles
// (queue->amx) a panel's items come after one item per 256-row tile that packs A into AMX
// tiles; an item waits only for items taken before it, so the threads cannot deadlock.
// Implemented in the AVX512 build only (the others assert).
MMFAST_DECLARE_ISA_KERNEL(
    void packed_gemm_bf16(const ::mmfast::cpu::PackedGemm& g, ::mmfast::cpu::GemmQueue* queue,
                          int64_t threads))

// Column blocks [block_begin, block_end) of B given as B^T [n, b_k] (a weight as stored, row
// stride ldb; b_k is k or k - 1, the missing row packed as zeros) into `packed` (the b_packed
// layout; amx_layout: the AMX tiles' block layout, else the vdpbf16ps tiles'): packed weights
// made once for many forwards.
MMFAST_DECLARE_ISA_KERNEL(
    void pack_b_nk_bf16(const c10::BFloat16* b, int64_t ldb, int64_t b_k, int64_t k, int64_t n,
                        bool amx_layout, int64_t block_begin, int64_t block_end,
                        c10::BFloat16* packed))

// Row pairs [pair_begin, pair_end) of B [b_k, n] (row stride ldb; b_k is k or k - 1, the
// missing row packed as zeros) into every column block of `packed` (the b_packed layout,
// amx_layout as for pack_b_nk_bf16), reading B's rows in order. For a row-major B that several
// panels of A would each pack column block by column block, 64 columns of every row at a time.
MMFAST_DECLARE_ISA_KERNEL(
    void pack_b_rows_bf16(const c10::BFloat16* b, int64_t ldb, int64_t b_k, int64_t k, int64_t n,
                          bool amx_layout, int64_t pair_begin, int64_t pair_end,
                          c10::BFloat16* packed))
