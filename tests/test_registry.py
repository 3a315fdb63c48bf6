"""Every public op has everything an mmfast op must have; this fails when a new op forgets one.

Public ops are the schemas of torch.ops.mmfast not starting with "_" and not ending in
"_backward". Each needs: a public function in mmfast.ops and a reference in mmfast.reference
(same name), CPU and CUDA kernels, a fake kernel, autograd whose backward is the registered op
<op>_backward (with its own CPU kernel and fake kernel), sample inputs and a test file, a
benchmark module that covers it, and a clean torch.library.opcheck over its samples."""

import importlib
import inspect
import os
import pkgutil

import pytest
import torch

import mmfast
from tests.helpers import DTYPES, has_samples, sample_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ops whose outputs carry no gradient (none yet): they need no autograd and no _backward op.
NON_DIFFERENTIABLE: set[str] = set()


def _all_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("mmfast::"))


PUBLIC_OPS = [op for op in _all_ops() if not op.startswith("_") and not op.endswith("_backward")]


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfast::{op}", key)


def _has_fake(op):
    from torch._library.simple_registry import singleton
    return singleton.find(f"mmfast::{op}").fake_impl.kernel is not None


def _benchmarked_ops():
    import benchmarks

    covered = set()
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            covered.update(getattr(module, "COVERS", (module.OP,)))
    return covered


def test_there_are_ops():
    assert "bias_gelu" in PUBLIC_OPS


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_op_is_complete(op):
    missing = []
    if not callable(getattr(mmfast.ops, op, None)):
        missing.append(f"mmfast.ops.{op}")
    elif not (inspect.getdoc(getattr(mmfast.ops, op)) or "").strip():
        missing.append(f"a docstring on mmfast.ops.{op}")
    if not callable(getattr(mmfast.reference, op, None)):
        missing.append(f"mmfast.reference.{op}")
    for key in ("CPU", "CUDA"):
        if not _has_kernel(op, key):
            missing.append(f"a {key} kernel")
    if not _has_fake(op):
        missing.append("a fake kernel (register_fake)")
    if op not in NON_DIFFERENTIABLE:
        if not _has_kernel(op, "Autograd"):
            missing.append("autograd (register_autograd)")
        backward = f"{op}_backward"
        if backward not in _all_ops():
            missing.append(f"the op mmfast::{backward}")
        else:
            if not _has_kernel(backward, "CPU"):
                missing.append(f"a CPU kernel for {backward}")
            if not _has_kernel(backward, "CUDA"):
                missing.append(f"a CUDA kernel for {backward}")
            if not _has_fake(backward):
                missing.append(f"a fake kernel for {backward}")
    if not has_samples(op):
        missing.append(f"tests/samples/{op}.py")
    if not os.path.exists(os.path.join(ROOT, "tests", "ops", f"test_{op}.py")):
        missing.append(f"tests/ops/test_{op}.py")
    if op not in _benchmarked_ops():
        missing.append("a benchmarks/bench_*.py whose OP or COVERS names it")
    assert not missing, f"mmfast::{op} lacks: " + ", ".join(missing)


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_opcheck(op):
    opoverload = getattr(torch.ops.mmfast, op).default
    for dtype in DTYPES:
        for s in sample_inputs(op, dtype=dtype, requires_grad=op not in NON_DIFFERENTIABLE):
            torch.library.opcheck(opoverload, s.args, s.kwargs)


def test_every_triton_kernel_is_registered_for_aot():
    """Launchable Triton kernels are named *_kernel; each must be compiled ahead of time."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from mmfast.kernels import aot

    jit_types = (triton.runtime.JITFunction, InterpretedFunction)  # the latter in interpreter mode

    import mmfast.kernels

    aot.load_all_kernel_modules()
    names = set()
    for info in pkgutil.iter_modules(mmfast.kernels.__path__):
        module = importlib.import_module(f"mmfast.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, jit_types) and name.endswith("_kernel") \
                    and obj.fn.__module__ == module.__name__:
                names.add(name)
    registered = {spec.name for spec in aot.registered()}
    assert names, "no Triton kernels found"
    assert names <= registered, f"not registered for AOT compile: {sorted(names - registered)}"
