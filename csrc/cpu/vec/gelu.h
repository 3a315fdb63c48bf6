// GELU and its derivative on float vectors, shared by every vectorized unit that needs them
// (bias_gelu, the projector's epilogues). Included only from csrc/cpu/vec/*.cpp, which are
// compiled once per ISA with CPU_CAPABILITY set.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/vec/gelu_table.h"
#endif

namespace mmfast::cpu::CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;

constexpr float kSqrt1_2 = 0.70710678118654752440f;     // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1/sqrt(2*pi)
constexpr float kTanhK = 0.79788456080286535588f;       // sqrt(2/pi)
constexpr float kTanhC = 0.044715f;

// The transcendental parts are inlined polynomials (exp_u20, A&S erf) rather than calls into
// Sleef: GELU is a streaming op, and the call overhead and division count dominate its time.

// erf(z) given e = exp(-z^2): sign(z) (1 - t (a1 + t (a2 + ... t a5)) e), t = 1 / (1 + p|z|)
// (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7). Taking e from the caller lets the GELU
// derivative share one exp between Phi(x) and phi(x).
inline fVec erf_given_exp(const fVec& z, const fVec& e) {
  const fVec one(1.0f);
  const fVec t = one / at::vec::fmadd(fVec(0.3275911f), z.abs(), one);
  fVec poly = at::vec::fmadd(fVec(1.061405429f), t, fVec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, fVec(1.421413741f));
  poly = at::vec::fmadd(poly, t, fVec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, fVec(0.254829592f));
  const fVec r = one - poly * t * e;
  return fVec::blendv(r, fVec(0.0f) - r, z < fVec(0.0f));
}

// For the tanh form, 0.5 (1 + tanh(u)) = s = 1 / (1 + e) with e = exp(-2u), and
// 0.5 (1 - tanh(u)) = 1 - s, taken as e s where e <= 1 (s >= 1/2, where 1 - s would cancel)
// and as 1 - s elsewhere (s < 1/2: exact enough, and e may be inf there). Neither cancels,
// where 1 + tanh(u) computed from tanh(u) does for u << 0: in the AVX2 build gelu_tanh of
// 28 of the ~21500 bfloat16 inputs with |gelu| > 1e-6 rounded one unit off that way (0.13%).
struct TanhHalves {
  fVec s, r;  // 0.5 (1 + tanh u), 0.5 (1 - tanh u)
};
inline TanhHalves tanh_halves(const fVec& u) {
  const fVec one(1.0f);
  const fVec e = (fVec(-2.0f) * u).exp_u20();
  TanhHalves t;
  t.s = one / (one + e);
  t.r = fVec::blendv(e * t.s, one - t.s, e > one);
  return t;
}

// gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
inline fVec gelu_erf(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  const fVec e = (fVec(-0.5f) * x * x).exp_u20();  // exp(-z^2), z = x / sqrt 2
  return x * half * (one + erf_given_exp(x * fVec(kSqrt1_2), e));
}

// The halves of gelu_tanh's gate at x: u = k (x + c x^3).
inline TanhHalves gelu_tanh_halves(const fVec& x) {
  return tanh_halves(fVec(kTanhK) * (x + fVec(kTanhC) * x * x * x));
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x s
inline fVec gelu_tanh(const fVec& x) { return x * gelu_tanh_halves(x).s; }

// d gelu_tanh / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du = s (1 + 2 x r du),
// t = tanh(u), du = k (1 + 3 c x^2), from the halves t of x's gate
inline fVec dgelu_tanh_given(const fVec& x, const TanhHalves& t) {
  const fVec one(1.0f);
  const fVec du = fVec(kTanhK) * (one + fVec(3.0f * kTanhC) * x * x);
  return t.s * at::vec::fmadd(fVec(2.0f) * x * t.r, du, one);
}

inline fVec dgelu_tanh(const fVec& x) { return dgelu_tanh_given(x, gelu_tanh_halves(x)); }

// d gelu / dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
inline fVec dgelu_erf(const fVec& x) {
  const fVec half(0.5f), one(1.0f);
  const fVec e = (fVec(-0.5f) * x * x).exp_u20();
  const fVec cdf = half * (one + erf_given_exp(x * fVec(kSqrt1_2), e));
  return at::vec::fmadd(x * fVec(kInvSqrt2Pi), e, cdf);
}

inline fVec gelu(const fVec& x, bool tanh_form) { return tanh_form ? gelu_tanh(x) : gelu_erf(x); }
inline fVec dgelu(const fVec& x, bool tanh_form) { return tanh_form ? dgelu_tanh(x) : dgelu_erf(x); }

// gelu(v) (the value gelu() gives) and gelu'(v), sharing the expensive part: one exp and erf,
// or one tanh.
inline void gelu_and_grad(const fVec& v, bool tanh_form, fVec& act, fVec& d) {
  const fVec half(0.5f), one(1.0f);
  if (tanh_form) {
    const TanhHalves t = gelu_tanh_halves(v);
    act = v * t.s;
    d = dgelu_tanh_given(v, t);
  } else {
    const fVec e = (fVec(-0.5f) * v * v).exp_u20();
    const fVec erf = erf_given_exp(v * fVec(kSqrt1_2), e);
    act = v * half * (one + erf);
    d = at::vec::fmadd(v * fVec(kInvSqrt2Pi), e, half * (one + erf));
  }
}

// One GELU form for a loop: gelu, gelu' and both at once. The AVX512 build evaluates them by
// piecewise cubics (gelu_table.h: more accurate, and no exp or division), the others by the
// functions above.
class GeluForm {
 public:
#if defined(CPU_CAPABILITY_AVX512)
  explicit GeluForm(bool tanh_form) : table_(tanh_form) {}
  fVec operator()(const fVec& x) const { return gelu_by_table(x, table_); }
  fVec grad(const fVec& x) const { return gelu_grad_by_table(x, table_); }
  void both(const fVec& x, fVec& act, fVec& d) const {
    __m512 a, g;
    gelu_and_grad_by_table(x, table_, a, g);
    act = a;
    d = g;
  }

 private:
  GeluTable table_;
#else
  explicit GeluForm(bool tanh_form) : tanh_form_(tanh_form) {}
  fVec operator()(const fVec& x) const { return gelu(x, tanh_form_); }
  fVec grad(const fVec& x) const { return dgelu(x, tanh_form_); }
  void both(const fVec& x, fVec& act, fVec& d) const { gelu_and_grad(x, tanh_form_, act, d); }

 private:
  bool tanh_form_;
#endif
};

}  // namespace mmfast::cpu::CPU_CAPABILITY
