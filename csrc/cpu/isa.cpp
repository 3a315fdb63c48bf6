#include "cpu/isa.h"

#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace mmfast::cpu {

namespace {

Isa supported_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::AVX2;
  }
#endif
  return Isa::DEFAULT;
}

Isa isa_cap() {
  const char* env = std::getenv("MMFAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return Isa::AVX512;
  const std::string v(env);
  if (v == "default") return Isa::DEFAULT;
  if (v == "avx2") return Isa::AVX2;
  if (v == "avx512") return Isa::AVX512;
  TORCH_CHECK(false, "MMFAST_CPU_ISA must be one of default, avx2, avx512; got '", v, "'");
}

}  // namespace

Isa active_isa() {
  static const Isa isa = [] {
    const Isa best = supported_isa();
    const Isa cap = isa_cap();
    return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
  }();
  return isa;
}

namespace {

enum class Bf16Gemm { kTiles, kTilesForced, kAtenAmx, kAtenForced, kAtenNoBf16 };

// MMFAST_CPU_BF16_GEMM: unset or "auto" (the rule of bf16_tile_gemm in isa.h), "tiles" (the
// tiles wherever they can run, AMX CPUs included: lets the tests cover them there) or "aten".
Bf16Gemm bf16_gemm_choice() {
  static const Bf16Gemm choice = [] {
    const char* env = std::getenv("MMFAST_CPU_BF16_GEMM");
    const std::string want = env == nullptr ? "" : env;
    TORCH_CHECK(want.empty() || want == "auto" || want == "tiles" || want == "aten",
                "MMFAST_CPU_BF16_GEMM must be one of auto, tiles, aten; got '", want, "'");
    bool tiles_run = false, amx = false;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    tiles_run = active_isa() == Isa::AVX512 && __builtin_cpu_supports("avx512bf16");
    // cpuinfo's flags, as ATen reads them.
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto flag = caps.find("amx_bf16");
    amx = flag != caps.end() && flag->second.isBool() && flag->second.toBool();
#endif
    if (want == "aten") return Bf16Gemm::kAtenForced;
    if (want == "tiles") {
      TORCH_CHECK(tiles_run, "MMFAST_CPU_BF16_GEMM=tiles: the vdpbf16ps tiles need the AVX512 "
                  "build active and a CPU with avx512_bf16 (MMFAST_CPU_ISA: ",
                  isa_name(active_isa()), ")");
      return amx ? Bf16Gemm::kTilesForced : Bf16Gemm::kTiles;
    }
    if (!tiles_run) return Bf16Gemm::kAtenNoBf16;
    return amx ? Bf16Gemm::kAtenAmx : Bf16Gemm::kTiles;
  }();
  return choice;
}

}  // namespace

bool bf16_tile_gemm() {
  const auto c = bf16_gemm_choice();
  return c == Bf16Gemm::kTiles || c == Bf16Gemm::kTilesForced;
}

const char* bf16_gemm_path() {
  switch (bf16_gemm_choice()) {
    case Bf16Gemm::kTiles: return "vdpbf16ps tiles (avx512_bf16, no AMX)";
    case Bf16Gemm::kTilesForced:
      return "vdpbf16ps tiles (MMFAST_CPU_BF16_GEMM=tiles; AMX-BF16 here)";
    case Bf16Gemm::kAtenAmx: return "ATen (AMX-BF16)";
    case Bf16Gemm::kAtenForced: return "ATen (MMFAST_CPU_BF16_GEMM=aten)";
    default: return "ATen (no avx512_bf16 in the active build)";
  }
}

namespace {

enum class F32Gemm { kOnednn, kOnednnForced, kMklIntel, kMklForced };

F32Gemm f32_gemm_choice() {
  static const F32Gemm choice = [] {
    const char* env = std::getenv("MMFAST_CPU_F32_GEMM");
    const std::string want = env == nullptr ? "" : env;
    TORCH_CHECK(want.empty() || want == "auto" || want == "onednn" || want == "mkl",
                "MMFAST_CPU_F32_GEMM must be one of auto, onednn, mkl; got '", want, "'");
    if (want == "onednn") return F32Gemm::kOnednnForced;
    if (want == "mkl") return F32Gemm::kMklForced;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return F32Gemm::kMklIntel;
#endif
    return F32Gemm::kOnednn;
  }();
  return choice;
}

}  // namespace

bool f32_gemm_onednn() {
  const auto c = f32_gemm_choice();
  return c == F32Gemm::kOnednn || c == F32Gemm::kOnednnForced;
}

const char* f32_gemm_path() {
  switch (f32_gemm_choice()) {
    case F32Gemm::kOnednn: return "oneDNN linear (not an Intel CPU)";
    case F32Gemm::kOnednnForced: return "oneDNN linear (MMFAST_CPU_F32_GEMM=onednn)";
    case F32Gemm::kMklIntel: return "ATen mm (MKL; Intel CPU)";
    default: return "ATen mm (MMFAST_CPU_F32_GEMM=mkl)";
  }
}

namespace {

enum class XattnBf16 { kBrgemmAmx, kBrgemmForced, kWiden, kWidenForced };

XattnBf16 xattn_bf16_choice() {
  static const XattnBf16 choice = [] {
    const char* env = std::getenv("MMFAST_CPU_XATTN_BF16");
    const std::string want = env == nullptr ? "" : env;
    TORCH_CHECK(want.empty() || want == "auto" || want == "brgemm" || want == "widen",
                "MMFAST_CPU_XATTN_BF16 must be one of auto, brgemm, widen; got '", want, "'");
    if (want == "brgemm") return XattnBf16::kBrgemmForced;
    if (want == "widen") return XattnBf16::kWidenForced;
    return at::native::cpublas::could_pack(at::kBFloat16) ? XattnBf16::kBrgemmAmx
                                                           : XattnBf16::kWiden;
  }();
  return choice;
}

}  // namespace

bool xattn_bf16_brgemm() {
  const auto c = xattn_bf16_choice();
  return c == XattnBf16::kBrgemmAmx || c == XattnBf16::kBrgemmForced;
}

const char* xattn_bf16_path() {
  switch (xattn_bf16_choice()) {
    case XattnBf16::kBrgemmAmx: return "bfloat16 brgemm (AMX)";
    case XattnBf16::kBrgemmForced: return "bfloat16 brgemm (MMFAST_CPU_XATTN_BF16=brgemm)";
    case XattnBf16::kWiden: return "float32 GEMMs on widened tiles (no AMX)";
    default: return "float32 GEMMs on widened tiles (MMFAST_CPU_XATTN_BF16=widen)";
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace mmfast::cpu
