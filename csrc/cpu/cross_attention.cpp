// CPU kernels of mmfast::cross_attention, cross_attention_backward and key_attention_mass.
// This file prepares layouts and the per-call mask summaries (codes per token, min/max per query
// tile and key block), then runs the per-ISA tile loops of csrc/cpu/vec/cross_attention.cpp on
// every thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/ceil_div.h"
#include "common/cross_attention.h"
#include "cpu/vec/cross_attention.h"

namespace mmfast::cpu {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Media ids are compared as float codes: exact up to 2^24.
constexpr int64_t kMaxMedia = int64_t{1} << 24;

// Query tile rows. 64 rows keep S, P and the output accumulator of one task in L2 and still give
// B * H * Lq / 64 tasks to spread over the threads.
constexpr int64_t kBlockM = 64;
// Key block columns. With media masks, 64: Flamingo resamples each image to 64 latents, so
// blocks follow image boundaries and skipping is exact. Without, fewer and larger GEMM calls
// (each call has a fixed cost) and fewer output rescalings: up to 256 keys, up to 512 for the
// bfloat16 brgemm forward (AMX), whose calls cost more than the float32 GEMMs' at equal work.
int64_t key_block(bool media, int64_t Lk, bool bf16_brgemm) {
  return media ? 64 : std::clamp<int64_t>(Lk, 64, bf16_brgemm ? 512 : 256);
}

// Last dim contiguous and rows at least D apart (what the tile GEMMs read); anything else is
// copied once.
at::Tensor gemm_ready(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && (t.size(1) <= 1 || t.stride(1) >= t.size(3));
  return ok ? t : t.contiguous();
}

int64_t row_stride(const at::Tensor& t) { return t.size(1) <= 1 ? t.size(3) : t.stride(1); }

// Runs work(next_task) on every thread of ATen's pool; the threads share one task counter.
template <typename F>
void run_tasks(const F& work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { work(&next); });
}

// A [B, L, H, D] input widened to float32 in one pass: rows [B, L, H, D] (when wanted) and the
// transposed [B, H, D, L] operand of the tile GEMMs. ATen's strided copy of a permuted view is
// several times slower than this.
struct Widened {
  at::Tensor rows, cols;
};

Widened widen(const at::Tensor& t_in, bool want_rows) {
  const auto t = gemm_ready(t_in);
  const int64_t B = t.size(0), L = t.size(1), H = t.size(2), D = t.size(3);
  const auto f32 = t.options().dtype(at::kFloat);
  Widened w;
  // A float32 input that is already contiguous is its own rows: no copy.
  const bool own_rows = want_rows && t.scalar_type() == at::kFloat && t.is_contiguous();
  w.rows = own_rows ? t : want_rows ? at::empty({B, L, H, D}, f32) : at::Tensor();
  w.cols = at::empty({B, H, D, L}, f32);
  const XattnWidenArgs a{t.scalar_type(), t.const_data_ptr(), B, L, H, D, t.stride(0),
                         row_stride(t), t.stride(2),
                         want_rows && !own_rows ? w.rows.mutable_data_ptr<float>() : nullptr,
                         w.cols.mutable_data_ptr<float>()};
  if (t.numel() == 0) return w;
  run_tasks([&](std::atomic<int64_t>* next) { MMFAST_PICK_ISA(xattn_widen_tasks)(a, next); });
  return w;
}

std::vector<int64_t> as_int64(const at::Tensor& t) {
  const auto c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

// The mask of one call as float codes per token plus summaries per query tile and key block
// (see XattnProblem for the rule).
struct MaskPlan {
  bool immediate = false;
  int64_t block_n = 64;
  std::vector<float> qcode, kcode, q_lo, q_hi;
  std::vector<KeyBlockSummary> kblk;
};

MaskPlan plan_mask(const char* op, int64_t B, int64_t Lq, int64_t Lk, bool immediate,
                   const std::optional<at::Tensor>& kv_lens,
                   const std::optional<at::Tensor>& q_media,
                   const std::optional<at::Tensor>& kv_media, bool bf16_brgemm = false) {
  MaskPlan m;
  const bool media = q_media.has_value();
  m.immediate = media && immediate;
  m.block_n = key_block(media, Lk, bf16_brgemm);
  const int64_t block_n = m.block_n;
  m.qcode.assign(B * Lq, 0.f);
  m.kcode.assign(B * Lk, 0.f);
  std::vector<int64_t> lens(B, Lk);
  if (kv_lens.has_value()) {
    lens = as_int64(*kv_lens);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= Lk, op, ": kv_lens[", b, "] = ", lens[b],
                        " is out of range [0, ", Lk, "]");
    }
  }
  if (media) {
    const auto qm = as_int64(*q_media), km = as_int64(*kv_media);
    for (int64_t i = 0; i < B * Lq; ++i) {
      TORCH_CHECK_VALUE(qm[i] >= 0 && qm[i] < kMaxMedia, op, ": q_media values must be in [0, ",
                        kMaxMedia, "), got ", qm[i]);
      m.qcode[i] = static_cast<float>(qm[i]);
    }
    for (int64_t i = 0; i < B * Lk; ++i) {
      TORCH_CHECK_VALUE(km[i] >= 0 && km[i] < kMaxMedia, op, ": kv_media values must be in [0, ",
                        kMaxMedia, "), got ", km[i]);
      m.kcode[i] = static_cast<float>(km[i]);
    }
  }
  const float never = m.immediate ? -1.f : kInf;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < Lk; ++j) {
      float& c = m.kcode[b * Lk + j];
      if (j >= lens[b] || (media && c == 0.f)) c = never;
    }
  }
  const int64_t nqt = ceil_div(Lq, kBlockM), nkb = ceil_div(Lk, block_n);
  m.q_lo.assign(B * nqt, 0.f);
  m.q_hi.assign(B * nqt, 0.f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < nqt; ++t) {
      float lo = kInf, hi = -kInf;
      for (int64_t i = t * kBlockM; i < std::min(Lq, (t + 1) * kBlockM); ++i) {
        lo = std::min(lo, m.qcode[b * Lq + i]);
        hi = std::max(hi, m.qcode[b * Lq + i]);
      }
      m.q_lo[b * nqt + t] = lo;
      m.q_hi[b * nqt + t] = hi;
    }
  }
  m.kblk.assign(B * nkb, KeyBlockSummary{kInf, -kInf, false, true});
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      KeyBlockSummary& s = m.kblk[b * nkb + kb];
      for (int64_t j = kb * block_n; j < std::min(Lk, (kb + 1) * block_n); ++j) {
        const float c = m.kcode[b * Lk + j];
        if (c == never) {
          s.all_valid = false;
          continue;
        }
        s.any_valid = true;
        s.lo = std::min(s.lo, c);
        s.hi = std::max(s.hi, c);
      }
    }
  }
  return m;
}

XattnProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                          const MaskPlan& m, double scale) {
  XattnProblem p{};
  p.dtype = q.scalar_type();
  p.B = q.size(0); p.Lq = q.size(1); p.Hq = q.size(2); p.D = q.size(3);
  p.Lk = k.size(1); p.Hk = k.size(2);
  p.scale = static_cast<float>(scale);
  p.immediate = m.immediate;
  p.block_m = kBlockM;
  p.block_n = m.block_n;
  p.qcode = m.qcode.data(); p.kcode = m.kcode.data();
  p.q_tile_lo = m.q_lo.data(); p.q_tile_hi = m.q_hi.data();
  p.kblk = m.kblk.data();
  p.q = q.const_data_ptr(); p.q_sb = q.stride(0); p.q_sl = row_stride(q); p.q_sh = q.stride(2);
  p.k = k.const_data_ptr(); p.k_sb = k.stride(0); p.k_sl = row_stride(k); p.k_sh = k.stride(2);
  if (v != nullptr) {
    p.v = v->const_data_ptr(); p.v_sb = v->stride(0); p.v_sl = row_stride(*v); p.v_sh = v->stride(2);
  }
  return p;
}

// Query tiles per forward task. Without media masks every query tile of a (batch, head) reads
// every key block, so one task runs several and transposes (widens) each key block once for
// all of them: as many as leave 4 tasks per thread, at most 8 (their accumulators stay in L2).
// With media masks tiles mostly read different blocks, and small tasks balance better.
int64_t forward_tiles_per_task(const XattnProblem& p, bool media) {
  if (media) return 1;
  const int64_t nqt = ceil_div(p.Lq, p.block_m), heads = p.B * p.Hq;
  const int64_t want = 4 * at::get_num_threads();
  int64_t g = 1;
  while (g < std::min<int64_t>(nqt, 8) && heads * ceil_div(nqt, 2 * g) >= want) g *= 2;
  return g;
}

double resolve_scale(std::optional<double> scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& q_media,
    const std::optional<at::Tensor>& kv_media, c10::string_view media_mode,
    std::optional<double> scale) {
  const char* op = "cross_attention";
  const bool immediate = check_cross_attention_args(op, q_in, k_in, v_in, kv_lens, q_media,
                                                    kv_media, media_mode);
  const auto q = gemm_ready(q_in), k = gemm_ready(k_in), v = gemm_ready(v_in);
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3), Lk = k.size(1);
  // The brgemm forward reads K's rows as 32-bit pairs: D, K's strides and start even.
  const bool bf16_brgemm =
      q.scalar_type() == at::kBFloat16 && xattn_bf16_brgemm() && D % 2 == 0 &&
      row_stride(k) % 2 == 0 && k.stride(0) % 2 == 0 && k.stride(2) % 2 == 0 &&
      reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 4 == 0;
  const MaskPlan m = plan_mask(op, B, Lq, Lk, immediate, kv_lens, q_media, kv_media, bf16_brgemm);
  auto out = at::empty({B, Lq, Hq, D}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-kInf)};
  const XattnProblem p = make_problem(q, k, &v, m, resolve_scale(scale, D));
  XattnForwardArgs a{p, forward_tiles_per_task(p, q_media.has_value()), true,
                     out.mutable_data_ptr(), lse.mutable_data_ptr<float>()};
  a.bf16_brgemm = bf16_brgemm;
  run_tasks([&](std::atomic<int64_t>* next) { MMFAST_PICK_ISA(xattn_forward_tasks)(a, next); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& q_media,
    const std::optional<at::Tensor>& kv_media, c10::string_view media_mode, double scale) {
  const char* op = "cross_attention_backward";
  const bool immediate = check_cross_attention_args(op, q_in, k_in, v_in, kv_lens, q_media,
                                                    kv_media, media_mode);
  TORCH_CHECK_VALUE(grad_out.sizes() == q_in.sizes() && grad_out.scalar_type() == q_in.scalar_type(),
                    op, ": grad_out must match q in shape and dtype, got ", grad_out.sizes(), " ",
                    grad_out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == q_in.sizes() && out.scalar_type() == q_in.scalar_type(), op,
                    ": out must match q in shape and dtype, got ", out.sizes());
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({B, Hq, Lq}) && lse.scalar_type() == at::kFloat,
                    op, ": lse must be float32 [B, Hq, Lq], got ", lse.sizes(), " ", lse.scalar_type());
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), op, ": grad_lse must have the shape of lse ",
                      lse.sizes(), ", got ", grad_lse->sizes());
  }
  const int64_t Lk = k_in.size(1), Hk = k_in.size(2);
  auto dq = at::empty({B, Lq, Hq, D}, q_in.options());
  auto dk = at::empty({B, Lk, Hk, D}, q_in.options());
  auto dv = at::empty({B, Lk, Hk, D}, q_in.options());
  if (q_in.numel() == 0 || k_in.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const MaskPlan m = plan_mask(op, B, Lq, Lk, immediate, kv_lens, q_media, kv_media);
  const auto q = gemm_ready(q_in), k = gemm_ready(k_in), v = gemm_ready(v_in);
  const auto o = gemm_ready(out), dout = gemm_ready(grad_out);
  const auto lse_c = lse.contiguous();
  at::Tensor glse;
  if (grad_lse.has_value()) glse = grad_lse->to(at::kFloat).contiguous();
  const XattnBackwardArgs a{make_problem(q, k, &v, m, scale),
                            o.const_data_ptr(), o.stride(0), row_stride(o), o.stride(2),
                            dout.const_data_ptr(), dout.stride(0), row_stride(dout),
                            dout.stride(2), lse_c.const_data_ptr<float>(),
                            glse.defined() ? glse.const_data_ptr<float>() : nullptr,
                            dq.mutable_data_ptr(), dk.mutable_data_ptr(), dv.mutable_data_ptr()};
  run_tasks([&](std::atomic<int64_t>* next) { MMFAST_PICK_ISA(xattn_backward_tasks)(a, next); });
  return {dq, dk, dv};
}

at::Tensor key_attention_mass_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                  const std::optional<at::Tensor>& kv_lens,
                                  const std::optional<at::Tensor>& q_media,
                                  const std::optional<at::Tensor>& kv_media,
                                  c10::string_view media_mode, std::optional<double> scale) {
  const char* op = "key_attention_mass";
  const bool immediate = check_cross_attention_args(op, q_in, k_in, std::nullopt, kv_lens, q_media,
                                                    kv_media, media_mode);
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Lk = k_in.size(1);
  const MaskPlan m = plan_mask(op, B, Lq, Lk, immediate, kv_lens, q_media, kv_media);
  auto mass = at::empty({B, Lk}, q_in.options().dtype(at::kFloat));
  if (q_in.numel() == 0 || k_in.numel() == 0) return mass.zero_();
  auto lse = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  // float32 operands, as in the backward.
  const Widened q = widen(q_in, true), k = widen(k_in, true);
  const auto& qt = q.cols;
  XattnProblem p = make_problem(q.rows, k.rows, nullptr, m, resolve_scale(scale, D));
  p.dtype = at::kFloat;
  // Two passes: the row statistics (lse) first, then per key block the probabilities it gets.
  const XattnForwardArgs stats{p, forward_tiles_per_task(p, q_media.has_value()), false,
                               nullptr, lse.mutable_data_ptr<float>()};
  run_tasks([&](std::atomic<int64_t>* next) { MMFAST_PICK_ISA(xattn_forward_tasks)(stats, next); });
  const XattnMassArgs a{p, qt.const_data_ptr(), lse.const_data_ptr<float>(),
                        mass.mutable_data_ptr<float>()};
  run_tasks([&](std::atomic<int64_t>* next) { MMFAST_PICK_ISA(xattn_mass_tasks)(a, next); });
  return mass;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cross_attention", &cross_attention_cpu);
  m.impl("cross_attention_backward", &cross_attention_backward_cpu);
  m.impl("key_attention_mass", &key_attention_mass_cpu);
}

}  // namespace mmfast::cpu
