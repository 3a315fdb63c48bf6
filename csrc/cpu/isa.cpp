#include "cpu/isa.h"

#include <ATen/cpu/Utils.h>
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

enum class Bf16Gemm { kTiles, kAtenAmx, kAtenNoBf16 };

Bf16Gemm bf16_gemm_choice() {
  static const Bf16Gemm choice = [] {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (active_isa() != Isa::AVX512 || !__builtin_cpu_supports("avx512bf16")) {
      return Bf16Gemm::kAtenNoBf16;
    }
    // cpuinfo's flags, as ATen reads them.
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto amx = caps.find("amx_bf16");
    if (amx != caps.end() && amx->second.isBool() && amx->second.toBool()) {
      return Bf16Gemm::kAtenAmx;
    }
    return Bf16Gemm::kTiles;
#else
    return Bf16Gemm::kAtenNoBf16;
#endif
  }();
  return choice;
}

}  // namespace

bool bf16_tile_gemm() { return bf16_gemm_choice() == Bf16Gemm::kTiles; }

const char* bf16_gemm_path() {
  switch (bf16_gemm_choice()) {
    case Bf16Gemm::kTiles: return "vdpbf16ps tiles (avx512_bf16, no AMX)";
    case Bf16Gemm::kAtenAmx: return "ATen (AMX-BF16)";
    default: return "ATen (no avx512_bf16 in the active build)";
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
