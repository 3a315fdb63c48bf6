// Run-time choice among the per-ISA builds of csrc/cpu/vec/*.cpp (see setup.py).
#pragma once

namespace mmfast::cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// Best ISA this CPU supports, capped by the environment variable MMFAST_CPU_ISA
// (default|avx2|avx512), read once. The cap lets tests run every build on one machine.
Isa active_isa();
const char* isa_name(Isa isa);

// The projector's GEMMs run on fma_gemm (csrc/cpu/vec/fma_gemm.h: our AVX2 FMA tiles, float32
// sums) by default in every dtype where the AVX2 build is active: a CPU with AVX2 and FMA but no
// AVX-512 (or MMFAST_CPU_ISA=avx2). There oneDNN has no bfloat16 or float16 kernels (ATen's
// GEMMs in those dtypes are scalar loops), and in float32 fma_gemm with its fused epilogues
// ran every projector case of a full suite run faster than eager's MKL (README).

// Whether bfloat16 GEMMs of the projector run on packed_gemm (our tile kernels) rather than
// ATen's: where the AVX512 build is active and the CPU has avx512_bf16. The tile kernel is AMX's
// where the CPU has AMX-BF16 (bf16_gemm_amx), vdpbf16ps's elsewhere (Zen 4). Where the AVX2
// build is active they run on fma_gemm (bf16_gemm_fma); in the generic build on a CPU without
// AVX-512 (no oneDNN bfloat16 kernels: ATen's bfloat16 GEMM is a scalar loop) they are float32
// GEMMs on widened copies of the operands (bf16_gemm_widened).
// MMFAST_CPU_BF16_GEMM=amx|tiles|aten|widen|fma (read once) forces AMX, vdpbf16ps, ATen,
// widening or fma_gemm.
bool bf16_tile_gemm();
bool bf16_gemm_amx();
bool bf16_gemm_widened();
bool bf16_gemm_fma();

// Why bf16_tile_gemm() is true or false, in words (the benchmark table prints it).
const char* bf16_gemm_path();

// Whether the projector's float16 GEMMs run on fma_gemm (where the AVX2 build is active) or
// are float32 GEMMs on widened operands (other CPUs without avx512_fp16, where oneDNN has no
// float16 kernels and ATen's float16 GEMM is a scalar loop); else ATen's. f16_gemm_path() says
// which, in words. MMFAST_CPU_F16_GEMM=aten|widen|fma (read once) forces one.
bool f16_gemm_widened();
bool f16_gemm_fma();
const char* f16_gemm_path();

// Whether the projector's float32 GEMMs go through oneDNN's linear rather than ATen's mm (MKL):
// on every CPU but Intel's, where MKL's sgemm is Intel's own and oneDNN gains nothing while
// the backward's transposes for it cost (measurements in projector.cpp). MKL's sgemm ran 9-12%
// below oneDNN on Zen 4. Where the AVX2 build is active they run on fma_gemm (f32_gemm_fma).
// MMFAST_CPU_F32_GEMM=auto|onednn|mkl|fma (read once) overrides the rule.
bool f32_gemm_onednn();
bool f32_gemm_fma();

// f32_gemm_onednn()'s choice and why, in words (the benchmark table prints it).
const char* f32_gemm_path();

// Whether cross_attention's bfloat16 forward runs its tile GEMMs on bfloat16 operands through
// ATen's brgemm (AMX tiles) rather than in float32 on widened copies: where the CPU has AMX
// (cpublas::could_pack), on which SDPA's bfloat16 forward otherwise ran up to 3x faster than
// ours. Without AMX the float32 GEMMs are faster. MMFAST_CPU_XATTN_BF16=auto|brgemm|widen
// (read once) overrides.
bool xattn_bf16_brgemm();
const char* xattn_bf16_path();

// The approximate GEMM of bipartite_merge's first pass (csrc/cpu/bipartite_merge.cpp), all
// through ATen's brgemm: int8 where the AVX512 build is active and the CPU has VNNI; bfloat16
// where oneDNN's bfloat16 ukernel runs (a CPU with AVX-512: oneDNN's avx512_core; elsewhere
// ATen raises an error for it); else float32. MMFAST_CPU_MERGE_GEMM=int8|bf16|f32 (read
// once) overrides where the kernel can run.
enum class MergeGemm : int { kInt8, kBFloat16, kFloat32 };
MergeGemm merge_gemm();
const char* merge_gemm_path();
// Whether ATen's bfloat16 brgemm on VNNI-packed operands runs on this CPU.
bool bf16_brgemm_runs();

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
