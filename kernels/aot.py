"""Ahead-of-time compilation of mmfast's Triton kernels for real GPUs, without a GPU.

Every kernel module registers the configurations it launches (``register_aot``). The test
suite compiles each for sm_80 and sm_90 with ``triton.compile(..., target=GPUTarget(...))``,
assembles the PTX with Triton's own ``ptxas -v`` to read registers and spills, and checks that
the kernel lowers, fits the architecture's shared memory and, where it uses ``tl.dot``, uses
the tensor cores (``mma`` on sm_80, ``wgmma`` on sm_90).
"""

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# Shared memory one block may use (bytes): A100 and H100/H200 opt-in maxima.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_REGISTRY: list["AotSpec"] = []


@dataclass
class AotSpec:
    """One @triton.jit kernel and the configurations it is launched with.

    signature: argument -> Triton type; "{dt}" is replaced by each of `dtypes`.
    constexprs: argument -> value, or a tuple of values (each is compiled).
    arch_options: per compute capability, options that differ (e.g. tile sizes via constexprs
        or num_warps) as {cc: {"constexprs": {...}, "num_warps": n, "num_stages": s}}.
    uses_dot: the kernel multiplies tiles with tl.dot, so it must lower to tensor-core code.
    allow_spills: register spills are reported but tolerated (default: they fail the check).
    Launchable kernels are named *_kernel; every one in kernels/ must be registered.
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False
    allow_spills: bool = False
    dtypes: tuple = ("fp32", "fp16", "bf16")
    arch_options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def configs(self, cc: int):
        """Yields (dtype, constexprs, num_warps, num_stages) for one architecture."""
        over = self.arch_options.get(cc, {})
        base = {**self.constexprs, **over.get("constexprs", {})}
        keys = list(base)
        choices = [v if isinstance(v, tuple) else (v,) for v in base.values()]
        for dt in self.dtypes:
            for combo in itertools.product(*choices):
                yield (dt, dict(zip(keys, combo)), over.get("num_warps", self.num_warps),
                       over.get("num_stages", self.num_stages))


@dataclass
class AotResult:
    kernel: str
    cc: int
    dtype: str
    constexprs: dict
    shared: int
    registers: int
    spill_bytes: int
    has_mma: bool
    has_wgmma: bool


def register_aot(*specs: AotSpec) -> None:
    _REGISTRY.extend(specs)


def registered() -> list[AotSpec]:
    return list(_REGISTRY)


def _ptxas() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_report(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill bytes) of the PTX's entry, as ptxas reports them."""
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name", arch, path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def compile_for(spec: AotSpec, cc: int, dtype: str, constexprs: dict, num_warps: int,
                num_stages: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {k: v.replace("{dt}", dtype) for k, v in spec.signature.items()}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(spec.kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_report(ptx, cc)
    return AotResult(spec.name, cc, dtype, constexprs, compiled.metadata.shared, regs, spills,
                     has_mma=bool(re.search(r"\bmma\.sync", ptx)),
                     has_wgmma="wgmma.mma_async" in ptx)


def load_all_kernel_modules() -> None:
    """Imports every module of mmfast.kernels so that each registers its specs."""
    import importlib
    import pkgutil

    import mmfast.kernels

    for info in pkgutil.iter_modules(mmfast.kernels.__path__):
        importlib.import_module(f"mmfast.kernels.{info.name}")


def main(argv=None) -> int:
    """`python -m mmfast.kernels.aot [cc ...]`: compile every registered config, one JSON line
    per config. Must run without TRITON_INTERPRET (the interpreter's kernels cannot be
    compiled), which is why the test suite calls it in a subprocess."""
    import json
    import sys
    from dataclasses import asdict

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET to compile kernels ahead of time")
    archs = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [80, 90]
    # Run as __main__, this module is not the mmfast.kernels.aot the kernels register with.
    import mmfast.kernels.aot as registry

    registry.load_all_kernel_modules()
    for spec in registry.registered():
        for cc in archs:
            for dtype, constexprs, num_warps, num_stages in spec.configs(cc):
                record = {"spec": spec.name, "cc": cc, "dtype": dtype, "constexprs": constexprs,
                          "num_warps": num_warps, "num_stages": num_stages,
                          "uses_dot": spec.uses_dot, "allow_spills": spec.allow_spills}
                try:
                    record.update(asdict(compile_for(spec, cc, dtype, constexprs, num_warps,
                                                     num_stages)))
                except Exception as e:  # reported per config by the test
                    record["error"] = f"{type(e).__name__}: {e}"[:2000]
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
