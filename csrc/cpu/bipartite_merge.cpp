// CPU kernels of mmfast::bipartite_merge and mmfast::bipartite_merge_backward (ToMe bipartite
// soft matching + size-weighted merge).
//
// Forward, per sample: (1) inverse L2 norms of the metric rows (non-finite rows are an error);
// (2) for tiles of kTileA A tokens, bfloat16 brgemm calls fill a strip of approximate scores
// (a . b) / |b| against every B token, and the few B tokens near each row's maximum are
// re-scored exactly in float32 (see best_matches): the A x B matrix never exists; (3) the r
// best A tokens by (score desc, index asc); (4) every output row is the size-weighted mean of
// its group, summed in a fixed order (the row's own token, then its merged A tokens by index):
// deterministic whatever the thread count.
//
// Norms scale the dot products afterwards, so the choice of merged tokens differs from an
// exact (float64) computation only by the float32 rounding of one dot product per pair.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "common/bipartite_merge.h"
#include "cpu/vec/token_merge.h"

namespace mmfast::cpu {

namespace {

constexpr int64_t kTileA = 64;  // A tokens per GEMM tile: rows of the float32 strip

double element_as_double(at::ScalarType dtype, const char* row, int64_t c) {
  switch (dtype) {
    case at::kHalf: return static_cast<float>(reinterpret_cast<const c10::Half*>(row)[c]);
    case at::kBFloat16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[c]);
    default: return reinterpret_cast<const float*>(row)[c];
  }
}

// Per metric row: inv_norm = 1 / |m| (0 for a zero row, whose similarity is then 0 to all)
// and, when the GEMM needs a bfloat16 copy, that copy (m16, K padded to even) and
// rho = |m - bfloat16(m)| / |m|, the relative size of its rounding (bounds the GEMM's error).
struct PreparedMetric {
  at::Tensor inv_norm;  // [B, N] float32
  at::Tensor rho;       // [B, N] float32 (zeros without a copy)
  at::Tensor m16;       // [B, N, K + K % 2] bfloat16, or undefined: the GEMM reads the metric
};

PreparedMetric prepare_metric(const at::Tensor& metric, bool copy_bf16) {
  const int64_t bsz = metric.size(0), n = metric.size(1), cm = metric.size(2);
  const int64_t kp = cm + cm % 2;
  PreparedMetric out;
  out.inv_norm = at::empty({bsz, n}, metric.options().dtype(at::kFloat));
  out.rho = at::zeros({bsz, n}, metric.options().dtype(at::kFloat));
  if (copy_bf16) out.m16 = at::empty({bsz, n, kp}, metric.options().dtype(at::kBFloat16));
  float* inv = out.inv_norm.mutable_data_ptr<float>();
  float* rho = out.rho.mutable_data_ptr<float>();
  auto* m16 = copy_bf16 ? out.m16.mutable_data_ptr<at::BFloat16>() : nullptr;
  const auto dtype = metric.scalar_type();
  const char* base = static_cast<const char*>(metric.const_data_ptr());
  const int64_t esize = metric.element_size();
  const auto sumsq = MMFAST_PICK_ISA(row_sumsq_to_bf16);
  at::parallel_for(0, bsz * n, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n, i = t % n;
      const char* row = base + (b * metric.stride(0) + i * metric.stride(1)) * esize;
      at::BFloat16* dst = m16 ? m16 + t * kp : nullptr;
      float residual = 0.0f;
      double ss = sumsq(dtype, row, cm, dst, &residual);
      if (!std::isfinite(ss)) {
        // Either a NaN/Inf value, or float32 overflow of the sum: tell them apart in double.
        ss = 0.0;
        for (int64_t c = 0; c < cm; ++c) {
          const double v = element_as_double(dtype, row, c);
          TORCH_CHECK_VALUE(std::isfinite(v), "bipartite_merge: metric has a non-finite value "
                            "at [", b, ", ", i, ", ", c, "]; similarities would be NaN");
          ss += v * v;
        }
      }
      if (dst && kp > cm) dst[cm] = at::BFloat16(0.0f);
      inv[t] = ss > 0.0 ? static_cast<float>(1.0 / std::sqrt(ss)) : 0.0f;
      // 1% slack covers the rounding of rho itself; an overflowed residual (values beyond
      // bfloat16's range) gives rho = inf, which makes every B token a candidate.
      if (dst && ss > 0.0) rho[t] = static_cast<float>(1.01 * std::sqrt(residual / ss));
    }
  });
  return out;
}

// bfloat16 GEMM operands laid out for brgemm: A rows [B, Na, K] (row stride lda) and B as
// VNNI pairs [B, K/2, Nb, 2]; K is even (zero padded).
struct SimilarityOperands {
  at::Tensor a;
  at::Tensor bt;
  int64_t k;
};

// b [B, Nb, K] bfloat16, viewed as rows of K/2 32-bit pairs, transposed to [B, K/2, Nb, 2]:
// the VNNI layout.
at::Tensor vnni_pack(const at::Tensor& b) {
  const int64_t bsz = b.size(0), nb = b.size(1), words = b.size(2) / 2;
  auto bt = at::empty({bsz, words, nb, 2}, b.options());
  const auto transpose = MMFAST_PICK_ISA(transpose32);
  const char* src = static_cast<const char*>(b.const_data_ptr());
  char* dst = static_cast<char*>(bt.mutable_data_ptr());
  constexpr int64_t kRows = 64;  // rows of b per task
  const int64_t blocks = (nb + kRows - 1) / kRows;
  at::parallel_for(0, bsz * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / blocks, r0 = (t % blocks) * kRows;
      transpose(src + (i * b.stride(0) + r0 * b.stride(1)) * 2, b.stride(1) / 2,
                dst + (i * words * nb + r0) * 4, nb, std::min(kRows, nb - r0), words);
    }
  });
  return bt;
}

SimilarityOperands pack_operands(const at::Tensor& metric, const PreparedMetric& prep) {
  const int64_t n = metric.size(1);
  // float32/float16 metrics were rounded to bfloat16 for the GEMM (its products are then
  // exact, and it runs at twice the float32 rate); best_matches re-scores the near-best
  // candidates exactly, so the rounding never changes the result.
  const at::Tensor& m16 = prep.m16.defined() ? prep.m16 : metric;
  auto a = m16.slice(1, 0, n, 2);  // [B, Na, K]
  auto b = m16.slice(1, 1, n, 2);  // [B, Nb, K]
  return {a, vnni_pack(b), a.size(2)};
}

// The GEMM reads a bfloat16 metric in place when its rows already pair up for VNNI.
bool needs_bf16_copy(const at::Tensor& metric) {
  return metric.scalar_type() != at::kBFloat16 || metric.size(2) % 2 != 0 ||
         metric.stride(2) != 1 || metric.stride(1) % 2 != 0 ||
         reinterpret_cast<uintptr_t>(metric.const_data_ptr()) % 4 != 0;
}

// Bound, in units of |a| (the score s_j = a . b_j / |b_j| of an A row a), on |s~_j - s_j| +
// |s^_j - s_j|: s~ from the GEMM on bfloat16 rows (relative rounding rho_a, rho_b), s^ the
// exact float32 re-score. With a = a~ + da, |a . b - a~ . b~| <= |da||b| + |a~||db| gives
// rho_a + rho_b + rho_a rho_b; each float32 sum of k products adds gamma_k (1 + rho)^2; the
// float32 scalings by the inverse norms add a few units of 2^-24.
double score_error_bound(int64_t k, double rho_a, double rho_b) {
  const double gamma = 1.01 * static_cast<double>(k + 2) * std::ldexp(1.0, -24);
  const double rounding = rho_a + rho_b + rho_a * rho_b;
  return rounding + gamma * (1.0 + rho_a) * (1.0 + rho_b) + gamma + std::ldexp(1.0, -20);
}

constexpr int64_t kStripCols = 256;

// node_max[b, i] = max_j cos(a_i, b_j), node_idx[b, i] = the first j reaching it.
//
// Per tile of kTileA A tokens, one bfloat16 GEMM fills a strip [kTileA, Nb] of approximate
// scores s~_j = (a . b_j)~ / |b_j| (a strip per tile, never the A x B matrix). With e the
// error bound of s~ and of the exact float32 score s, every j whose s~_j is within 2e|a| of
// the strip's maximum is re-scored exactly (a float32 dot of the metric rows as given); the
// best of those, lowest index on ties, is the argmax of s over all j. Exact scores depend
// only on the two rows, so equal rows give equal scores wherever they sit in a tile.
void best_matches(const at::Tensor& metric, const PreparedMetric& prep, float* node_max,
                  int64_t* node_idx, bool protect_first) {
  const at::Tensor& inv_norm = prep.inv_norm;
  const int64_t bsz = metric.size(0), n = metric.size(1), cm = metric.size(2);
  const int64_t na = (n + 1) / 2, nb = n / 2;
  const float* inv = inv_norm.const_data_ptr<float>();
  if (nb == 0 || cm == 0) {  // no partner, or all similarities 0
    std::fill(node_max, node_max + bsz * na, nb == 0 ? -INFINITY : 0.0f);
    std::fill(node_idx, node_idx + bsz * na, 0);
  } else {
    const auto ops = pack_operands(metric, prep);
    const auto rho = prep.rho.const_data_ptr<float>();
    const auto rho_b_max = std::get<0>(prep.rho.slice(1, 1, n, 2).max(1));  // [B]
    const auto inv_b_all = inv_norm.slice(1, 1, n, 2).contiguous();  // [B, Nb]
    const int64_t tiles = (na + kTileA - 1) / kTileA;
    const auto dot = MMFAST_PICK_ISA(row_dot);
    const auto scale_max = MMFAST_PICK_ISA(scale_and_max);
    const auto at_least = MMFAST_PICK_ISA(indices_at_least);
    const auto dtype = metric.scalar_type();
    const int64_t esize = metric.element_size();
    const char* mbase = static_cast<const char*>(metric.const_data_ptr());
    at::parallel_for(0, bsz * tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> strip(kTileA * nb);
      std::vector<int64_t> candidates(nb);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / tiles, i0 = (t % tiles) * kTileA;
        const int64_t m = std::min(kTileA, na - i0);
        const float* inv_b = inv_b_all.const_data_ptr<float>() + b * nb;
        const auto* a16 = ops.a.const_data_ptr<at::BFloat16>() + b * ops.a.stride(0) +
                          i0 * ops.a.stride(1);
        const auto* bt16 = ops.bt.const_data_ptr<at::BFloat16>() + b * ops.bt.stride(0);
        for (int64_t j0 = 0; j0 < nb; j0 += kStripCols) {
          at::native::cpublas::brgemm(m, std::min(kStripCols, nb - j0), ops.k, ops.a.stride(1),
                                      nb, nb, false, a16, bt16 + j0 * 2, strip.data() + j0,
                                      true);
        }
        const char* mb = mbase + b * metric.stride(0) * esize;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t tok_a = 2 * (i0 + i);
          const float inv_a = inv[b * n + tok_a];
          float* s = strip.data() + i * nb;
          float best = -INFINITY;
          int64_t arg = 0;
          if (inv_a > 0.0f) {  // a zero row scores 0 everywhere: arg 0
            const float top = scale_max(s, inv_b, nb);
            // j can still be the best if s~_j >= top - 2 e |a| (each side off by at most e).
            const double e = score_error_bound(cm, rho[b * n + tok_a],
                                               rho_b_max.const_data_ptr<float>()[b]);
            const float floor = static_cast<float>(top - 2.0 * e / inv_a);
            int64_t count;
            if (std::isnan(floor) || floor == -INFINITY) {  // no usable bound: re-score all
              std::iota(candidates.begin(), candidates.end(), 0);
              count = nb;
            } else {
              count = at_least(s, nb, floor, candidates.data());
            }
            const char* row_a = mb + tok_a * metric.stride(1) * esize;
            for (int64_t c = 0; c < count; ++c) {
              const int64_t j = candidates[c];
              const char* row_b = mb + (2 * j + 1) * metric.stride(1) * esize;
              const float exact = dot(dtype, row_a, row_b, cm) * inv_b[j];
              if (exact > best) {  // strict, in index order: the lowest index wins a tie
                best = exact;
                arg = j;
              }
            }
          } else {
            best = 0.0f;
          }
          node_max[b * na + i0 + i] = best * inv_a;
          node_idx[b * na + i0 + i] = arg;
        }
      }
      at::native::cpublas::brgemm_release(true);
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
  const auto metric = metric_in.stride(2) == 1 ? metric_in : metric_in.contiguous();
  const auto xc = x.stride(2) == 1 ? x : x.contiguous();
  const auto sizes = size.has_value() ? size->to(at::kFloat).contiguous() : at::Tensor();

  // (1) + (2): the best B match of every A token. Non-finite metric rows are an error even
  // when r == 0, so that the op's contract does not depend on r.
  const auto prep = prepare_metric(metric, r > 0 && needs_bf16_copy(metric));
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
      std::partial_sort(order.begin(), order.begin() + r, order.end(),
                        [&](int64_t p, int64_t q) {
                          return score[p] > score[q] || (score[p] == score[q] && p < q);
                        });
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
  const auto scale = MMFAST_PICK_ISA(scale_row);
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
      if (count == 1) {  // a token that merged with nothing is copied exactly
        scale(dtype, xb + tokens[0] * xc.stride(1) * esize, 1.0f, out_row, c);
      } else {
        wsum(dtype, xb, xc.stride(1), tokens, weights.data(), count, 1.0f / total, acc.data(),
             out_row, c);
      }
    }
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
