#include "cpu/isa.h"

#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// A kernel path chosen once per process: whether it is taken, and why, in words.
struct PathChoice {
  bool taken;
  const char* why;
};

// A choice among several kernels, and why, in words.
template <typename Kernel>
struct KernelChoice {
  Kernel kernel;
  const char* why;
};

// The value of the environment variable `variable` overriding a path choice: "auto" when unset
// or empty, else one of `choices` (a clear error otherwise).
std::string path_override(const char* variable, std::initializer_list<const char*> choices) {
  const char* env = std::getenv(variable);
  const std::string want = env == nullptr || *env == '\0' ? "auto" : env;
  std::string listed = "auto";
  for (const char* c : choices) {
    if (want == c) return want;
    listed += std::string(", ") + c;
  }
  TORCH_CHECK(want == "auto", variable, " must be one of ", listed, "; got '", want, "'");
  return want;
}

// A CPU flag as cpuinfo reports it (ATen's view of the CPU).
bool cpu_flag(const std::unordered_map<std::string, c10::IValue>& caps, const char* name) {
  const auto flag = caps.find(name);
  return flag != caps.end() && flag->second.isBool() && flag->second.toBool();
}

// Asks Linux for the AMX tile state (XTILEDATA), which a process must request before its first
// tile instruction; true when granted (oneDNN asks too, and asking twice is harmless).
bool amx_tile_state_granted() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

enum class Bf16Gemm : int { kAten, kWiden, kVnni, kAmx, kFma };

// Whether fma_gemm can run: its AVX2 build (or the AVX512 one) is active.
bool fma_gemm_runs() { return active_isa() != Isa::DEFAULT; }

void check_fma_gemm_runs(const char* variable) {
  TORCH_CHECK(fma_gemm_runs(), variable, "=fma: fma_gemm needs a CPU with AVX2 and FMA and the "
              "AVX2 or AVX512 build active (MMFAST_CPU_ISA: ", isa_name(active_isa()), ")");
}

using Bf16GemmChoice = KernelChoice<Bf16Gemm>;

// The projector's bfloat16 GEMMs: packed_gemm on AMX tiles where the CPU has AMX-BF16, on
// vdpbf16ps tiles where it has avx512_bf16 only; fma_gemm where the AVX2 build is active; else
// ATen's where it runs oneDNN's bfloat16 kernels (AVX-512 CPUs), and float32 GEMMs on widened
// operands where ATen's bfloat16 GEMM is a scalar loop (no AVX-512: 0.65-8 GFLOP/s on a Zen 3).
// MMFAST_CPU_BF16_GEMM=amx|tiles|aten|widen|fma forces one (amx, tiles and fma where they can
// run: lets the tests cover every kernel on one CPU).
Bf16GemmChoice bf16_gemm_choice() {
  static const Bf16GemmChoice choice = [] {
    const std::string want =
        path_override("MMFAST_CPU_BF16_GEMM", {"amx", "tiles", "aten", "widen", "fma"});
    bool tiles_run = false, amx_cpu = false, amx = false;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    tiles_run = active_isa() == Isa::AVX512 && __builtin_cpu_supports("avx512bf16");
    // cpuinfo's flags, as ATen reads them.
    amx_cpu = cpu_flag(at::cpu::get_cpu_capabilities(), "amx_bf16");
    amx = tiles_run && amx_cpu && amx_tile_state_granted();
#endif
    if (want == "aten") {
      return Bf16GemmChoice{Bf16Gemm::kAten, "ATen (MMFAST_CPU_BF16_GEMM=aten)"};
    }
    if (want == "widen") {
      return Bf16GemmChoice{Bf16Gemm::kWiden,
                            "float32 GEMMs on widened operands (MMFAST_CPU_BF16_GEMM=widen)"};
    }
    if (want == "fma") {
      check_fma_gemm_runs("MMFAST_CPU_BF16_GEMM");
      return Bf16GemmChoice{Bf16Gemm::kFma, "fma_gemm (MMFAST_CPU_BF16_GEMM=fma)"};
    }
    if (want == "tiles") {
      TORCH_CHECK(tiles_run, "MMFAST_CPU_BF16_GEMM=tiles: the vdpbf16ps tiles need the AVX512 "
                  "build active and a CPU with avx512_bf16 (MMFAST_CPU_ISA: ",
                  isa_name(active_isa()), ")");
      return Bf16GemmChoice{Bf16Gemm::kVnni, "vdpbf16ps tiles (MMFAST_CPU_BF16_GEMM=tiles)"};
    }
    if (want == "amx") {
      TORCH_CHECK(amx, "MMFAST_CPU_BF16_GEMM=amx: the AMX tiles need the AVX512 build active, "
                  "a CPU with AMX-BF16 and the tile state granted by the kernel (MMFAST_CPU_ISA: ",
                  isa_name(active_isa()), ")");
      return Bf16GemmChoice{Bf16Gemm::kAmx, "AMX tiles (MMFAST_CPU_BF16_GEMM=amx)"};
    }
    if (amx) return Bf16GemmChoice{Bf16Gemm::kAmx, "AMX tiles (AMX-BF16)"};
    if (tiles_run && amx_cpu) {
      // Without the tile state oneDNN has no AMX either: as on a CPU without AMX.
      return Bf16GemmChoice{Bf16Gemm::kVnni,
                            "vdpbf16ps tiles (avx512_bf16; AMX tile state not granted)"};
    }
    if (tiles_run) return Bf16GemmChoice{Bf16Gemm::kVnni, "vdpbf16ps tiles (avx512_bf16, no AMX)"};
    if (active_isa() == Isa::AVX2) {
      return Bf16GemmChoice{Bf16Gemm::kFma, "fma_gemm (the AVX2 build: AVX2 and FMA)"};
    }
    if (!bf16_brgemm_runs()) {
      return Bf16GemmChoice{Bf16Gemm::kWiden,
                            "float32 GEMMs on widened operands (no AVX-512: ATen's bfloat16 "
                            "GEMM is a scalar loop)"};
    }
    return Bf16GemmChoice{Bf16Gemm::kAten, "ATen (no avx512_bf16 in the active build)"};
  }();
  return choice;
}

enum class F32Gemm : int { kOnednn, kMkl, kFma };

using F32GemmChoice = KernelChoice<F32Gemm>;

F32GemmChoice f32_gemm_choice() {
  static const F32GemmChoice choice = [] {
    const std::string want = path_override("MMFAST_CPU_F32_GEMM", {"onednn", "mkl", "fma"});
    if (want == "onednn") {
      return F32GemmChoice{F32Gemm::kOnednn, "oneDNN linear (MMFAST_CPU_F32_GEMM=onednn)"};
    }
    if (want == "mkl") return F32GemmChoice{F32Gemm::kMkl, "ATen mm (MMFAST_CPU_F32_GEMM=mkl)"};
    if (want == "fma") {
      check_fma_gemm_runs("MMFAST_CPU_F32_GEMM");
      return F32GemmChoice{F32Gemm::kFma, "fma_gemm (MMFAST_CPU_F32_GEMM=fma)"};
    }
    if (active_isa() == Isa::AVX2) {
      return F32GemmChoice{F32Gemm::kFma, "fma_gemm (the AVX2 build: AVX2 and FMA)"};
    }
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return F32GemmChoice{F32Gemm::kMkl, "ATen mm (MKL; Intel CPU)"};
#endif
    return F32GemmChoice{F32Gemm::kOnednn, "oneDNN linear (not an Intel CPU)"};
  }();
  return choice;
}

PathChoice xattn_bf16_choice() {
  static const PathChoice choice = [] {
    const std::string want = path_override("MMFAST_CPU_XATTN_BF16", {"brgemm", "widen"});
    if (want == "brgemm") {
      TORCH_CHECK(bf16_brgemm_runs(), "MMFAST_CPU_XATTN_BF16=brgemm: ATen's bfloat16 brgemm "
                  "needs a CPU with AVX-512 (F, CD, BW, VL, DQ)");
      return PathChoice{true, "bfloat16 brgemm (MMFAST_CPU_XATTN_BF16=brgemm)"};
    }
    if (want == "widen") {
      return PathChoice{false, "float32 GEMMs on widened tiles (MMFAST_CPU_XATTN_BF16=widen)"};
    }
    return at::native::cpublas::could_pack(at::kBFloat16)
               ? PathChoice{true, "bfloat16 brgemm (AMX)"}
               : PathChoice{false, "float32 GEMMs on widened tiles (no AMX)"};
  }();
  return choice;
}

enum class F16Gemm : int { kAten, kWiden, kFma };

using F16GemmChoice = KernelChoice<F16Gemm>;

F16GemmChoice f16_gemm_choice() {
  static const F16GemmChoice choice = [] {
    const std::string want = path_override("MMFAST_CPU_F16_GEMM", {"aten", "widen", "fma"});
    if (want == "aten") return F16GemmChoice{F16Gemm::kAten, "ATen (MMFAST_CPU_F16_GEMM=aten)"};
    if (want == "widen") {
      return F16GemmChoice{F16Gemm::kWiden,
                           "float32 GEMMs on widened operands (MMFAST_CPU_F16_GEMM=widen)"};
    }
    if (want == "fma") {
      check_fma_gemm_runs("MMFAST_CPU_F16_GEMM");
      return F16GemmChoice{F16Gemm::kFma, "fma_gemm (MMFAST_CPU_F16_GEMM=fma)"};
    }
    if (active_isa() == Isa::AVX2) {
      return F16GemmChoice{F16Gemm::kFma, "fma_gemm (the AVX2 build: AVX2 and FMA)"};
    }
    return cpu_flag(at::cpu::get_cpu_capabilities(), "avx512_fp16")
               ? F16GemmChoice{F16Gemm::kAten, "ATen (avx512_fp16)"}
               : F16GemmChoice{F16Gemm::kWiden, "float32 GEMMs on widened operands (no "
                                                "avx512_fp16: ATen's float16 GEMM is a scalar "
                                                "loop)"};
  }();
  return choice;
}

using MergeGemmChoice = KernelChoice<MergeGemm>;

MergeGemmChoice merge_gemm_choice() {
  static const MergeGemmChoice choice = [] {
    const std::string want = path_override("MMFAST_CPU_MERGE_GEMM", {"int8", "bf16", "f32"});
    const bool int8 = active_isa() == Isa::AVX512 && at::cpu::is_avx512_vnni_supported();
    const bool bf16 = bf16_brgemm_runs();
    if (want == "int8") {
      TORCH_CHECK(int8, "MMFAST_CPU_MERGE_GEMM=int8: the int8 first pass needs the AVX512 build "
                  "active and a CPU with AVX512-VNNI (MMFAST_CPU_ISA: ", isa_name(active_isa()),
                  ")");
      return MergeGemmChoice{MergeGemm::kInt8, "int8 brgemm (MMFAST_CPU_MERGE_GEMM=int8)"};
    }
    if (want == "bf16") {
      TORCH_CHECK(bf16, "MMFAST_CPU_MERGE_GEMM=bf16: ATen's bfloat16 brgemm needs a CPU with "
                  "AVX-512 (F, CD, BW, VL, DQ)");
      return MergeGemmChoice{MergeGemm::kBFloat16, "bfloat16 brgemm (MMFAST_CPU_MERGE_GEMM=bf16)"};
    }
    if (want == "f32") {
      return MergeGemmChoice{MergeGemm::kFloat32, "float32 brgemm (MMFAST_CPU_MERGE_GEMM=f32)"};
    }
    if (int8) return MergeGemmChoice{MergeGemm::kInt8, "int8 brgemm (AVX512-VNNI)"};
    if (bf16) return MergeGemmChoice{MergeGemm::kBFloat16, "bfloat16 brgemm (AVX-512)"};
    return MergeGemmChoice{MergeGemm::kFloat32, "float32 brgemm (no AVX-512)"};
  }();
  return choice;
}

}  // namespace

bool bf16_brgemm_runs() {
  // oneDNN's avx512_core (F, CD, BW, VL, DQ), which its bfloat16 brgemm ukernel needs.
  static const bool runs = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    return cpu_flag(caps, "avx512_f") && cpu_flag(caps, "avx512_cd") &&
           cpu_flag(caps, "avx512_bw") && cpu_flag(caps, "avx512_vl") &&
           cpu_flag(caps, "avx512_dq");
  }();
  return runs;
}

bool f16_gemm_widened() { return f16_gemm_choice().kernel == F16Gemm::kWiden; }
bool f16_gemm_fma() { return f16_gemm_choice().kernel == F16Gemm::kFma; }
const char* f16_gemm_path() { return f16_gemm_choice().why; }

MergeGemm merge_gemm() { return merge_gemm_choice().kernel; }
const char* merge_gemm_path() { return merge_gemm_choice().why; }
bool bf16_tile_gemm() {
  const Bf16Gemm k = bf16_gemm_choice().kernel;
  return k == Bf16Gemm::kVnni || k == Bf16Gemm::kAmx;
}
bool bf16_gemm_widened() { return bf16_gemm_choice().kernel == Bf16Gemm::kWiden; }
bool bf16_gemm_fma() { return bf16_gemm_choice().kernel == Bf16Gemm::kFma; }
bool bf16_gemm_amx() { return bf16_gemm_choice().kernel == Bf16Gemm::kAmx; }
const char* bf16_gemm_path() { return bf16_gemm_choice().why; }
bool f32_gemm_onednn() { return f32_gemm_choice().kernel == F32Gemm::kOnednn; }
bool f32_gemm_fma() { return f32_gemm_choice().kernel == F32Gemm::kFma; }
const char* f32_gemm_path() { return f32_gemm_choice().why; }
bool xattn_bf16_brgemm() { return xattn_bf16_choice().taken; }
const char* xattn_bf16_path() { return xattn_bf16_choice().why; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace mmfast::cpu
