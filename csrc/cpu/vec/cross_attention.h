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
  const void* kt;              // [B, Hk, D, Lk] K transposed (backward only; null in forward)
};

struct XattnForwardArgs {
  XattnProblem p;
  bool with_values;            // false: only lse (key_attention_mass's first pass)
  void* out;                   // [B, Lq, Hq, D] contiguous, input dtype
  float* lse;                  // [B, Hq, Lq]
};

// Backward inputs are float32 (widened by xattn_widen_tasks); dq/dk/dv in out_dtype.
struct XattnBackwardArgs {
  XattnProblem p;
  const void* vt;              // [B, Hk, D, Lk] V transposed
  const void* qt;              // [B, Hq, D, Lq] Q transposed
  const void* dout;            // [B, Lq, Hq, D] contiguous
  const void* doutt;           // [B, Hq, D, Lq] dout transposed
  const float* lse;            // [B, Hq, Lq]
  const float* delta;          // [B, Hq, Lq] rowsum(dout * out) - grad_lse
  c10::ScalarType out_dtype;   // of dq, dk, dv
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
// transpose flag). With `other` (same shape and dtype, e.g. out for dout) also
// delta[b, h, l] = sum_d src * other - grad_lse[b, h, l] (grad_lse may be null), float32.
namespace mmfast::cpu {
struct XattnWidenArgs {
  c10::ScalarType dtype;
  const void* src; int64_t B, L, H, D, sb, sl, sh;
  float* rows;
  float* cols;
  const void* other; int64_t ob, ol, oh;
  const float* grad_lse;
  float* delta;
};
}  // namespace mmfast::cpu
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_widen_tasks(const ::mmfast::cpu::XattnWidenArgs& a, std::atomic<int64_t>* next_task))
// Tasks (b, hq, query tile).
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_forward_tasks(const ::mmfast::cpu::XattnForwardArgs& a,
                             std::atomic<int64_t>* next_task))
// Tasks (b, hq, query tile): dq.
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_backward_dq_tasks(const ::mmfast::cpu::XattnBackwardArgs& a,
                                 std::atomic<int64_t>* next_task))
// Tasks (b, hk, key block): dk and dv, summed over the query heads of the group in order.
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_backward_dkdv_tasks(const ::mmfast::cpu::XattnBackwardArgs& a,
                                   std::atomic<int64_t>* next_task))
// Tasks (b, key block): mass of each key, summed over all query heads and query tiles in order.
MMFAST_DECLARE_ISA_KERNEL(
    void xattn_mass_tasks(const ::mmfast::cpu::XattnMassArgs& a, std::atomic<int64_t>* next_task))
