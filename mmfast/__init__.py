"""mmfast: fused kernels for the multimodal hot spots of vision-language models."""

import torch

try:
    from mmfast import _C  # noqa: F401  (loading it registers torch.ops.mmfast.*)
except ImportError as e:
    raise ImportError(
        "mmfast's compiled extension mmfast._C is missing or does not match this torch "
        f"({torch.__version__}). Build it from the source tree with "
        "`pip install --no-build-isolation -e .` (or `make build`); the flag matters: an "
        f"isolated build compiles against another torch. Original error: {e}") from e

from mmfast import ops, reference  # noqa: E402
from mmfast._backend import backend, last_choice  # noqa: E402


def cpu_isa() -> str:
    """The vectorized CPU build in use: "avx512", "avx2" or "default"."""
    return torch.ops.mmfast._cpu_isa()


def cpu_bf16_gemm() -> str:
    """What runs the projector's bfloat16 GEMMs on CPU: mmfast's AMX tiles (CPUs with
    AMX-BF16), its vdpbf16ps tiles (avx512_bf16 without AMX), its AVX2 FMA tiles (fma_gemm:
    the AVX2 build, on CPUs without AVX-512, where ATen's bfloat16 GEMMs are scalar loops),
    ATen (other AVX-512 CPUs, or builds without avx512_bf16), or float32 GEMMs on widened
    operands (the generic build without AVX-512). The environment variable
    MMFAST_CPU_BF16_GEMM (auto, amx, tiles, aten, widen, fma; read once) overrides that rule
    where the kernel can run, for tests and measurements."""
    return torch.ops.mmfast._cpu_bf16_gemm()


def cpu_f16_gemm() -> str:
    """What runs the projector's float16 GEMMs on CPU: mmfast's AVX2 FMA tiles (fma_gemm: the
    AVX2 build, on CPUs without AVX-512), ATen (CPUs with avx512_fp16, where oneDNN has
    float16 kernels) or float32 GEMMs on widened operands (the others, where ATen's float16
    GEMMs are scalar loops). MMFAST_CPU_F16_GEMM (auto, aten, widen, fma; read once)
    overrides."""
    return torch.ops.mmfast._cpu_f16_gemm()


def cpu_f32_gemm() -> str:
    """What runs the projector's float32 GEMMs on CPU: mmfast's AVX2 FMA tiles (fma_gemm: the
    AVX2 build, on CPUs without AVX-512; with its fused epilogues faster than eager's MKL in
    a full suite run on a Zen 3), oneDNN's linear
    (with the backward's operands made contiguous along K), or ATen's mm (MKL) on Intel CPUs,
    where it is as fast. The environment variable MMFAST_CPU_F32_GEMM (auto, onednn, mkl,
    fma; read once) overrides."""
    return torch.ops.mmfast._cpu_f32_gemm()


def cpu_xattn_bf16() -> str:
    """What runs cross_attention's bfloat16 forward tile GEMMs on CPU: bfloat16 brgemm (AMX
    CPUs) or float32 GEMMs on widened tiles. MMFAST_CPU_XATTN_BF16 (auto, brgemm, widen; read
    once) overrides."""
    return torch.ops.mmfast._cpu_xattn_bf16()


def cpu_merge_gemm() -> str:
    """What runs bipartite_merge's approximate first-pass GEMM on CPU: int8 brgemm (AVX512
    build on a CPU with VNNI), bfloat16 brgemm (other AVX-512 CPUs), or float32 brgemm (CPUs
    without AVX-512, where ATen has no bfloat16 one). MMFAST_CPU_MERGE_GEMM (auto, int8, bf16,
    f32; read once) overrides where the kernel can run."""
    return torch.ops.mmfast._cpu_merge_gemm()


__all__ = ["ops", "reference", "backend", "last_choice", "cpu_isa", "cpu_bf16_gemm",
           "cpu_f16_gemm", "cpu_f32_gemm", "cpu_xattn_bf16", "cpu_merge_gemm"]
__version__ = "0.1.0"
