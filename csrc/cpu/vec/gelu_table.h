// GELU (exact or tanh form) and its derivative by piecewise cubics, for the AVX512 build's
// elementwise loops (gelu.h's GeluForm: the bfloat16 tile GEMMs' epilogues, bias_gelu). Both
// forms are x S(x) with a gate S (exact: Phi, the normal CDF; tanh: 0.5 (1 + tanh(k (x +
// c x^3)))) for which S(-x) = 1 - S(x), so with y = -|x|:
//
//   gelu(x)  = x (x > 0 ? 1 - S(y) : S(y))
//   gelu'(x) = x > 0 ? 1 - q : q,        q = S(y) + y S'(y)
//
// S and S' are tabulated on y in [kGeluTableLo, 0] as 32 cubics each (tools/gelu_table.py
// fits and prints them); below kGeluTableLo both gates are under 1.1e-8 and S, S' are taken as
// 0. Against float64 on every finite bfloat16 input, in float32: |gelu error| <= 2.4e-7 and
// |gelu' error| <= 3.8e-7, either form (gelu.h's Abramowitz-Stegun erf: 4.5e-7 for gelu); on
// 4M float32 points over [-6.5, 6.5]: 3.9e-7 and 4.2e-7, the output's own rounding included.
// Rounded to bfloat16, wherever |gelu| > 1e-6 (~21500 inputs), the exact form's gelu differs
// from the correctly rounded value on 1 input and its gelu' on none (gelu.h: 19 and 8; ATen's
// bfloat16 F.gelu: 159); the tanh form's on 1 and 3 (ATen: 14). Each by one unit in the last
// place (test_projector.py checks every input through the op).
//
// Why: gelu.h costs an exp and a division per vector; here each function costs four
// two-register table lookups (vpermt2ps) and three fmas. The exact GELU took ~1.3% of SigLIP's
// bfloat16 forward with gelu.h and ~0.5% with these (timing script).
#pragma once

#include <immintrin.h>

namespace mmfast::cpu::CPU_CAPABILITY {

constexpr float kGeluTableLo = -5.6f;
constexpr int kGeluTableIntervals = 32;

// Coefficients c[d][i] of interval i: f(kGeluTableLo + (i + t) w) = c0 + t (c1 + t (c2 + t c3)),
// w = -kGeluTableLo / 32; f is Phi, phi, the tanh form's gate and its derivative.
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
inline constexpr float kGeluTanhGateTable[4][32] = {
    {4.741950721e-10f, 1.958241347e-09f, 7.530784885e-09f, 2.703240298e-08f,
     9.078271290e-08f, 2.858893708e-07f, 8.461946663e-07f, 2.359499831e-06f,
     6.212205790e-06f, 1.547909051e-05f, 3.658595233e-05f, 8.221385360e-05f,
     1.760454325e-04f, 3.600250930e-04f, 7.047506515e-04f, 1.323368284e-03f,
     2.388854977e-03f, 4.153829999e-03f, 6.971053313e-03f, 1.131161489e-02f,
     1.777663082e-02f, 2.709720843e-02f, 4.011693224e-02f, 5.775160715e-02f,
     8.092289418e-02f, 1.104664803e-01f, 1.470211297e-01f, 1.909113973e-01f,
     2.420428246e-01f, 2.998308539e-01f, 3.631823957e-01f, 4.305415750e-01f},
    {7.210245734e-10f, 2.806232136e-09f, 1.017519935e-08f, 3.444394281e-08f,
     1.090813626e-07f, 3.238807267e-07f, 9.035588278e-07f, 2.373640427e-06f,
     5.884650818e-06f, 1.379883906e-05f, 3.067303987e-05f, 6.478065916e-05f,
     1.302842575e-04f, 2.500789124e-04f, 4.591667093e-04f, 8.082021959e-04f,
     1.366593642e-03f, 2.224290045e-03f, 3.491172334e-03f, 5.292849150e-03f,
     7.761695422e-03f, 1.102228835e-02f, 1.517111715e-02f, 2.025170624e-02f,
     2.622803673e-02f, 3.296115994e-02f, 4.019536823e-02f, 4.756046087e-02f,
     5.459468067e-02f, 6.078869104e-02f, 6.564567983e-02f, 6.874769926e-02f},
    {3.422468142e-10f, 1.345843326e-09f, 4.871724357e-09f, 1.630019320e-08f,
     5.059557751e-08f, 1.461812786e-07f, 3.943502520e-07f, 9.962440117e-07f,
     2.363600743e-06f, 5.280834102e-06f, 1.114086535e-05f, 2.225203571e-05f,
     4.218719550e-05f, 7.611184992e-05f, 1.309935906e-04f, 2.155691182e-04f,
     3.399362322e-04f, 5.146478652e-04f, 7.492175209e-04f, 1.050003688e-03f,
     1.417542808e-03f, 1.843571430e-03f, 2.308225492e-03f, 2.778198803e-03f,
     3.206870286e-03f, 3.537392477e-03f, 3.709272714e-03f, 3.668042365e-03f,
     3.376397770e-03f, 2.824221039e-03f, 2.034655539e-03f, 1.064177253e-03f},
    {4.227767580e-10f, 1.426152307e-09f, 4.469635329e-09f, 1.304259456e-08f,
     3.551217631e-08f, 9.041698945e-08f, 2.157367902e-07f, 4.834449214e-07f,
     1.019698857e-06f, 2.028889867e-06f, 3.816537173e-06f, 6.802425560e-06f,
     1.151281140e-05f, 1.854036236e-05f, 2.846339521e-05f, 4.172135232e-05f,
     5.845005580e-05f, 7.828747766e-05f, 1.001701821e-04f, 1.221550192e-04f,
     1.413225691e-04f, 1.538433135e-04f, 1.553007896e-04f, 1.413423597e-04f,
     1.086478878e-04f, 5.606550985e-05f, -1.438951404e-05f, -9.706107812e-05f,
     -1.830196852e-04f, -2.613466349e-04f, -3.210925788e-04f, -3.534257703e-04f},
};
inline constexpr float kGeluTanhGateGradTable[4][32] = {
    {3.941432958e-09f, 1.546654538e-08f, 5.646407075e-08f, 1.922158077e-07f,
     6.115641895e-07f, 1.822759259e-06f, 5.100941053e-06f, 1.343401891e-05f,
     3.337330782e-05f, 7.838546298e-05f, 1.744704205e-04f, 3.688636352e-04f,
     7.424602518e-04f, 1.426076167e-03f, 2.619745908e-03f, 4.612998106e-03f,
     7.802589796e-03f, 1.270272583e-02f, 1.994158141e-02f, 3.023725562e-02f,
     4.434652627e-02f, 6.298155338e-02f, 8.669383079e-02f, 1.157319024e-01f,
     1.498894095e-01f, 1.883713752e-01f, 2.297153920e-01f, 2.718047202e-01f,
     3.119997680e-01f, 3.473895490e-01f, 3.751354814e-01f, 3.928504586e-01f},
    {5.747672560e-09f, 2.121788967e-08f, 7.287742676e-08f, 2.333756299e-07f,
     6.982219816e-07f, 1.955796733e-06f, 5.140143458e-06f, 1.270251050e-05f,
     2.958151526e-05f, 6.506290083e-05f, 1.354580745e-04f, 2.675588767e-04f,
     5.025322898e-04f, 8.995388052e-04f, 1.537971199e-03f, 2.516923938e-03f,
     3.950399347e-03f, 5.956877023e-03f, 8.642246947e-03f, 1.207580138e-02f,
     1.626017503e-02f, 2.109804563e-02f, 2.636119723e-02f, 3.167069331e-02f,
     3.649930656e-02f, 4.020698741e-02f, 4.211492464e-02f, 4.161356017e-02f,
     3.828658909e-02f, 3.202244267e-02f, 2.308203280e-02f, 1.209983509e-02f},
    {2.761800122e-09f, 1.020611418e-08f, 3.469881449e-08f, 1.089438797e-07f,
     3.169596994e-07f, 8.571936405e-07f, 2.161245220e-06f, 5.094428616e-06f,
     1.125709696e-05f, 2.337970000e-05f, 4.575640560e-05f, 8.459851233e-05f,
     1.481297368e-04f, 2.462177072e-04f, 3.893599787e-04f, 5.869194865e-04f,
     8.446110296e-04f, 1.161355991e-03f, 1.525752945e-03f, 1.912603970e-03f,
     2.280250657e-03f, 2.569920151e-03f, 2.708695130e-03f, 2.617741004e-03f,
     2.226589015e-03f, 1.492251758e-03f, 4.191216722e-04f, -9.268482099e-04f,
     -2.416477306e-03f, -3.872087225e-03f, -5.097096786e-03f, -5.913564935e-03f},
    {3.028024054e-09f, 9.606158535e-09f, 2.825477274e-08f, 7.720657180e-08f,
     1.963813503e-07f, 4.658951411e-07f, 1.032932914e-06f, 2.144380915e-06f,
     4.176593848e-06f, 7.646579434e-06f, 1.318405157e-05f, 2.144527753e-05f,
     3.295979332e-05f, 4.791775791e-05f, 6.592268619e-05f, 8.574494859e-05f,
     1.051152794e-04f, 1.206030865e-04f, 1.276446856e-04f, 1.208252434e-04f,
     9.455557301e-05f, 4.427060776e-05f, -3.185344030e-05f, -1.309459331e-04f,
     -2.439029922e-04f, -3.551690024e-04f, -4.446107487e-04f, -4.915770260e-04f,
     -4.802147159e-04f, -4.043101217e-04f, -2.699125034e-04f, -9.482430323e-05f},
};

#define MMFAST_GELU_TABLE_TARGET __attribute__((target("avx512f"), always_inline))

// One form's tables as pairs of registers: built once per epilogue call, kept in registers by
// its loop.
struct GeluTable {
  __m512 gate[4][2], grad[4][2];
  MMFAST_GELU_TABLE_TARGET explicit GeluTable(bool tanh_form) {
    const auto& gate_c = tanh_form ? kGeluTanhGateTable : kGeluCdfTable;
    const auto& grad_c = tanh_form ? kGeluTanhGateGradTable : kGeluPdfTable;
    for (int d = 0; d < 4; ++d) {
      for (int h = 0; h < 2; ++h) {
        gate[d][h] = _mm512_loadu_ps(gate_c[d] + 16 * h);
        grad[d][h] = _mm512_loadu_ps(grad_c[d] + 16 * h);
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

// gelu(x) = x (x > 0 ? 1 - S(y) : S(y)), gelu'(x) = x > 0 ? 1 - q : q with q = S(y) + y S'(y).
// As for x Phi(x) in float arithmetic, x = -inf gives gelu NaN (-inf * 0), infinite x give
// gelu' NaN, and a NaN x gives NaN.
MMFAST_GELU_TABLE_TARGET inline __m512 gelu_by_table(__m512 x, const GeluTable& tab) {
  const GeluTablePoint p(x);
  const __m512 gate = _mm512_maskz_mov_ps(p.inside, p.eval(tab.gate));
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mul_ps(x, _mm512_mask_sub_ps(gate, positive, _mm512_set1_ps(1.0f), gate));
}

MMFAST_GELU_TABLE_TARGET inline void gelu_and_grad_by_table(__m512 x, const GeluTable& tab,
                                                            __m512& act, __m512& d) {
  const GeluTablePoint p(x);
  const __m512 gate = _mm512_maskz_mov_ps(p.inside, p.eval(tab.gate));
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 one = _mm512_set1_ps(1.0f);
  act = _mm512_mul_ps(x, _mm512_mask_sub_ps(gate, positive, one, gate));
  const __m512 q = _mm512_fmadd_ps(p.y, _mm512_maskz_mov_ps(p.inside, p.eval(tab.grad)), gate);
  d = _mm512_mask_sub_ps(q, positive, one, q);
}

// gelu' alone: the compiler drops the unused activation.
MMFAST_GELU_TABLE_TARGET inline __m512 gelu_grad_by_table(__m512 x, const GeluTable& tab) {
  __m512 act, d;
  gelu_and_grad_by_table(x, tab, act, d);
  return d;
}

#undef MMFAST_GELU_TABLE_TARGET

}  // namespace mmfast::cpu::CPU_CAPABILITY
