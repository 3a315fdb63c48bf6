// Tile loops of cross_attention / key_attention_mass, one build per ISA (raw pointers only; the
// tensor-level code in csrc/cpu/cross_attention.cpp prepares the layouts and the block summaries
// and runs these on every thread). Each loop takes tasks from a shared counter until none is
// left: tasks cost very different amounts once masked blocks are skipped, so a static split
// would leave one core idle. Every task writes its own outputs only, so results do not depend on
// which thread ran which task (deterministic).
#pragma once

#include <c10/core/ScalarType.h>

#include <atomic>
#include <cstdint>

#include "cpu/isa.h"

namespace mmfast::cpu {

// What the keys of one key block allow, summarized once per call (see classify_block).
struct KeyBlockSummary {
  float lo;        // smallest key code among the block's attendable keys
  float hi;        // largest
  bool any_valid;  // some key of the block may be attended by some query
  bool all_valid;  // every key of the block is attendable (no padding, no tail past kv_len)
};

// Per-element rule, on float codes prepared by the caller:
//   immediate: key j allowed for query i  iff kcode[j] == qcode[i]  (kcode -1 = never)
//   otherwise: key j allowed for query i  iff kcode[j] <= qcode[i]  (kcode +inf = never)
// Without media masks the codes are 0 for real keys and queries, +inf for padding keys.
struct XattnProblem {
  c10::ScalarType dtype;
  int64_t B, Lq, Lk, Hq, Hk, D;
  float scale;
  bool immediate;
  int64_t block_m, block_n;    // query tile rows, key block columns
  const float* qcode;          // [B, Lq]
  const float* kcode;          // [B, Lk]
  const float* q_tile_lo;      // [B, n_q_tiles] min / max of qcode over each query tile
  const float* q_tile_hi;
  const KeyBlockSummary* kblk; // [B, n_k_blocks]
  // Inputs, last dim contiguous; strides in elements (batch, token, head).
  const void* q; int64_t q_sb, q_sl, q_sh;
  const void* k; int64_t k_sb, k_sl, k_sh;
  const void* v; int64_t v_sb, v_sl, v_sh;
};

struct XattnForwardArgs {
  XattnProblem p;
  int64_t tiles_per_task;      // consecutive query tiles of one (batch, head) per task
  bool with_values;            // false: only lse (key_attention_mass's first pass)
  void* out;                   // [B, Lq, Hq, D] contiguous, input dtype
  float* lse;                  // [B, Hq, Lq]
  // bfloat16 q, k, v: tile GEMMs on bfloat16 operands (K and V packed into the VNNI layout,
  // probabilities rounded to bfloat16 for P V) through brgemm, which runs on AMX where the
  // CPU has it, instead of float32 GEMMs on widened copies. Needs D, the key and value row
  // strides even and k, v 4-byte aligned (the caller checks); AVX512 build only.
  bool bf16_brgemm = false;
};

// Backward: p holds q, k, v in their own dtype; out and dout share it, as do dq, dk, dv.
struct XattnBackwardArgs {
  XattnProblem p;
  const void* out; int64_t o_sb, o_sl, o_sh;       // [B, Lq, Hq, D] forward output
  const void* dout; int64_t do_sb, do_sl, do_sh;   // [B, Lq, Hq, D]
  const float* lse;            // [B, Hq, Lq]
  const float* grad_lse;       // [B, Hq, Lq], null when lse got no gradient
  void* dq;                    // [B, Lq, Hq, D] contiguous
  void* dk;                    // [B, Lk, Hk, D] contiguous
  void* dv;
};

struct XattnMassArgs {
  XattnProblem p;
  const void* qt;              // [B, Hq, D, Lq]
  const float* lse;            // [B, Hq, Lq]
  float* mass;                 // [B, Lk]
};

}  // namespace mmfast::cpu

// One pass over a [B, L, H, D] input (any float dtype, strides in elements, last dim contiguous),
// tasks (b, h): widened to float32 rows `rows` [B, L, H, D] (null: not wanted) and float32
// transposed `cols` [B, H, D, L] (the transposed operand of the tile GEMMs: brgemm takes no
// transpose flag).
namespace mmfast::cpu {
struct XattnWidenArgs {
  c10::ScalarType dtype;
  const void* src; int64_t B, L, H, D, sb, sl, sh;
  float* rows;
  float* cols;
};
}  // namespace mmfast::cpu
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_widen_tasks(const ::mmfast::cpu::XattnWidenArgs& a, std::atomic<int64_t>* next_task))
// Tasks (b, hq, query tile).
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_forward_tasks(const ::mmfast::cpu::XattnForwardArgs& a,
                             std::atomic<int64_t>* next_task))
// Tasks (b, hk): dq of the group's query heads, dk and dv (see backward_impl).
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_backward_tasks(const ::mmfast::cpu::XattnBackwardArgs& a,
                              std::atomic<int64_t>* next_task))
// Tasks (b, key block): mass of each key, summed over all query heads and query tiles in order.
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_mass_tasks(const ::mmfast::cpu::XattnMassArgs& a, std::atomic<int64_t>* next_task))
