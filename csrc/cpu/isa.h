// Run-time choice among the per-ISA builds of csrc/cpu/vec/*.cpp (see setup.py).
#pragma once

namespace mmfast::cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// Best ISA this CPU supports, capped by the environment variable MMFAST_CPU_ISA
// (default|avx2|avx512), read once. The cap lets tests run every build on one machine.
Isa active_isa();
const char* isa_name(Isa isa);

// Whether the CPU has AVX512's bfloat16 dot products (avx512_bf16), and the AVX512 build is
// active: the condition for packed_gemm's bfloat16 tile kernel (vdpbf16ps).
bool bf16_dot_products();

// Picks the build of one kernel that matches active_isa().
template <typename Fn>
Fn pick_isa(Fn generic, Fn avx2, Fn avx512) {
  switch (active_isa()) {
    case Isa::AVX512: return avx512;
    case Isa::AVX2: return avx2;
    default: return generic;
  }
}

}  // namespace mmfast::cpu

// Declares `decl` in each ISA namespace; the definition lives in csrc/cpu/vec/.
#define MMFAST_DECLARE_ISA_KERNEL(decl)     \
  namespace mmfast::cpu::DEFAULT { decl; }  \
  namespace mmfast::cpu::AVX2 { decl; }     \
  namespace mmfast::cpu::AVX512 { decl; }

#define MMFAST_PICK_ISA(fn) \
  ::mmfast::cpu::pick_isa(&::mmfast::cpu::DEFAULT::fn, &::mmfast::cpu::AVX2::fn, &::mmfast::cpu::AVX512::fn)
