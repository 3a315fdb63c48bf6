// cross_attention / key_attention_mass tile loops (flash-style), compiled once per ISA.
//
// Forward, per task (b, h, query tile of M rows), over the key blocks the tile may attend:
//   S = Q Kᵀ (tile GEMM)  ->  masked, scaled, online softmax in float32  ->  O += P V (GEMM)
// Backward recomputes P from the saved lse: P = exp(S·scale - lse), dS = P ∘ (dP - delta)·scale
// with dP = dO Vᵀ and delta = rowsum(dO ∘ O) - grad_lse; one task per key head computes dq of
// its query heads and dk/dv, so no two tasks write the same output. Tile GEMMs go through ATen's cpublas::brgemm
// (float32 accumulation whatever the input type).
#include "common/ceil_div.h"
#include "cpu/vec/cross_attention.h"
#include "cpu/vec/dispatch.h"
#include "cpu/vec/pair_interleave.h"
#include "cpu/vec/transpose.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace mmfast::cpu::CPU_CAPABILITY {

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Rel { Skip, Full, Partial };

// Whether a query tile with codes in [qlo, qhi] can attend a key block at all (Skip), attends
// every key of it (Full: no per-element mask needed), or needs the per-element rule (Partial).
inline Rel classify(bool immediate, float qlo, float qhi, const KeyBlockSummary& kb) {
  if (!kb.any_valid) return Rel::Skip;
  if (immediate) {
    if (qhi < kb.lo || qlo > kb.hi) return Rel::Skip;
    const bool full = kb.all_valid && qlo == qhi && kb.lo == kb.hi && qlo == kb.lo;
    return full ? Rel::Full : Rel::Partial;
  }
  if (kb.lo > qhi) return Rel::Skip;
  return kb.all_valid && kb.hi <= qlo ? Rel::Full : Rel::Partial;
}

inline bool allowed(bool immediate, float kcode, float qcode) {
  return immediate ? kcode == qcode : kcode <= qcode;
}

inline fVec allowed(bool immediate, const fVec& kcode, const fVec& qcode) {
  return immediate ? (kcode == qcode) : (kcode <= qcode);
}

// C[M, N] (+)= A[M, K] B[K, N], row-major with leading dimensions, float32 accumulation.
// Without packed (VNNI) operands: could_pack() is false on CPUs without AMX, where brgemm runs
// oneDNN/MKL's GEMM on the plain layout.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

inline float hmax(const fVec& v) {
  float buf[W];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < W; ++i) m = std::max(m, buf[i]);
  return m;
}

inline float hsum(const fVec& v) {
  float buf[W];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < W; ++i) s += buf[i];
  return s;
}

// x[0..n) *= a
inline void scale_row(float* x, int64_t n, float a) {
  const fVec va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) (fVec::loadu(x + j) * va).store(x + j);
  if (j < n) (fVec::loadu(x + j, n - j) * va).store(x + j, n - j);
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// One row of the online softmax over a key block. s[0..n) holds raw scores q·k; on return it
// holds p = exp(s·scale - m_new) (0 where masked). kcode is null for a Full block. Updates the
// running max m and sum l; returns the factor alpha by which earlier output must be rescaled.
inline float online_softmax_row(float* s, int64_t n, float scale, const float* kcode, float qcode,
                                bool immediate, float& m, float& l) {
  const fVec vscale(scale), vq(qcode), ninf(-kInf);
  fVec vmax(-kInf);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    fVec x = fVec::loadu(s + j) * vscale;
    if (kcode != nullptr) x = fVec::blendv(ninf, x, allowed(immediate, fVec::loadu(kcode + j), vq));
    x.store(s + j);
    vmax = at::vec::maximum(vmax, x);
  }
  float bmax = hmax(vmax);
  for (; j < n; ++j) {
    float x = s[j] * scale;
    if (kcode != nullptr && !allowed(immediate, kcode[j], qcode)) x = -kInf;
    s[j] = x;
    bmax = std::max(bmax, x);
  }
  const float m_new = std::max(m, bmax);
  if (m_new == -kInf) {  // no allowed key for this row yet: contributes nothing
    std::fill(s, s + n, 0.f);
    return 1.f;
  }
  const float alpha = m == -kInf ? 0.f : std::exp(m - m_new);
  const fVec vm(m_new);
  fVec vsum(0.f);
  j = 0;
  for (; j + W <= n; j += W) {
    const fVec e = (fVec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m_new);
    sum += s[j];
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// One row of recomputed probabilities and their score gradient, vectorized over the row:
//   p = allowed ? exp(s·scale - lse) : 0;   ds = p (dp - delta) scale  (ds written over dp)
// Row form (dq): one query, keys along the row: lse/delta/qcode scalars, kcode a vector.
// Column form (dk/dv, mass): one key, queries along the row: lse/delta/qcode vectors.
// lse is +inf for queries without any allowed key, which makes p exactly 0.
template <bool kColumn>
inline float prob_row(float* s, float* dp, int64_t n, float scale, bool immediate,
                      const float* kcode, float kscalar, const float* qcode, float qscalar,
                      const float* lse, float lse_s, const float* delta, float delta_s) {
  const fVec vscale(scale), zero(0.f);
  fVec vsum(0.f);
  int64_t j = 0;
  auto body = [&](int64_t j, int64_t cnt) {
    const bool full = cnt == W;
    fVec x = full ? fVec::loadu(s + j) : fVec::loadu(s + j, cnt);
    const fVec vl = kColumn ? (full ? fVec::loadu(lse + j) : fVec::loadu(lse + j, cnt)) : fVec(lse_s);
    fVec pv = (x * vscale - vl).exp_u20();
    if (kColumn ? qcode != nullptr : kcode != nullptr) {
      const fVec kc = kColumn ? fVec(kscalar) : (full ? fVec::loadu(kcode + j) : fVec::loadu(kcode + j, cnt));
      const fVec qc = kColumn ? (full ? fVec::loadu(qcode + j) : fVec::loadu(qcode + j, cnt)) : fVec(qscalar);
      pv = fVec::blendv(zero, pv, allowed(immediate, kc, qc));
    }
    if (!full) pv = fVec::set(zero, pv, cnt);  // lanes past the row stay out of the sum
    if (full) pv.store(s + j); else pv.store(s + j, cnt);
    vsum = vsum + pv;
    if (dp != nullptr) {
      const fVec vd = kColumn ? (full ? fVec::loadu(delta + j) : fVec::loadu(delta + j, cnt)) : fVec(delta_s);
      const fVec g = full ? fVec::loadu(dp + j) : fVec::loadu(dp + j, cnt);
      const fVec ds = pv * (g - vd) * vscale;
      if (full) ds.store(dp + j); else ds.store(dp + j, cnt);
    }
  };
  for (; j + W <= n; j += W) body(j, W);
  if (j < n) body(j, n - j);
  return hsum(vsum);
}

template <typename T>
const T* ptr(const void* p) { return static_cast<const T*>(p); }

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in 16 x 16 pieces (ATen's
// in-register transposes on AVX512; its 16-bit versions take at most 32 x 32).
template <typename T>
inline void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
                            int64_t cols) {
  constexpr int64_t TB = 16;
  for (int64_t r = 0; r < rows; r += TB) {
    for (int64_t c = 0; c < cols; c += TB) {
      at::vec::transpose_mxn<T>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst,
                                static_cast<int>(std::min(TB, rows - r)),
                                static_cast<int>(std::min(TB, cols - c)));
    }
  }
}

// Loads rows [rows, cols] of T (leading dimension ld) into float32 dst (leading dimension cols).
template <typename T>
inline void load_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      std::copy(src + r * ld, src + r * ld + cols, dst + r * cols);
    } else {
      at::vec::convert(src + r * ld, dst + r * cols, cols);
    }
  }
}

// rows [N, D] of bfloat16 V (row stride ld) -> packed [ceil(N / 2), D, 2], the VNNI layout of
// P V's B operand: packed[j][d][e] = V[2 j + e][d] (a zero row past N).
inline void pack_rows_vnni(const c10::BFloat16* v, int64_t ld, int64_t N, int64_t D,
                           c10::BFloat16* packed) {
  for (int64_t j = 0; j < N; j += 2) {
    interleave_pair(v + j * ld, j + 1 < N ? v + (j + 1) * ld : nullptr, D, D, packed + j * D);
  }
}

// Storage type T, all tile GEMMs in float32: 16-bit tiles are widened in cache (Q once per
// tile, K and V once per block and task). Without AMX (could_pack() false here) ATen's
// bf16/fp16 brgemm runs well below the float32 GEMM rate, and widening costs a few percent of a
// GEMM. A task runs a.tiles_per_task consecutive query tiles of one (batch, head), so each key
// block is transposed (and widened) once for all of them.
template <typename T>
void forward_impl(const XattnForwardArgs& a, std::atomic<int64_t>* next) {
  const XattnProblem& p = a.p;
  const int64_t BM = p.block_m, BN = p.block_n, D = p.D, G = a.tiles_per_task;
  const int64_t nqt = ceil_div(p.Lq, BM), nkb = ceil_div(p.Lk, BN), ngroups = ceil_div(nqt, G);
  const int64_t group = p.Hq / p.Hk;
  const int64_t ntasks = p.B * p.Hq * ngroups;
  constexpr bool kFloat = std::is_same_v<T, float>;
  std::vector<float> S(BM * BN), O(a.with_values ? G * BM * D : 0), m(G * BM), l(G * BM);
  std::vector<float> orow(D), Kt(D * BN), Qf(kFloat ? 0 : G * BM * D), Vf(kFloat ? 0 : BN * D);
  std::vector<T> KtT(kFloat ? 0 : D * BN);
  // a.bf16_brgemm: Kᵀ and V of the block in the VNNI layout, P rounded to bfloat16 (padded to
  // an even key count: the zero column meets V's zero row).
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const bool vnni = kBf16 && a.bf16_brgemm;
  const int64_t BNe = BN + BN % 2;
  std::vector<T> KtP(vnni ? D * BN : 0), VP(vnni && a.with_values ? BNe * D : 0),
      Pb(vnni && a.with_values ? BM * BNe : 0);
  std::vector<Rel> rel(G);
  std::vector<char> q_loaded(G);
  for (int64_t t; (t = next->fetch_add(1)) < ntasks;) {
    const int64_t tg = t % ngroups, h = (t / ngroups) % p.Hq, b = t / (ngroups * p.Hq);
    const int64_t qt0 = tg * G, tiles = std::min(G, nqt - qt0), hk = h / group;
    const int64_t rows = std::min(tiles * BM, p.Lq - qt0 * BM);
    const T* k = ptr<T>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* v = ptr<T>(p.v) + b * p.v_sb + hk * p.v_sh;
    std::fill(m.begin(), m.begin() + rows, -kInf);
    std::fill(l.begin(), l.begin() + rows, 0.f);
    if (a.with_values) std::fill(O.begin(), O.begin() + rows * D, 0.f);
    std::fill(q_loaded.begin(), q_loaded.end(), 0);  // read for 16-bit inputs only
    for (int64_t kb = 0; kb < nkb; ++kb) {
      bool any = false;
      for (int64_t g = 0; g < tiles; ++g) {
        const int64_t qt = qt0 + g;
        rel[g] = classify(p.immediate, p.q_tile_lo[b * nqt + qt], p.q_tile_hi[b * nqt + qt],
                          p.kblk[b * nkb + kb]);
        any = any || rel[g] != Rel::Skip;
      }
      if (!any) continue;
      const int64_t j0 = kb * BN, N = std::min(BN, p.Lk - j0);
      // Kᵀ of this block, transposed here in cache: a transposed copy of all of K up front
      // would be one more pass over memory, which costs as much as the GEMMs at these sizes.
      const int64_t Ne = N + N % 2;
      if (vnni) {
        // K's rows read as 32-bit pairs and transposed: Kᵀ as [D / 2, N, 2], the VNNI layout.
        transpose32(k + j0 * p.k_sl, p.k_sl / 2, KtP.data(), N, N, D / 2);
        if (a.with_values) {
          pack_rows_vnni(reinterpret_cast<const c10::BFloat16*>(v + j0 * p.v_sl), p.v_sl, N, D,
                         reinterpret_cast<c10::BFloat16*>(VP.data()));
        }
      } else if constexpr (kFloat) {
        transpose_block(k + j0 * p.k_sl, p.k_sl, Kt.data(), BN, N, D);
      } else {
        transpose_block(k + j0 * p.k_sl, p.k_sl, KtT.data(), BN, N, D);
        load_rows(KtT.data(), BN, D, BN, Kt.data());
      }
      const float* vf = reinterpret_cast<const float*>(v + j0 * p.v_sl);
      int64_t ld_v = p.v_sl;
      if constexpr (!kFloat) {
        if (a.with_values && !vnni) {
          load_rows(v + j0 * p.v_sl, p.v_sl, N, D, Vf.data());
          vf = Vf.data();
          ld_v = D;
        }
      }
      for (int64_t g = 0; g < tiles; ++g) {
        if (rel[g] == Rel::Skip) continue;
        const int64_t i0 = (qt0 + g) * BM, M = std::min(BM, p.Lq - i0);
        const T* q = ptr<T>(p.q) + b * p.q_sb + i0 * p.q_sl + h * p.q_sh;
        const float* qf = reinterpret_cast<const float*>(q);
        int64_t ld_q = p.q_sl;
        if (vnni) {
          at::native::cpublas::brgemm(M, N, D, p.q_sl, N, BN, false,
                                      reinterpret_cast<const c10::BFloat16*>(q),
                                      reinterpret_cast<const c10::BFloat16*>(KtP.data()),
                                      S.data(), /*is_vnni=*/true);
        } else {
          if constexpr (!kFloat) {
            qf = Qf.data() + g * BM * D;
            ld_q = D;
            if (!q_loaded[g]) {
              load_rows(q, p.q_sl, M, D, Qf.data() + g * BM * D);
              q_loaded[g] = 1;
            }
          }
          gemm<float>(M, N, D, qf, ld_q, Kt.data(), BN, S.data(), BN, false);
        }
        const float* qc = p.qcode + b * p.Lq + i0;
        const float* kc = rel[g] == Rel::Partial ? p.kcode + b * p.Lk + j0 : nullptr;
        float* Og = O.data() + g * BM * D;
        for (int64_t r = 0; r < M; ++r) {
          float* srow = S.data() + r * BN;
          const float alpha = online_softmax_row(srow, N, p.scale, kc, qc[r], p.immediate,
                                                 m[g * BM + r], l[g * BM + r]);
          if (a.with_values && alpha != 1.f) scale_row(Og + r * D, D, alpha);
        }
        if (a.with_values && vnni) {
          for (int64_t r = 0; r < M; ++r) {
            T* prow = Pb.data() + r * Ne;
            store_row(S.data() + r * BN, prow, N);
            if (Ne > N) prow[N] = T(0.f);
          }
          at::native::cpublas::brgemm(M, D, Ne, Ne, D, D, true,
                                      reinterpret_cast<const c10::BFloat16*>(Pb.data()),
                                      reinterpret_cast<const c10::BFloat16*>(VP.data()), Og,
                                      /*is_vnni=*/true);
        } else if (a.with_values) {
          gemm<float>(M, D, N, S.data(), BN, vf, ld_v, Og, D, true);
        }
      }
    }
    const int64_t i0 = qt0 * BM;
    for (int64_t r = 0; r < rows; ++r) {
      const bool any = l[r] > 0.f;
      a.lse[(b * p.Hq + h) * p.Lq + i0 + r] = any ? m[r] + std::log(l[r]) : -kInf;
      if (!a.with_values) continue;
      T* out = static_cast<T*>(a.out) + ((b * p.Lq + i0 + r) * p.Hq + h) * D;
      if (!any) {
        std::fill(out, out + D, T(0));
        continue;
      }
      std::copy(O.data() + r * D, O.data() + (r + 1) * D, orow.data());
      scale_row(orow.data(), D, 1.f / l[r]);
      store_row(orow.data(), out, D);
    }
  }
  if (vnni) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

// lse of a query tile with -inf (no allowed key) turned into +inf so that exp(s - lse) is 0.
inline void safe_lse(const float* lse, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::isinf(lse[i]) ? kInf : lse[i];
}

// Float32 rows of a [rows, cols] block of T (leading dimension ld): the block itself when T is
// float32 (ld_out = ld), else its copy widened into buf (ld_out = cols).
template <typename T>
inline const float* float_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, float* buf,
                               int64_t& ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    ld_out = ld;
    return src;
  } else {
    load_rows(src, ld, rows, cols, buf);
    ld_out = cols;
    return buf;
  }
}

// delta_r = sum_d dO_rd O_rd - grad_lse_r for the M rows of a query tile (glse may be null):
// d(loss)/d(s_ij) = P_ij (dP_ij - delta_i).
template <typename T>
inline void tile_delta(const float* dout, int64_t ld_do, const T* out, int64_t ld_o, int64_t M,
                       int64_t D, const float* glse, float* orow, float* delta) {
  for (int64_t r = 0; r < M; ++r) {
    const float* o = reinterpret_cast<const float*>(out + r * ld_o);
    if constexpr (!std::is_same_v<T, float>) {
      at::vec::convert(out + r * ld_o, orow, D);
      o = orow;
    }
    const float* g = dout + r * ld_do;
    fVec acc(0.f);
    int64_t d = 0;
    for (; d + W <= D; d += W) acc = at::vec::fmadd(fVec::loadu(g + d), fVec::loadu(o + d), acc);
    float dot = hsum(acc);
    for (; d < D; ++d) dot += g[d] * o[d];
    delta[r] = dot - (glse != nullptr ? glse[r] : 0.f);
  }
}

// Backward, tasks (b, hk). Each (query head of the group, query tile, key block) pair the mask
// allows is visited once, so S and dP are computed once: 5 tile GEMMs per pair, where separate
// dq and dk/dv passes recompute both. The task owns dq of its query heads and dk/dv of its key
// head, so no two tasks write the same output (deterministic without atomics). K, Kᵀ, V and the
// dK/dV accumulators of the task stay in float32 scratch; Q and dO are widened and transposed
// once per query tile, in cache. Tiles are key-major (row n = one key, columns = the queries of
// the tile), so no tile of P or dS is ever transposed:
//   Sᵀ = K Qᵀ,  dPᵀ = V dOᵀ,  dV += Pᵀ dO,  dK += dSᵀ Q,  dQᵀ += Kᵀ dSᵀ.
// The first product into an accumulator overwrites it, so nothing is zero-filled up front; float32
// dK/dV accumulate in dk/dv themselves.
template <typename T>
void backward_impl(const XattnBackwardArgs& a, std::atomic<int64_t>* next) {
  const XattnProblem& p = a.p;
  const int64_t BM = p.block_m, BN = p.block_n, D = p.D, Lq = p.Lq, Lk = p.Lk;
  const int64_t nqt = ceil_div(Lq, BM), nkb = ceil_div(Lk, BN);
  const int64_t group = p.Hq / p.Hk;
  const int64_t ntasks = p.B * p.Hk;
  constexpr bool kFloat = std::is_same_v<T, float>;
  std::vector<float> Kf(kFloat ? 0 : Lk * D), Vf(kFloat ? 0 : Lk * D), Kt(D * Lk);
  std::vector<float> dK(kFloat ? 0 : Lk * D), dV(kFloat ? 0 : Lk * D);
  std::vector<char> kb_written(nkb);
  std::vector<float> Qf(kFloat ? 0 : BM * D), dOf(kFloat ? 0 : BM * D), orow(kFloat ? 0 : D);
  std::vector<float> Qt(D * BM), dOt(D * BM), dQt(D * BM), dQ(kFloat ? 0 : BM * D);
  std::vector<float> St(BN * BM), dPt(BN * BM), lse(BM), delta(BM);
  for (int64_t t; (t = next->fetch_add(1)) < ntasks;) {
    const int64_t hk = t % p.Hk, b = t / p.Hk;
    const T* k = ptr<T>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* v = ptr<T>(p.v) + b * p.v_sb + hk * p.v_sh;
    // 16-bit K and V are widened into Kf / Vf, with rows D apart.
    const float* kf = kFloat ? reinterpret_cast<const float*>(k) : Kf.data();
    const float* vf = kFloat ? reinterpret_cast<const float*>(v) : Vf.data();
    const int64_t ld_k = kFloat ? p.k_sl : D, ld_v = kFloat ? p.v_sl : D;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      if (!p.kblk[b * nkb + kb].any_valid) continue;  // no query attends it: never read
      const int64_t j0 = kb * BN, N = std::min(BN, Lk - j0);
      if constexpr (!kFloat) {
        load_rows(k + j0 * p.k_sl, p.k_sl, N, D, Kf.data() + j0 * D);
        load_rows(v + j0 * p.v_sl, p.v_sl, N, D, Vf.data() + j0 * D);
      }
      transpose_block(kf + j0 * ld_k, ld_k, Kt.data() + j0, Lk, N, D);
    }
    const int64_t kv_row = (b * Lk * p.Hk + hk) * D;  // of key 0 of the task in dk/dv
    float* dk_acc = kFloat ? reinterpret_cast<float*>(a.dk) + kv_row : dK.data();
    float* dv_acc = kFloat ? reinterpret_cast<float*>(a.dv) + kv_row : dV.data();
    const int64_t ld_acc = kFloat ? p.Hk * D : D;
    std::fill(kb_written.begin(), kb_written.end(), 0);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t qt = 0; qt < nqt; ++qt) {
        const int64_t i0 = qt * BM, M = std::min(BM, Lq - i0);
        const float qlo = p.q_tile_lo[b * nqt + qt], qhi = p.q_tile_hi[b * nqt + qt];
        const int64_t row = (b * Lq + i0) * p.Hq + h;  // of the tile's first query in dq
        const float* qf = nullptr;
        const float* dof = nullptr;
        int64_t ld_q = 0, ld_do = 0;
        bool tile_written = false;
        for (int64_t kb = 0; kb < nkb; ++kb) {
          const Rel rel = classify(p.immediate, qlo, qhi, p.kblk[b * nkb + kb]);
          if (rel == Rel::Skip) continue;
          if (qf == nullptr) {  // first allowed block of this tile
            const T* q = ptr<T>(p.q) + b * p.q_sb + i0 * p.q_sl + h * p.q_sh;
            const T* dout = ptr<T>(a.dout) + b * a.do_sb + i0 * a.do_sl + h * a.do_sh;
            const T* out = ptr<T>(a.out) + b * a.o_sb + i0 * a.o_sl + h * a.o_sh;
            qf = float_rows(q, p.q_sl, M, D, Qf.data(), ld_q);
            dof = float_rows(dout, a.do_sl, M, D, dOf.data(), ld_do);
            transpose_block(qf, ld_q, Qt.data(), BM, M, D);
            transpose_block(dof, ld_do, dOt.data(), BM, M, D);
            const int64_t stat = (b * p.Hq + h) * Lq + i0;
            safe_lse(a.lse + stat, M, lse.data());
            tile_delta(dof, ld_do, out, a.o_sl, M, D,
                       a.grad_lse != nullptr ? a.grad_lse + stat : nullptr, orow.data(),
                       delta.data());
          }
          const int64_t j0 = kb * BN, N = std::min(BN, Lk - j0);
          gemm<float>(N, M, D, kf + j0 * ld_k, ld_k, Qt.data(), BM, St.data(), BM, false);
          gemm<float>(N, M, D, vf + j0 * ld_v, ld_v, dOt.data(), BM, dPt.data(), BM, false);
          const float* kc = p.kcode + b * Lk + j0;
          const float* qc = rel == Rel::Partial ? p.qcode + b * Lq + i0 : nullptr;
          for (int64_t n = 0; n < N; ++n) {
            prob_row<true>(St.data() + n * BM, dPt.data() + n * BM, M, p.scale, p.immediate,
                           nullptr, kc[n], qc, 0.f, lse.data(), 0.f, delta.data(), 0.f);
          }
          const bool add_kv = kb_written[kb] != 0;
          gemm<float>(N, D, M, St.data(), BM, dof, ld_do, dv_acc + j0 * ld_acc, ld_acc, add_kv);
          gemm<float>(N, D, M, dPt.data(), BM, qf, ld_q, dk_acc + j0 * ld_acc, ld_acc, add_kv);
          gemm<float>(D, M, N, Kt.data() + j0, Lk, dPt.data(), BM, dQt.data(), BM, tile_written);
          kb_written[kb] = 1;
          tile_written = true;
        }
        if (!tile_written) std::fill(dQt.begin(), dQt.end(), 0.f);
        T* dq = static_cast<T*>(a.dq) + row * D;
        if constexpr (kFloat) {
          transpose_block(dQt.data(), BM, dq, p.Hq * D, D, M);
        } else {
          transpose_block(dQt.data(), BM, dQ.data(), D, D, M);
          for (int64_t r = 0; r < M; ++r) store_row(dQ.data() + r * D, dq + r * p.Hq * D, D);
        }
      }
    }
    for (int64_t kb = 0; kb < nkb; ++kb) {
      if (kFloat && kb_written[kb]) continue;
      for (int64_t j = kb * BN; j < std::min(Lk, (kb + 1) * BN); ++j) {
        T* dk = static_cast<T*>(a.dk) + kv_row + j * p.Hk * D;
        T* dv = static_cast<T*>(a.dv) + kv_row + j * p.Hk * D;
        if (!kb_written[kb]) {  // no query attends these keys
          std::fill(dk, dk + D, T(0));
          std::fill(dv, dv + D, T(0));
        } else {
          store_row(dK.data() + j * D, dk, D);
          store_row(dV.data() + j * D, dv, D);
        }
      }
    }
  }
}

// Key mass takes float32 tensors (the caller widens 16-bit inputs once).
using T = float;

void mass_impl(const XattnMassArgs& a, std::atomic<int64_t>* next) {
  const XattnProblem& p = a.p;
  const int64_t BM = p.block_m, BN = p.block_n, D = p.D;
  const int64_t nqt = ceil_div(p.Lq, BM), nkb = ceil_div(p.Lk, BN);
  const int64_t group = p.Hq / p.Hk;
  const int64_t ntasks = p.B * nkb;
  std::vector<float> St(BN * BM), mass(BN), lse(BM);
  for (int64_t t; (t = next->fetch_add(1)) < ntasks;) {
    const int64_t kb = t % nkb, b = t / nkb;
    const int64_t j0 = kb * BN, N = std::min(BN, p.Lk - j0);
    const float* kc = p.kcode + b * p.Lk + j0;
    const KeyBlockSummary& kbs = p.kblk[b * nkb + kb];
    std::fill(mass.begin(), mass.end(), 0.f);
    for (int64_t h = 0; h < p.Hq; ++h) {
      const T* k = ptr<T>(p.k) + b * p.k_sb + j0 * p.k_sl + (h / group) * p.k_sh;
      const T* qt_all = ptr<T>(a.qt) + (b * p.Hq + h) * D * p.Lq;
      for (int64_t qt = 0; qt < nqt; ++qt) {
        const Rel rel = classify(p.immediate, p.q_tile_lo[b * nqt + qt], p.q_tile_hi[b * nqt + qt], kbs);
        if (rel == Rel::Skip) continue;
        const int64_t i0 = qt * BM, M = std::min(BM, p.Lq - i0);
        gemm<T>(N, M, D, k, p.k_sl, qt_all + i0, p.Lq, St.data(), BM, false);
        safe_lse(a.lse + (b * p.Hq + h) * p.Lq + i0, M, lse.data());
        const float* qc = rel == Rel::Partial ? p.qcode + b * p.Lq + i0 : nullptr;
        for (int64_t n = 0; n < N; ++n) {
          mass[n] += prob_row<true>(St.data() + n * BM, nullptr, M, p.scale, p.immediate, nullptr,
                                    kc[n], qc, 0.f, lse.data(), 0.f, nullptr, 0.f);
        }
      }
    }
    std::copy(mass.begin(), mass.begin() + N, a.mass + b * p.Lk + j0);
  }
}

template <typename S>
void widen_impl(const XattnWidenArgs& a, std::atomic<int64_t>* next) {
  constexpr int64_t R = 16;  // rows per piece: the piece stays in L1 between its two writes
  const int64_t D = a.D, L = a.L, H = a.H;
  std::vector<float> buf(R * D);
  for (int64_t t; (t = next->fetch_add(1)) < a.B * H;) {
    const int64_t b = t / H, h = t % H;
    const S* src = static_cast<const S*>(a.src) + b * a.sb + h * a.sh;
    for (int64_t l0 = 0; l0 < L; l0 += R) {
      const int64_t n = std::min(R, L - l0);
      load_rows(src + l0 * a.sl, a.sl, n, D, buf.data());
      if (a.rows != nullptr) {
        for (int64_t r = 0; r < n; ++r) {
          std::copy(buf.data() + r * D, buf.data() + (r + 1) * D,
                    a.rows + ((b * L + l0 + r) * H + h) * D);
        }
      }
      transpose_block(buf.data(), D, a.cols + t * D * L + l0, L, n, D);
    }
  }
}

}  // namespace

void xattn_widen_tasks(const XattnWidenArgs& a, std::atomic<int64_t>* next_task) {
  dispatch_float_types(a.dtype, [&](auto tag) { widen_impl<decltype(tag)>(a, next_task); });
}

void xattn_forward_tasks(const XattnForwardArgs& a, std::atomic<int64_t>* next_task) {
  dispatch_float_types(a.p.dtype, [&](auto tag) { forward_impl<decltype(tag)>(a, next_task); });
}

void xattn_backward_tasks(const XattnBackwardArgs& a, std::atomic<int64_t>* next_task) {
  dispatch_float_types(a.p.dtype, [&](auto tag) { backward_impl<decltype(tag)>(a, next_task); });
}

void xattn_mass_tasks(const XattnMassArgs& a, std::atomic<int64_t>* next_task) {
  mass_impl(a, next_task);
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
