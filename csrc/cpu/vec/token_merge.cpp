// bipartite_merge / prune_tokens inner loops: norms of metric rows, the size-weighted sum of a
// group of token rows, and the row scaling of the merge backward. Compiled once per ISA.
#include "cpu/vec/token_merge.h"
#include "cpu/vec/dispatch.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

namespace mmfast::cpu::CPU_CAPABILITY {

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();
// A Vectorized<half type> holds two float vectors' worth: rows are walked in chunks of that.
constexpr int64_t kChunk = 2 * kW;

template <typename T>
inline void load_chunk(const T* p, int64_t n, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = n >= kW ? fVec::loadu(p) : fVec::loadu(p, n);
    hi = n >= kChunk ? fVec::loadu(p + kW) : (n > kW ? fVec::loadu(p + kW, n - kW) : fVec(0.0f));
  } else {
    using V = at::vec::Vectorized<T>;
    const V v = n >= kChunk ? V::loadu(p) : V::loadu(p, n);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(v);
  }
}

template <typename T>
inline void store_chunk(T* p, int64_t n, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kChunk) {
      lo.store(p);
      hi.store(p + kW);
    } else {
      lo.store(p, std::min(n, kW));
      if (n > kW) hi.store(p + kW, n - kW);
    }
  } else {
    const auto v = at::vec::convert_from_float<T>(lo, hi);
    if (n >= kChunk) v.store(p); else v.store(p, n);
  }
}

// dst[l] = byte(v[l]) ^ flip for l < m, v in [-128, 127].
inline void store_bytes(const at::vec::Vectorized<int32_t>& v, uint8_t flip, uint8_t* dst,
                        int64_t m) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i bytes = _mm_xor_si128(_mm512_cvtepi32_epi8(v), _mm_set1_epi8(flip));
  // Masked byte stores are slow on some CPUs (AMD Zen 4): only the row's tail uses one.
  if (m == kW) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bytes);
  } else {
    _mm_mask_storeu_epi8(dst, static_cast<__mmask16>((1u << m) - 1), bytes);
  }
#else
  alignas(64) int32_t words[kW];
  v.store(words);
  for (int64_t l = 0; l < m; ++l) dst[l] = static_cast<uint8_t>(words[l]) ^ flip;
#endif
}

template <typename T>
float sumsq(const T* row, int64_t n) {
  fVec s0(0.0f), s1(0.0f);
  for (int64_t c = 0; c < n; c += kChunk) {
    fVec lo, hi;
    load_chunk(row + c, n - c, lo, hi);
    s0 = at::vec::fmadd(lo, lo, s0);
    s1 = at::vec::fmadd(hi, hi, s1);
  }
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, s0 + s1);
}

template <typename T>
void weighted_sum(const T* x, int64_t row_stride, const int64_t* rows, const float* weights,
                  int64_t count, float scale, float* acc, T* out, int64_t n) {
  // One pass over the columns per source row keeps acc (a few KiB) in L1.
  for (int64_t k = 0; k < count; ++k) {
    const T* src = x + rows[k] * row_stride;
    const fVec w(weights[k]);
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t m = std::min(kChunk, n - c);
      fVec lo, hi;
      load_chunk(src + c, m, lo, hi);
      if (k == 0) {
        lo = lo * w;
        hi = hi * w;
      } else {
        fVec a0, a1;
        load_chunk(acc + c, m, a0, a1);
        lo = at::vec::fmadd(lo, w, a0);
        hi = at::vec::fmadd(hi, w, a1);
      }
      if (k + 1 == count) {
        store_chunk(out + c, m, lo * fVec(scale), hi * fVec(scale));
      } else {
        store_chunk(acc + c, m, lo, hi);
      }
    }
  }
}

template <typename T>
void scale(const T* src, float factor, T* dst, int64_t n) {
  const fVec f(factor);
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    fVec lo, hi;
    load_chunk(src + c, m, lo, hi);
    store_chunk(dst + c, m, lo * f, hi * f);
  }
}

}  // namespace

float row_sumsq(c10::ScalarType dtype, const void* row, int64_t n) {
  return dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    return sumsq(static_cast<const T*>(row), n);
  });
}

void weighted_row_sum(c10::ScalarType dtype, const void* x, int64_t row_stride,
                      const int64_t* rows, const float* weights, int64_t count, float scale_by,
                      float* acc, void* out, int64_t n) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    weighted_sum(static_cast<const T*>(x), row_stride, rows, weights, count, scale_by, acc,
                 static_cast<T*>(out), n);
  });
}

void scale_row(c10::ScalarType dtype, const void* src, float factor, void* dst, int64_t n) {
  dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    scale(static_cast<const T*>(src), factor, static_cast<T*>(dst), n);
  });
}

float row_dot(c10::ScalarType dtype, const void* a, const void* b, int64_t n) {
  return dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    fVec s0(0.0f), s1(0.0f);
    for (int64_t c = 0; c < n; c += kChunk) {
      fVec a0, a1, b0, b1;
      load_chunk(pa + c, n - c, a0, a1);
      load_chunk(pb + c, n - c, b0, b1);
      s0 = at::vec::fmadd(a0, b0, s0);
      s1 = at::vec::fmadd(a1, b1, s1);
    }
    return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, s0 + s1);
  });
}

float row_sumsq_to_bf16(c10::ScalarType dtype, const void* src, int64_t n,
                        c10::BFloat16* dst, float* residual_sumsq) {
  return dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    using BVec = at::vec::Vectorized<c10::BFloat16>;
    const T* p = static_cast<const T*>(src);
    fVec s0(0.0f), s1(0.0f), r0(0.0f), r1(0.0f);
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t m = std::min(kChunk, n - c);
      fVec lo, hi;
      load_chunk(p + c, m, lo, hi);
      s0 = at::vec::fmadd(lo, lo, s0);
      s1 = at::vec::fmadd(hi, hi, s1);
      const BVec v = at::vec::convert_from_float<c10::BFloat16>(lo, hi);
      if (m == kChunk) v.store(dst + c); else v.store(dst + c, m);
      fVec back_lo, back_hi;
      std::tie(back_lo, back_hi) = at::vec::convert_to_float<c10::BFloat16>(v);
      const fVec d0 = lo - back_lo, d1 = hi - back_hi;
      r0 = at::vec::fmadd(d0, d0, r0);
      r1 = at::vec::fmadd(d1, d1, r1);
    }
    const auto sum = [](fVec& a, fVec& b) { return a + b; };
    *residual_sumsq = at::vec::vec_reduce_all<float>(sum, r0 + r1);
    return at::vec::vec_reduce_all<float>(sum, s0 + s1);
  });
}

float row_sumsq_to_int8(c10::ScalarType dtype, const void* src, int64_t n, uint8_t* dst,
                        uint8_t flip, float* step_out, float* residual_sumsq, int32_t* q_sum) {
  return dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    using IVec = at::vec::Vectorized<int32_t>;
    const T* p = static_cast<const T*>(src);
    fVec s0(0.0f), s1(0.0f), mx(0.0f);
    for (int64_t c = 0; c < n; c += kChunk) {
      fVec lo, hi;
      load_chunk(p + c, n - c, lo, hi);
      s0 = at::vec::fmadd(lo, lo, s0);
      s1 = at::vec::fmadd(hi, hi, s1);
      // clamp_min is a plain max: a NaN is caught by the sum of squares, not here.
      mx = at::vec::clamp_min(mx, at::vec::clamp_min(lo.abs(), hi.abs()));
    }
    const auto sum = [](fVec& a, fVec& b) { return a + b; };
    const float maxabs = at::vec::vec_reduce_all<float>(
        [](fVec& a, fVec& b) { return at::vec::clamp_min(a, b); }, mx);
    const float sumsq = at::vec::vec_reduce_all<float>(sum, s0 + s1);
    // Below 1e-30, 127 / maxabs could overflow; such a row is all rounding error.
    if (!(maxabs >= 1e-30f) || !std::isfinite(maxabs)) {
      std::fill(dst, dst + n, flip);
      *step_out = 0.0f;
      *residual_sumsq = sumsq;
      *q_sum = 0;
      return sumsq;
    }
    const float step = maxabs / 127.0f;
    const fVec inv(127.0f / maxabs), vstep(step);
    // The q sum in float32 is exact: |sum| <= 127 n < 2^24 for rows up to 132k long.
    fVec r0(0.0f), r1(0.0f), qs(0.0f);
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t m = std::min(kChunk, n - c);
      fVec lo, hi;
      load_chunk(p + c, m, lo, hi);
      // Lanes past m load as 0 and quantize to 0: they add nothing to the sums.
      // |src| <= maxabs, so |src * inv| rounds to at most 127: no clamp needed.
      const fVec q0 = (lo * inv).round();
      const fVec q1 = (hi * inv).round();
      const fVec d0 = lo - q0 * vstep, d1 = hi - q1 * vstep;
      r0 = at::vec::fmadd(d0, d0, r0);
      r1 = at::vec::fmadd(d1, d1, r1);
      const IVec i0 = at::vec::convert_to_int_of_same_size(q0);
      const IVec i1 = at::vec::convert_to_int_of_same_size(q1);
      qs = qs + q0 + q1;
      store_bytes(i0, flip, dst + c, std::min(m, kW));
      if (m > kW) store_bytes(i1, flip, dst + c + kW, m - kW);
    }
    *step_out = step;
    *residual_sumsq = at::vec::vec_reduce_all<float>(sum, r0 + r1);
    *q_sum = static_cast<int32_t>(at::vec::vec_reduce_all<float>(sum, qs));
    return sumsq;
  });
}

float int_scale_and_max(const int32_t* c, const int32_t* offset, const float* scale, float* s,
                        int64_t n) {
  using IVec = at::vec::Vectorized<int32_t>;
  fVec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const IVec d = IVec::loadu(c + j) - IVec::loadu(offset + j);
    const fVec v = at::vec::convert_to_fp_of_same_size<float>(d) * fVec::loadu(scale + j);
    v.store(s + j);
    vmax = at::vec::clamp_min(vmax, v);  // a plain max: s is never NaN
  }
  float m = at::vec::vec_reduce_all<float>(
      [](fVec& a, fVec& b) { return at::vec::clamp_min(a, b); }, vmax);
  for (; j < n; ++j) {
    s[j] = static_cast<float>(c[j] - offset[j]) * scale[j];
    m = std::max(m, s[j]);
  }
  return m;
}

float scale_and_max(float* s, const float* scale, int64_t n) {
  fVec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const fVec v = fVec::loadu(s + j) * fVec::loadu(scale + j);
    v.store(s + j);
    vmax = at::vec::maximum(vmax, v);
  }
  float m = at::vec::vec_reduce_all<float>(
      [](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    s[j] *= scale[j];
    m = std::max(m, s[j]);
  }
  return m;
}

int64_t indices_at_least(const float* s, const float* slack, float coef, int64_t n,
                         float floor, int64_t* out) {
  int64_t count = 0;
  int64_t j = 0;
  const fVec f(floor), c(coef);
  for (; j + kW <= n; j += kW) {
    const fVec v = at::vec::fmadd(fVec::loadu(slack + j), c, fVec::loadu(s + j));
    // zero_mask: bit l set where lane l is all-zero, i.e. where the value is below floor.
    const int below = (v >= f).zero_mask();
    if (below == (1 << kW) - 1) continue;
    for (int64_t l = 0; l < kW; ++l) {
      if (!((below >> l) & 1)) out[count++] = j + l;
    }
  }
  for (; j < n; ++j) {
    if (std::fma(slack[j], coef, s[j]) >= floor) out[count++] = j;
  }
  return count;
}

void transpose32(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows,
                 int64_t cols) {
  // Words are moved as float bit patterns: the vector shuffles never change a bit.
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
  constexpr int64_t kBlock = 64;  // a 64 x 64 block of words (16 KiB) stays in L1
  for (int64_t r = 0; r < rows; r += kBlock) {
    for (int64_t c = 0; c < cols; c += kBlock) {
      at::vec::transpose_mxn<float>(s + r * ld_src + c, ld_src, d + c * ld_dst + r, ld_dst,
                                    static_cast<int>(std::min(kBlock, rows - r)),
                                    static_cast<int>(std::min(kBlock, cols - c)));
    }
  }
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
