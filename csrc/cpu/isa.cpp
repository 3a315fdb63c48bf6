#include "cpu/isa.h"

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

bool bf16_dot_products() {
  static const bool has = [] {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    return active_isa() == Isa::AVX512 && __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
  }();
  return has;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace mmfast::cpu
