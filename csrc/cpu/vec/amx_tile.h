// vnni_tile's product on AMX tiles (Intel Xeon from Sapphire Rapids on):
//
//   acc[i][j] (+)= sum_{p < k2} A[i][2p] B[2p][j] + A[i][2p+1] B[2p+1][j],   j < 64,
//   packed[j / 16][p][j % 16][e] = B[2p + e][j]   (groups of 16 columns, group_stride apart),
//
// in float32. A packed block of B is already AMX's B layout: 16 pair rows of a group are a
// tile of 1 KiB in one piece. Each 32 x 32 piece of C is four accumulator tiles
// (tmm0-3) fed by two A tiles (tmm4-5) and two B tiles (tmm6-7). A is read from a copy packed
// into tiles: read in place, a tile's 16 rows sit a row of A apart (8 KiB for a 4096-wide
// activation, all in one L1 set); in a micro-benchmark the copy ran 632 GFLOP/s per core
// against 466 in place. No software prefetch: with the tiles on cache lines
// (aligned_array.h), fetching A and B two steps ahead into L1 made the GEMMs slower (same
// process, SigLIP bf16 forward 21.8 ms against 19.8 without; a [256 x 64] x 1024
// micro-benchmark from L2: 1326 against 1644 GFLOP/s per core). The tiles are read in address
// order, which the hardware prefetchers follow. Included by the AVX512 build of packed_gemm
// only, which runs it where bf16_gemm_amx() holds (the process then has the tile state from Linux).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

namespace mmfast::cpu::CPU_CAPABILITY {

#define MMFAST_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes (packed A's zero rows stand in for a partial row tile).
MMFAST_AMX_TARGET inline void amx_configure() {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// Packed blocks of B (64 columns each) one call of amx_tile takes at most: a work item's
// column blocks (kAmxItemBlocks in packed_gemm.h).
constexpr int64_t kAmxMaxBlocks = 2;

// K steps (32 values each) of a chunk: amx_tile runs a 32-row strip of A against all its
// blocks one chunk of K at a time, so that the strip's chunk (2 x 16 tiles, 32 KiB) is read
// from L2 for the first 32 columns and from L1 (48 KiB) for the other 96; the B tiles are
// loaded with the streaming hint (TILELOADDT1) so that they do not push it out. Each chunk
// costs a store and a reload of the four accumulator tiles. Operand bandwidth is what bounds
// these tiles here: a step's four tile loads (4 KiB) feed four products, which the tile unit
// finishes in about the time L2 delivers those 4 KiB. In a micro-benchmark (2 threads, B
// packed ahead, A from L3) the GEMMs of 729 x 4096 x 4096, 1792 x 4096 x 4096 and
// 4608 x 1024 x 4096 ran 2035-2156 / 2110-2126 / 2501-2561 GFLOP/s over all of K, and
// 2163-2310 / 2280-2304 / 2639-2713 in chunks of 16 (chunks of 8, 12, 20, 24 between; 16
// without the streaming hint below all of K). Same process, rounds alternating: bf16 forward
// of SigLIP and InternVL 4-5% faster, LLaVA-1.5-7B 3%, SigLIP's training step 1.5%.
constexpr int64_t kAmxChunkSteps = 16;

// For each of `blocks` packed blocks b (at packed + b * block_stride, its accumulator acc_b at
// acc + b * acc_stride): acc_b [ceil16(rows), 64] (+)= A x block b, A packed into tiles
// (pack_a_tiles in packed_gemm.cpp): tile (rt, q) of 16 rows x 32 values at
// ap + (rt * a_steps + q) * 512, zero past `rows` and past 2 k2 values. Each 32-row strip of A
// is multiplied by every block in turn, chunk of K by chunk (kAmxChunkSteps), so that it
// comes from L3 once per call (kAmxItemBlocks) and from L1 for most of the other blocks.
MMFAST_AMX_TARGET inline void amx_tile(
    int64_t rows, int64_t k2, const c10::BFloat16* ap, int64_t a_steps,  // ap: tiles of A
    const c10::BFloat16* packed, int64_t group_stride,  // per block: 4 groups of [k2, 16, 2]
    int64_t blocks, int64_t block_stride,
    float* acc, int64_t acc_stride, bool accumulate) {  // per block: [ceil16(rows), 64]
  constexpr int64_t kTile = 16 * 32;
  constexpr int64_t kGroups = 4;
  const int64_t kc = k2 / 16, kt = k2 % 16;
  // The last partial tile of each group, zero-padded to 16 pair rows.
  alignas(64) c10::BFloat16 b_tail[kAmxMaxBlocks * kGroups][kTile];
  if (kt > 0) {
    std::memset(b_tail, 0, blocks * kGroups * sizeof(b_tail[0]));
    for (int64_t b = 0; b < blocks; ++b) {
      for (int g = 0; g < kGroups; ++g) {
        const c10::BFloat16* last = packed + b * block_stride + g * group_stride + kc * kTile;
        std::memcpy(b_tail[b * kGroups + g], last, kt * 32 * sizeof(c10::BFloat16));
      }
    }
  }
  amx_configure();
  constexpr int64_t kStrideC = 64 * sizeof(float);
  constexpr int64_t kStrideB = 64;
  const int64_t steps = kc + (kt > 0 ? 1 : 0);
  for (int64_t i0 = 0; i0 < rows; i0 += 32) {
    const bool two = rows - i0 > 16;
    const c10::BFloat16* a0 = ap + (i0 / 16) * a_steps * kTile;
    const c10::BFloat16* a1 = a0 + a_steps * kTile;
    for (int64_t q0 = 0; q0 < steps; q0 += kAmxChunkSteps) {
      const int64_t q1 = std::min(steps, q0 + kAmxChunkSteps);
      const bool load_c = accumulate || q0 > 0;
      for (int64_t jq = 0; jq < 64 * blocks; jq += 32) {
        const int64_t b = jq / 64, jh = jq % 64;
        float* c = acc + b * acc_stride + i0 * 64 + jh;
        if (load_c) {
          _tile_loadd(0, c, kStrideC);
          _tile_loadd(1, c + 16, kStrideC);
          if (two) {
            _tile_loadd(2, c + 16 * 64, kStrideC);
            _tile_loadd(3, c + 16 * 64 + 16, kStrideC);
          }
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        const int64_t g = jh / 16;  // groups g, g + 1
        const c10::BFloat16* b0 = packed + b * block_stride + g * group_stride;
        const c10::BFloat16* b1 = b0 + group_stride;
        const c10::BFloat16* t0 = b_tail[b * kGroups + g];
        const c10::BFloat16* t1 = b_tail[b * kGroups + g + 1];
        for (int64_t q = q0; q < q1; ++q) {
          const bool tail = q == kc;
          _tile_loadd(4, a0 + q * kTile, 64);
          _tile_stream_loadd(6, tail ? t0 : b0 + q * kTile, kStrideB);
          _tile_stream_loadd(7, tail ? t1 : b1 + q * kTile, kStrideB);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, a1 + q * kTile, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c, kStrideC);
        _tile_stored(1, c + 16, kStrideC);
        if (two) {
          _tile_stored(2, c + 16 * 64, kStrideC);
          _tile_stored(3, c + 16 * 64 + 16, kStrideC);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
