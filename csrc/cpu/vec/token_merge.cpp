// bipartite_merge / prune_tokens inner loops: norms of metric rows, the size-weighted sum of a
// group of token rows, and the row scaling of the merge backward. Compiled once per ISA.
#include "cpu/vec/token_merge.h"
#include "cpu/vec/dispatch.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// store_chunk for a row written once and not read back soon: full, 64-byte aligned chunks
// bypass the cache where the ISA has such stores (see copy_row_streaming).
template <typename T>
inline void stream_chunk(T* p, int64_t n, const fVec& lo, const fVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n >= kChunk && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, lo);
      _mm512_stream_ps(p + kW, hi);
    } else {
      const auto v = at::vec::convert_from_float<T>(lo, hi);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(v));
    }
    return;
  }
#endif
  store_chunk(p, n, lo, hi);
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
  // Summed in the order of `rows`: x0 w0 + x1 w1 first, one pass for both (most groups hold
  // two tokens), then one pass over the columns per further row, which keeps acc (a few KiB)
  // in L1.
  const T* src0 = x + rows[0] * row_stride;
  const T* src1 = count > 1 ? x + rows[1] * row_stride : src0;
  const fVec w0(weights[0]), w1(count > 1 ? weights[1] : 0.0f), s(scale);
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    fVec lo, hi;
    load_chunk(src0 + c, m, lo, hi);
    lo = lo * w0;
    hi = hi * w0;
    if (count > 1) {
      fVec lo1, hi1;
      load_chunk(src1 + c, m, lo1, hi1);
      lo = at::vec::fmadd(lo1, w1, lo);
      hi = at::vec::fmadd(hi1, w1, hi);
    }
    if (count <= 2) {
      stream_chunk(out + c, m, lo * s, hi * s);
    } else {
      store_chunk(acc + c, m, lo, hi);
    }
  }
  for (int64_t k = 2; k < count; ++k) {
    const T* src = x + rows[k] * row_stride;
    const fVec w(weights[k]);
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t m = std::min(kChunk, n - c);
      fVec lo, hi, a0, a1;
      load_chunk(src + c, m, lo, hi);
      load_chunk(acc + c, m, a0, a1);
      lo = at::vec::fmadd(lo, w, a0);
      hi = at::vec::fmadd(hi, w, a1);
      if (k + 1 == count) {
        stream_chunk(out + c, m, lo * s, hi * s);
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

#if defined(CPU_CAPABILITY_AVX512)
// The two bfloat16 values of each 32-bit lane of v as float32, with no lane crossing: the low
// one shifted up (even), the high one masked (odd).
inline void split_bf16_pairs(__m512i v, __m512& even, __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(
      _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// row_sumsq_to_int8 for bfloat16 rows of a multiple of 32 elements, with split_bf16_pairs.
// Sums and maxima do not care about the order; the
// quantized pair is packed back into its lane before the bytes are narrowed, which restores
// it. Fewer instructions than widening each half of the vector.
float bf16_row_to_int8(const uint16_t* p, int64_t n, uint8_t* dst, uint8_t flip,
                       float* step_out, float* residual_sumsq, int32_t* q_sum) {
  const auto split = [&](int64_t c, __m512& even, __m512& odd) {
    split_bf16_pairs(_mm512_loadu_si512(p + c), even, odd);
  };
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, m0 = s0, m1 = s0;
  for (int64_t c = 0; c < n; c += 32) {
    __m512 even, odd;
    split(c, even, odd);
    s0 = _mm512_fmadd_ps(even, even, s0);
    s1 = _mm512_fmadd_ps(odd, odd, s1);
    // A plain max: a NaN is caught by the sum of squares, not here.
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(even));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(odd));
  }
  const float maxabs = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  const float sumsq = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  if (!(maxabs >= 1e-30f) || !std::isfinite(maxabs)) {
    std::fill(dst, dst + n, flip);
    *step_out = 0.0f;
    *residual_sumsq = sumsq;
    *q_sum = 0;
    return sumsq;
  }
  const float step = maxabs / 127.0f;
  const __m512 inv = _mm512_set1_ps(127.0f / maxabs), vstep = _mm512_set1_ps(step);
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  const __m256i vflip = _mm256_set1_epi8(static_cast<char>(flip));
  __m512 r0 = _mm512_setzero_ps(), r1 = r0;
  __m512i qs = _mm512_setzero_si512();
  for (int64_t c = 0; c < n; c += 32) {
    __m512 even, odd;
    split(c, even, odd);
    // Rounded to nearest even, as .round() in the generic path; |value| <= maxabs, so the
    // result is at most 127 in magnitude.
    const __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(even, inv));
    const __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(odd, inv));
    const __m512 d0 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qe), vstep, even);
    const __m512 d1 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qo), vstep, odd);
    r0 = _mm512_fmadd_ps(d0, d0, r0);
    r1 = _mm512_fmadd_ps(d1, d1, r1);
    qs = _mm512_add_epi32(qs, _mm512_add_epi32(qe, qo));
    const __m512i pairs = _mm512_or_si512(_mm512_and_si512(qe, low), _mm512_slli_epi32(qo, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                        _mm256_xor_si256(_mm512_cvtepi16_epi8(pairs), vflip));
  }
  *step_out = step;
  *residual_sumsq = _mm512_reduce_add_ps(_mm512_add_ps(r0, r1));
  *q_sum = _mm512_reduce_add_epi32(qs);
  return sumsq;
}

// row_dot of bfloat16 rows of a multiple of 32 elements, with split_bf16_pairs and eight
// independent sums.
float bf16_dot(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 s[8];
  for (auto& v : s) v = _mm512_setzero_ps();
  const auto step = [&](int64_t c, __m512& even_sum, __m512& odd_sum) {
    __m512 a_even, a_odd, b_even, b_odd;
    split_bf16_pairs(_mm512_loadu_si512(a + c), a_even, a_odd);
    split_bf16_pairs(_mm512_loadu_si512(b + c), b_even, b_odd);
    even_sum = _mm512_fmadd_ps(a_even, b_even, even_sum);
    odd_sum = _mm512_fmadd_ps(a_odd, b_odd, odd_sum);
  };
  int64_t c = 0;
  for (; c + 128 <= n; c += 128) {
    for (int64_t u = 0; u < 4; ++u) step(c + 32 * u, s[2 * u], s[2 * u + 1]);
  }
  for (; c < n; c += 32) step(c, s[0], s[1]);
  const __m512 total = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])),
      _mm512_add_ps(_mm512_add_ps(s[4], s[5]), _mm512_add_ps(s[6], s[7])));
  return _mm512_reduce_add_ps(total);
}

// bf16_dot with the CPU's bfloat16 pair dot product (AVX512_BF16): one instruction per 32
// products, each product exact in float32 and added with round-to-nearest, as two
// multiply-adds would; values below 2^-126 are flushed to zero.
__attribute__((target("avx512bf16"))) float bf16_dot_pairs(const uint16_t* a,
                                                           const uint16_t* b, int64_t n) {
  __m512 s[8];
  for (auto& v : s) v = _mm512_setzero_ps();
  const auto pairs = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  int64_t c = 0;
  for (; c + 256 <= n; c += 256) {
    for (int64_t u = 0; u < 8; ++u) {
      s[u] = _mm512_dpbf16_ps(s[u], pairs(a + c + 32 * u), pairs(b + c + 32 * u));
    }
  }
  for (; c < n; c += 32) s[0] = _mm512_dpbf16_ps(s[0], pairs(a + c), pairs(b + c));
  const __m512 total = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])),
      _mm512_add_ps(_mm512_add_ps(s[4], s[5]), _mm512_add_ps(s[6], s[7])));
  return _mm512_reduce_add_ps(total);
}
#endif

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
#if defined(CPU_CAPABILITY_AVX512)
  if (dtype == c10::ScalarType::BFloat16 && n % 32 == 0) {
    return bf16_dot(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), n);
  }
#endif
  return dispatch_float_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(a);
    const T* pb = static_cast<const T*>(b);
    // Four chunks (eight independent sums) per step: one sum would wait on the latency of
    // every multiply-add before it.
    fVec s[8] = {fVec(0.0f), fVec(0.0f), fVec(0.0f), fVec(0.0f),
                 fVec(0.0f), fVec(0.0f), fVec(0.0f), fVec(0.0f)};
    int64_t c = 0;
    for (; c + 4 * kChunk <= n; c += 4 * kChunk) {
      for (int64_t u = 0; u < 4; ++u) {
        fVec a0, a1, b0, b1;
        load_chunk(pa + c + u * kChunk, kChunk, a0, a1);
        load_chunk(pb + c + u * kChunk, kChunk, b0, b1);
        s[2 * u] = at::vec::fmadd(a0, b0, s[2 * u]);
        s[2 * u + 1] = at::vec::fmadd(a1, b1, s[2 * u + 1]);
      }
    }
    for (; c < n; c += kChunk) {
      fVec a0, a1, b0, b1;
      load_chunk(pa + c, n - c, a0, a1);
      load_chunk(pb + c, n - c, b0, b1);
      s[0] = at::vec::fmadd(a0, b0, s[0]);
      s[1] = at::vec::fmadd(a1, b1, s[1]);
    }
    const fVec total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, total);
  });
}

float bf16_row_dot(const void* a, const void* b, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has_pairs = __builtin_cpu_supports("avx512bf16");
  if (has_pairs && n % 32 == 0) {
    return bf16_dot_pairs(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), n);
  }
#endif
  return row_dot(c10::ScalarType::BFloat16, a, b, n);
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
#if defined(CPU_CAPABILITY_AVX512)
  if (dtype == c10::ScalarType::BFloat16 && n % 32 == 0) {
    return bf16_row_to_int8(static_cast<const uint16_t*>(src), n, dst, flip, step_out,
                            residual_sumsq, q_sum);
  }
#endif
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

namespace {

// A lane's score and listed value in scalar form: the same operations as the vector lanes,
// so the same bits. Used only when a lane raises a top or is listed (rare).
template <typename In>
inline float lane_score(const In* c, int64_t ldc, const float* scale, const ColumnScan& st,
                        int64_t p, int64_t i) {
  if constexpr (std::is_same_v<In, int32_t>) {
    return static_cast<float>(c[p * ldc + i] - st.offset[i]) * scale[p];
  } else {
    return c[p * ldc + i] * scale[p];
  }
}

// f(q + l) for every set bit l of bits.
template <typename F>
inline void for_lanes(uint64_t bits, int64_t q, const F& f) {
  for (; bits != 0; bits &= bits - 1) f(q + __builtin_ctzll(bits));
}

// top - width rounded down: the floor may list more rows than needed, never fewer.
inline float floor_below(float top, float width) {
  return std::nextafter(top - width, -std::numeric_limits<float>::infinity());
}

// Row p (B token j) beats column i's top.
template <typename In>
inline void raise_top(const In* c, int64_t ldc, const float* scale, ColumnScan& st, int64_t p,
                      int64_t i, int32_t j) {
  st.top[i] = lane_score(c, ldc, scale, st, p, i);
  st.arg[i] = j;
  st.wide[i] = floor_below(st.top[i], st.width[i]);
}

// Row p's (B token j's) listed lanes: bit l of bits is column q + l.
template <typename In>
inline void list_lanes(const In* c, int64_t ldc, const float* scale, const float* slack,
                       ColumnScan& st, int64_t p, int32_t j, uint64_t bits, int64_t q) {
  int32_t* const idx = st.idx;
  float* const value = st.value;
  int64_t* const count = st.count;
  const int64_t room = st.room;
  for_lanes(bits, q, [&](int64_t i) {
    const int64_t k = count[i]++;
    idx[i * room + k] = j;
    value[i * room + k] = std::fma(slack[p], st.coef[i], lane_score(c, ldc, scale, st, p, i));
  });
}

#if defined(CPU_CAPABILITY_AVX512)
// nv column vectors (cols <= 16 nv): the state of the whole tile stays in registers.
template <int NV, typename In>
void scan_rows_vec(const In* c, int64_t ldc, int64_t rows, const float* scale,
                   const float* slack, int32_t base, bool first_panel, ColumnScan& st) {
  constexpr bool kInt = std::is_same_v<In, int32_t>;
  __mmask16 lanes[NV];
  __m512i off[NV];
  __m512 top[NV], wide[NV], coef[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t w = std::min<int64_t>(16, st.cols - 16 * v);
    lanes[v] = static_cast<__mmask16>((1u << w) - 1);
    off[v] = _mm512_loadu_si512(st.offset + 16 * v);
    coef[v] = _mm512_loadu_ps(st.coef + 16 * v);
  }
  const auto scores = [&](int64_t p, int v) {
    const __m512 sc = _mm512_set1_ps(scale[p]);
    if constexpr (kInt) {
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                               _mm512_maskz_loadu_epi32(lanes[v], c + p * ldc + 16 * v), off[v])),
                           sc);
    } else {
      return _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes[v], c + p * ldc + 16 * v), sc);
    }
  };
  if (first_panel) {
    // The panel's maximum per column and the first row reaching it, before anything is
    // listed: the first panel's lists are then held to the floor of its own maximum, not to
    // the far lower ones of its first rows. Strictly greater: the first row reaching the
    // maximum keeps it; NaN never wins (the scan below marks it).
    __m512i arg[NV];
    for (int v = 0; v < NV; ++v) {
      top[v] = _mm512_loadu_ps(st.top + 16 * v);
      arg[v] = _mm512_loadu_si512(st.arg + 16 * v);
    }
    for (int64_t p = 0; p < rows; ++p) {
      const __m512i j = _mm512_set1_epi32(base + static_cast<int32_t>(p));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 sv = scores(p, v);
        const __mmask16 up = _mm512_mask_cmp_ps_mask(lanes[v], sv, top[v], _CMP_GT_OQ);
        top[v] = _mm512_mask_mov_ps(top[v], up, sv);
        arg[v] = _mm512_mask_mov_epi32(arg[v], up, j);
      }
    }
    for (int v = 0; v < NV; ++v) {
      _mm512_storeu_ps(st.top + 16 * v, top[v]);
      _mm512_storeu_si512(st.arg + 16 * v, arg[v]);
    }
    for (int64_t i = 0; i < st.cols; ++i) st.wide[i] = floor_below(st.top[i], st.width[i]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    top[v] = _mm512_loadu_ps(st.top + 16 * v);
    wide[v] = _mm512_loadu_ps(st.wide + 16 * v);
  }
  // The rows with listed lanes are recorded without a branch (a branch per row would
  // mispredict about half the time) and listed after each chunk of rows, in row order.
  constexpr int64_t kChunkRows = 256;
  int32_t hit_row[kChunkRows];
  uint64_t hit_lanes[kChunkRows];
  for (int64_t p0 = 0; p0 < rows; p0 += kChunkRows) {
    const int64_t p1 = std::min(rows, p0 + kChunkRows);
    int64_t recorded = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const __m512 sl = _mm512_set1_ps(slack[p]);
      uint64_t lanes_hit = 0;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 sv = scores(p, v);
        if constexpr (!kInt) {
          const unsigned bad = _mm512_mask_cmp_ps_mask(lanes[v], sv, sv, _CMP_UNORD_Q);
          if (bad != 0) for_lanes(bad, 16 * v, [&](int64_t i) { st.nan[i] = 1; });
        }
        const unsigned up = _mm512_mask_cmp_ps_mask(lanes[v], sv, top[v], _CMP_GT_OQ);
        if (up != 0) {
          for_lanes(up, 16 * v, [&](int64_t i) {
            raise_top(c, ldc, scale, st, p, i, base + static_cast<int32_t>(p));
          });
          top[v] = _mm512_loadu_ps(st.top + 16 * v);
          wide[v] = _mm512_loadu_ps(st.wide + 16 * v);
        }
        const __m512 val = _mm512_fmadd_ps(sl, coef[v], sv);
        const uint64_t hit = _mm512_mask_cmp_ps_mask(lanes[v], val, wide[v], _CMP_GE_OQ);
        lanes_hit |= hit << (16 * v);
      }
      hit_row[recorded] = static_cast<int32_t>(p);
      hit_lanes[recorded] = lanes_hit;
      recorded += lanes_hit != 0;
    }
    for (int64_t r = 0; r < recorded; ++r) {
      const int64_t p = hit_row[r];
      list_lanes(c, ldc, scale, slack, st, p, base + static_cast<int32_t>(p), hit_lanes[r], 0);
    }
  }
}
#endif

template <typename In>
void scan_rows(const In* c, int64_t ldc, int64_t rows, const float* scale, const float* slack,
               int32_t base, bool first_panel, ColumnScan& st) {
  constexpr bool kInt = std::is_same_v<In, int32_t>;
  const int64_t cols = st.cols;
  TORCH_CHECK(cols <= 64, "bipartite_merge: a scan takes at most 64 columns, got ", cols);
#if defined(CPU_CAPABILITY_AVX512)
  switch ((cols + 15) / 16) {
    case 1: return scan_rows_vec<1>(c, ldc, rows, scale, slack, base, first_panel, st);
    case 2: return scan_rows_vec<2>(c, ldc, rows, scale, slack, base, first_panel, st);
    case 3: return scan_rows_vec<3>(c, ldc, rows, scale, slack, base, first_panel, st);
    case 4: return scan_rows_vec<4>(c, ldc, rows, scale, slack, base, first_panel, st);
    default: return;
  }
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const auto scores = [&](int64_t p, int64_t q, int64_t w) {
    if constexpr (kInt) {
      return at::vec::convert_to_fp_of_same_size<float>(IVec::loadu(c + p * ldc + q, w) -
                                                        IVec::loadu(st.offset + q)) *
             fVec(scale[p]);
    } else {
      return fVec::loadu(c + p * ldc + q, w) * fVec(scale[p]);
    }
  };
  for (int64_t p = 0; p < rows && first_panel; ++p) {  // the panel's maxima first (see above)
    const int32_t j = base + static_cast<int32_t>(p);
    for (int64_t q = 0; q < cols; q += kW) {
      const int64_t w = std::min(kW, cols - q);
      const unsigned lanes = (1u << w) - 1;
      const fVec sv = scores(p, q, w);
      const unsigned up = ~static_cast<unsigned>((sv > fVec::loadu(st.top + q)).zero_mask()) & lanes;
      if (up != 0) for_lanes(up, q, [&](int64_t i) { raise_top(c, ldc, scale, st, p, i, j); });
    }
  }
  for (int64_t p = 0; p < rows; ++p) {
    const int32_t j = base + static_cast<int32_t>(p);
    for (int64_t q = 0; q < cols; q += kW) {
      const int64_t w = std::min(kW, cols - q);
      const unsigned lanes = (1u << w) - 1;
      const auto bits = [&](const fVec& m) { return ~static_cast<unsigned>(m.zero_mask()) & lanes; };
      const fVec sv = scores(p, q, w);
      if constexpr (!kInt) {
        const unsigned bad = bits(sv.isnan());
        if (bad != 0) for_lanes(bad, q, [&](int64_t i) { st.nan[i] = 1; });
      }
      const unsigned up = bits(sv > fVec::loadu(st.top + q));
      if (up != 0) for_lanes(up, q, [&](int64_t i) { raise_top(c, ldc, scale, st, p, i, j); });
      const fVec val = at::vec::fmadd(fVec(slack[p]), fVec::loadu(st.coef + q), sv);
      const unsigned hit = bits(val >= fVec::loadu(st.wide + q));
      if (hit != 0) list_lanes(c, ldc, scale, slack, st, p, j, hit, q);
    }
  }
#endif
}

}  // namespace

void scan_int_rows(const int32_t* c, int64_t ldc, int64_t rows, const float* scale,
                   const float* slack, int32_t base, bool first_panel, ColumnScan& state) {
  scan_rows(c, ldc, rows, scale, slack, base, first_panel, state);
}

void scan_float_rows(const float* c, int64_t ldc, int64_t rows, const float* scale,
                     const float* slack, int32_t base, bool first_panel, ColumnScan& state) {
  scan_rows(c, ldc, rows, scale, slack, base, first_panel, state);
}

void copy_row_streaming(const void* src, void* dst, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    int64_t off = 0;
    for (; off + 64 <= bytes; off += 64) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + off),
                          _mm512_loadu_si512(s + off));
    }
    std::memcpy(d + off, s + off, bytes - off);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
