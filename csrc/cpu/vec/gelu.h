// GELU and its derivative on float vectors, shared by every vectorized unit that needs them
// (bias_gelu, the projector's epilogues). Included only from csrc/cpu/vec/*.cpp, which are
// compiled once per ISA with CPU_CAPABILITY set.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace mmfast::cpu::CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;

constexpr float kSqrt1_2 = 0.70710678118654752440f;     // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1/sqrt(2*pi)
constexpr float kTanhK = 0.79788456080286535588f;       // sqrt(2/pi)
constexpr float kTanhC = 0.044715f;

// gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
inline fVec gelu_erf(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  return x * half * (one + (x * fVec(kSqrt1_2)).erf());
}

// gelu_tanh(x) = 0.5 x (1 + tanh(k (x + c x^3)))
inline fVec gelu_tanh(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  const fVec u = fVec(kTanhK) * (x + fVec(kTanhC) * x * x * x);
  return x * half * (one + u.tanh());
}

// d gelu / dx = Phi(x) + x phi(x)
inline fVec dgelu_erf(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  const fVec cdf = half * (one + (x * fVec(kSqrt1_2)).erf());
  const fVec pdf = (fVec(-0.5f) * x * x).exp() * fVec(kInvSqrt2Pi);
  return cdf + x * pdf;
}

// d gelu_tanh / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2),  t = tanh(k (x + c x^3))
inline fVec dgelu_tanh(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  const fVec x2 = x * x;
  const fVec t = (fVec(kTanhK) * (x + fVec(kTanhC) * x2 * x)).tanh();
  const fVec du = fVec(kTanhK) * (one + fVec(3.0f * kTanhC) * x2);
  return half * (one + t) + half * x * (one - t * t) * du;
}

inline fVec gelu(const fVec& x, bool tanh_form) { return tanh_form ? gelu_tanh(x) : gelu_erf(x); }
inline fVec dgelu(const fVec& x, bool tanh_form) { return tanh_form ? dgelu_tanh(x) : dgelu_erf(x); }

}  // namespace mmfast::cpu::CPU_CAPABILITY
