// The exact (erf) GELU and its derivative by piecewise cubics, for the bfloat16 tile GEMMs'
// epilogues (packed_gemm.cpp, AVX512 build only):
//
//   gelu(x)  = relu(x) + gelu(y),        gelu(y) = y Phi(y),            y = -|x|
//   gelu'(x) = x > 0 ? 1 - q : q,        q = gelu'(y) = Phi(y) + y phi(y)
//
// (gelu(x) - gelu(-x) = x, and gelu' of x and -x sum to 1.) Phi and phi are tabulated on
// y in [kGeluTableLo, 0] as 32 cubics (tools/gelu_table.py fits and prints them); below
// kGeluTableLo, Phi(y) < 1.1e-8 and both are taken as 0. Against float64 on every finite
// bfloat16 input, in float32: |gelu error| <= 2.4e-7 and |gelu' error| <= 3.8e-7 (gelu.h's
// Abramowitz-Stegun erf: 4.5e-7 for gelu). Rounded to bfloat16, wherever |gelu| > 1e-6, gelu
// differs from the correctly rounded value on 1 input and gelu' on none (gelu.h: 19 and 8;
// ATen's bfloat16 GELU: 159), by one unit in the last place (test_projector.py checks it).
//
// Why: gelu.h's erf costs an exp and a division per vector; here each function costs four
// two-register table lookups (vpermt2ps) and three fmas. The GELU took ~1.8% of SigLIP's
// bfloat16 forward with gelu.h (timing script, GELU left out against kept in).
#pragma once

#include <immintrin.h>

namespace mmfast::cpu::CPU_CAPABILITY {

constexpr float kGeluTableLo = -5.6f;
constexpr int kGeluTableIntervals = 32;

// Coefficients c[d][i] of interval i: f(kGeluTableLo + (i + t) w) = c0 + t (c1 + t (c2 + t c3)),
// w = -kGeluTableLo / 32.
inline constexpr float kGeluCdfTable[4][32] = {
    {1.071310951e-08f, 2.896682716e-08f, 7.602609031e-08f, 1.936968772e-07f,
     4.790759931e-07f, 1.150359594e-06f, 2.681871820e-06f, 6.070826203e-06f,
     1.334430453e-05f, 2.848513941e-05f, 5.905469516e-05f, 1.189179311e-04f,
     2.326186368e-04f, 4.420773184e-04f, 8.163307793e-04f, 1.464914065e-03f,
     2.555094426e-03f, 4.332405981e-03f, 7.142765447e-03f, 1.145292167e-02f,
     1.786438562e-02f, 2.711466327e-02f, 4.005916789e-02f, 5.762826651e-02f,
     8.075674623e-02f, 1.102877334e-01f, 1.468592137e-01f, 1.907871217e-01f,
     2.419638187e-01f, 2.997917235e-01f, 3.631694317e-01f, 4.305398464e-01f},
    {1.095960922e-08f, 2.871690619e-08f, 7.298439186e-08f, 1.799158298e-07f,
     4.301829222e-07f, 9.976514548e-07f, 2.244108373e-06f, 4.896049631e-06f,
     1.036054255e-05f, 2.126432446e-05f, 4.233026630e-05f, 8.172945672e-05f,
     1.530496811e-04f, 2.779780771e-04f, 4.896786413e-04f, 8.366280817e-04f,
     1.386349322e-03f, 2.228077501e-03f, 3.472991055e-03f, 5.250386894e-03f,
     7.698245812e-03f, 1.094721723e-02f, 1.509822160e-02f, 2.019559965e-02f,
     2.619964443e-02f, 3.296404704e-02f, 4.022454470e-02f, 4.760429263e-02f,
     5.463921651e-02f, 6.082263961e-02f, 6.566403806e-02f, 6.875283271e-02f},
    {4.628548655e-09f, 1.190393562e-08f, 2.963976264e-08f, 7.144691239e-08f,
     1.667241349e-07f, 3.766139969e-07f, 8.234722486e-07f, 1.742695645e-06f,
     3.569218961e-06f, 7.073844245e-06f, 1.356473331e-05f, 2.516363747e-05f,
     4.515054752e-05f, 7.834062853e-05f, 1.314121764e-04f, 2.130483190e-04f,
     3.337016969e-04f, 5.047640880e-04f, 7.369523519e-04f, 1.037838752e-03f,
     1.408669516e-03f, 1.840910991e-03f, 2.313276753e-03f, 2.790209139e-03f,
     3.222798929e-03f, 3.552834038e-03f, 3.720038570e-03f, 3.671718994e-03f,
     3.373177489e-03f, 2.816661261e-03f, 2.026554197e-03f, 1.059111906e-03f},
    {2.671119104e-09f, 6.450594725e-09f, 1.507230607e-08f, 3.406851334e-08f,
     7.447842165e-08f, 1.574381940e-07f, 3.217190852e-07f, 6.353294566e-07f,
     1.212062102e-06f, 2.232947736e-06f, 3.970582839e-06f, 6.810967079e-06f,
     1.126293319e-05f, 1.794035416e-05f, 2.749893065e-05f, 4.051046562e-05f,
     5.726628660e-05f, 7.752035890e-05f, 1.002107747e-04f, 1.232305658e-04f,
     1.433444413e-04f, 1.563521364e-04f, 1.575699134e-04f, 1.426317467e-04f,
     1.085120311e-04f, 5.456654981e-05f, -1.668454206e-05f, -9.931067325e-05f,
     -1.844523649e-04f, -2.615500416e-04f, -3.201292129e-04f, -3.517661535e-04f},
};
inline constexpr float kGeluPdfTable[4][32] = {
    {6.180410139e-08f, 1.621804842e-07f, 4.127404054e-07f, 1.018714897e-06f,
     2.438517413e-06f, 5.661046998e-06f, 1.274575607e-05f, 2.783124000e-05f,
     5.893831985e-05f, 1.210490518e-04f, 2.411146415e-04f, 4.657839017e-04f,
     8.726582746e-04f, 1.585633727e-03f, 2.794219879e-03f, 4.775484558e-03f,
     7.915411144e-03f, 1.272415277e-02f, 1.983734779e-02f, 2.999423631e-02f,
     4.398367181e-02f, 6.255250424e-02f, 8.627749979e-02f, 1.154117435e-01f,
     1.497276872e-01f, 1.883883029e-01f, 2.298822701e-01f, 2.720550299e-01f,
     3.122538626e-01f, 3.475830555e-01f, 3.752400577e-01f, 3.928796649e-01f},
    {6.128125563e-08f, 1.555661271e-07f, 3.826478121e-07f, 9.118992352e-07f,
     2.105335852e-06f, 4.708500910e-06f, 1.019967749e-05f, 2.139850767e-05f,
     4.347294453e-05f, 8.551292558e-05f, 1.628367027e-04f, 3.001249861e-04f,
     5.352931330e-04f, 9.236720507e-04f, 1.541562378e-03f, 2.487608697e-03f,
     3.879860975e-03f, 5.846114829e-03f, 8.505491540e-03f, 1.194054075e-02f,
     1.616157778e-02f, 2.106824517e-02f, 2.641673014e-02f, 3.180344030e-02f,
     3.667603061e-02f, 4.037930071e-02f, 4.223648086e-02f, 4.165719077e-02f,
     3.825367242e-02f, 3.194060922e-02f, 2.299301326e-02f, 1.204332151e-02f},
    {2.541222699e-08f, 6.315487866e-08f, 1.517638850e-07f, 3.525884154e-07f,
     7.918376355e-07f, 1.718665430e-06f, 3.604447102e-06f, 7.302424819e-06f,
     1.428718952e-05f, 2.698517710e-05f, 4.918385093e-05f, 8.646187780e-05f,
     1.465127134e-04f, 2.391466551e-04f, 3.756743099e-04f, 5.673413398e-04f,
     8.225562051e-04f, 1.142886002e-03f, 1.518214820e-03f, 1.922013354e-03f,
     2.308221767e-03f, 2.611567033e-03f, 2.752957400e-03f, 2.650732407e-03f,
     2.237010747e-03f, 1.476473524e-03f, 3.832278016e-04f, -9.693825850e-04f,
     -2.450422617e-03f, -3.886524355e-03f, -5.089083686e-03f, -5.888328422e-03f},
    {1.370837399e-08f, 3.189209608e-08f, 7.166951121e-08f, 1.555201834e-07f,
     3.257350158e-07f, 6.582102401e-07f, 1.282481549e-06f, 2.407943157e-06f,
     4.353310487e-06f, 7.571357401e-06f, 1.265384617e-05f, 2.029372627e-05f,
     3.117629967e-05f, 4.577339860e-05f, 6.403089355e-05f, 8.497478120e-05f,
     1.063134987e-04f, 1.241734572e-04f, 1.331483072e-04f, 1.268393680e-04f,
     9.898741700e-05f, 4.513362001e-05f, -3.547445522e-05f, -1.382320479e-04f,
     -2.523997100e-04f, -3.617461480e-04f, -4.468583793e-04f, -4.888830008e-04f,
     -4.739327997e-04f, -3.970139369e-04f, -2.642739273e-04f, -9.272432362e-05f},
};

#define MMFAST_GELU_TABLE_TARGET __attribute__((target("avx512f"), always_inline))

// Both tables as pairs of registers: built once per epilogue call, kept in registers by its loop.
struct GeluErfTable {
  __m512 cdf[4][2], pdf[4][2];
  MMFAST_GELU_TABLE_TARGET GeluErfTable() {
    for (int d = 0; d < 4; ++d) {
      for (int h = 0; h < 2; ++h) {
        cdf[d][h] = _mm512_loadu_ps(kGeluCdfTable[d] + 16 * h);
        pdf[d][h] = _mm512_loadu_ps(kGeluPdfTable[d] + 16 * h);
      }
    }
  }
};

// y = -|x|, its interval and t; `inside`: y >= kGeluTableLo, or x is NaN (its lanes then
// evaluate to NaN).
struct GeluTablePoint {
  __m512 y, t;
  __m512i interval;
  __mmask16 inside;
  MMFAST_GELU_TABLE_TARGET explicit GeluTablePoint(__m512 x) {
    y = _mm512_or_ps(x, _mm512_set1_ps(-0.0f));
    const __m512 u = _mm512_fmadd_ps(y, _mm512_set1_ps(kGeluTableIntervals / -kGeluTableLo),
                                     _mm512_set1_ps(kGeluTableIntervals));  // in [0, 32]
    inside = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_NLT_UQ);
    interval = _mm512_min_epi32(_mm512_cvttps_epi32(u), _mm512_set1_epi32(kGeluTableIntervals - 1));
    t = _mm512_sub_ps(u, _mm512_cvtepi32_ps(interval));
  }
  MMFAST_GELU_TABLE_TARGET __m512 eval(const __m512 (&c)[4][2]) const {
    const auto coef = [&](int d) { return _mm512_permutex2var_ps(c[d][0], interval, c[d][1]); };
    __m512 r = _mm512_fmadd_ps(coef(3), t, coef(2));
    r = _mm512_fmadd_ps(r, t, coef(1));
    return _mm512_fmadd_ps(r, t, coef(0));
  }
};

MMFAST_GELU_TABLE_TARGET inline __m512 gelu_erf_table(__m512 x, const GeluErfTable& tab) {
  const GeluTablePoint p(x);
  const __m512 neg = _mm512_maskz_mul_ps(p.inside, p.y, p.eval(tab.cdf));
  return _mm512_add_ps(_mm512_max_ps(_mm512_setzero_ps(), x), neg);  // max: a NaN x stays NaN
}

MMFAST_GELU_TABLE_TARGET inline void gelu_and_grad_erf_table(__m512 x, const GeluErfTable& tab,
                                                             __m512& act, __m512& d) {
  const GeluTablePoint p(x);
  const __m512 cdf = p.eval(tab.cdf);
  act = _mm512_add_ps(_mm512_max_ps(_mm512_setzero_ps(), x),
                      _mm512_maskz_mul_ps(p.inside, p.y, cdf));
  const __m512 q = _mm512_maskz_fmadd_ps(p.inside, p.y, p.eval(tab.pdf), cdf);
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  d = _mm512_mask_sub_ps(q, positive, _mm512_set1_ps(1.0f), q);
}

#undef MMFAST_GELU_TABLE_TARGET

}  // namespace mmfast::cpu::CPU_CAPABILITY
