"""Build mmfast and its one compiled extension, ``mmfast._C``.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): an isolated build would pull
another torch, and the extension's ABI would then differ from the torch that runs it.

Environment:
  MMFAST_CUDA=auto|0|1    build csrc/cuda/*.cu (auto: when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0"
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil

import torch
from setuptools import setup

# torch derives CUDA_HOME from the location of `nvcc` when the variable is unset; an nvcc
# wrapper in /usr/local/bin then points it at /usr/local, which has no CUDA libraries.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))

# Vectorized CPU units (csrc/cpu/vec/*.cpp) are compiled once per instruction set; the dispatcher
# in csrc/cpu/isa.cpp picks the best one the running CPU supports, so one build runs on any
# x86-64 and still uses AVX512 where present. Order matters: the generic objects are linked
# first so that any inline helper emitted by several units resolves to the generic copy.
CPU_ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-mbmi", "-mbmi2"],
}


def want_cuda():
    mode = os.environ.get("MMFAST_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MMFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if mode == "1" and not available:
        raise RuntimeError("MMFAST_CUDA=1 but torch has no CUDA or nvcc was not found")
    return available and mode != "0"


def nvidia_wheel_dir():
    """The CUDA libraries torch itself loads come from the nvidia wheel (nvidia.cu13 is a
    namespace package, so its location is __path__[0]); a bare toolkit may lack their headers
    (cusparse.h, which ATen's CUDA headers include)."""
    try:
        import nvidia.cu13
        return nvidia.cu13.__path__[0]
    except ImportError:
        return None


def cublaslt_link_args():
    wheel = nvidia_wheel_dir()
    lib = os.path.join(wheel, "lib") if wheel else os.path.join(CUDA_HOME, "lib64")
    return [f"-L{lib}", f"-Wl,-rpath,{lib}", "-l:libcublasLt.so.13"]


class BuildWithIsaUnits(BuildExtension):
    """BuildExtension that also compiles every csrc/cpu/vec/*.cpp once per ISA with its own flags
    (setuptools has no per-file flags) and links those objects into the extension."""

    def build_extension(self, ext):
        base = [f for f in ext.extra_compile_args["cxx"] if not f.startswith("-march")]
        objects = []
        for isa, flags in CPU_ISAS.items():
            wrap_dir = os.path.join(self.build_temp, "isa", isa)
            os.makedirs(wrap_dir, exist_ok=True)
            wrappers = []
            for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "vec", "*.cpp"))):
                name = os.path.splitext(os.path.basename(src))[0]
                wrapper = os.path.join(wrap_dir, f"{name}_{isa}.cpp")
                text = f'#include "{src}"\n'
                if not os.path.exists(wrapper) or open(wrapper).read() != text:
                    with open(wrapper, "w") as f:
                        f.write(text)
                wrappers.append(wrapper)
            objects += self.compiler.compile(
                wrappers,
                output_dir=os.path.join(self.build_temp, "isa_obj", isa),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": base + flags + [f"-DCPU_CAPABILITY={isa}",
                                                        f"-DCPU_CAPABILITY_{isa}"],
                                "nvcc": []},
                depends=glob.glob(os.path.join(ROOT, "csrc", "cpu", "**", "*.h"), recursive=True),
            )
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


def make_extension():
    cxx = ["-O3", "-fopenmp"]
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    link = ["-fopenmp"]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        wheel = nvidia_wheel_dir()
        if wheel:
            include_dirs.append(os.path.join(wheel, "include"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "--expt-relaxed-constexpr", "-DMMFAST_WITH_CUDA"]
        return CUDAExtension(
            "mmfast._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DMMFAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link + cublaslt_link_args())
    return CppExtension("mmfast._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="mmfast",
    version="0.1.0",
    description="Fused kernels for the multimodal hot spots of vision-language models",
    packages=["mmfast", "mmfast.ops", "mmfast.reference", "mmfast.nn", "mmfast.integrations",
              "mmfast.kernels"],
    package_dir={"mmfast.kernels": "kernels"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildWithIsaUnits.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.14"],
)
