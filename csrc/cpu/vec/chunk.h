// Rows of float32 / float16 / bfloat16 walked in chunks of two float vectors, the math in
// float32. Included only from csrc/cpu/vec/*.cpp (compiled once per ISA).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace mmfast::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// Rows are walked in chunks of two float vectors: a half type's Vectorized<T> holds exactly
// that many elements, so each chunk is one load of T widened to (lo, hi).
constexpr int64_t kChunk = 2 * fVec::size();

template <typename F>
inline void for_each_chunk(int64_t cols, F&& f) {
  for (int64_t c = 0; c < cols; c += kChunk) f(c, std::min<int64_t>(kChunk, cols - c));
}

template <typename T>
inline void load2(const T* p, int64_t n, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t W = fVec::size();
    if (n == kChunk) {
      lo = fVec::loadu(p);
      hi = fVec::loadu(p + W);
    } else {
      lo = fVec::loadu(p, std::min<int64_t>(n, W));
      hi = n > W ? fVec::loadu(p + W, n - W) : fVec(0.0f);
    }
  } else {
    auto v = n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(v);
  }
}

template <typename T>
inline void store2(T* p, int64_t n, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t W = fVec::size();
    lo.store(p, std::min<int64_t>(n, W));
    if (n > W) hi.store(p + W, n - W);
  } else {
    auto v = at::vec::convert_from_float<T>(lo, hi);
    if (n == Vectorized<T>::size()) v.store(p); else v.store(p, n);
  }
}

// bias_partial[c .. c+n) += lo, hi (float32 partial sums of the bias gradient)
inline void accumulate2(float* p, int64_t n, const fVec& lo, const fVec& hi) {
  constexpr int64_t W = fVec::size();
  const int64_t n0 = std::min<int64_t>(n, W);
  (fVec::loadu(p, n0) + lo).store(p, n0);
  if (n > W) (fVec::loadu(p + W, n - W) + hi).store(p + W, n - W);
}

}  // namespace mmfast::cpu::CPU_CAPABILITY
