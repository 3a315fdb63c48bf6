"""The CUDA implementation chooser.

On CUDA an op may have several implementations (Triton, CUDA C++, ...). Each is an
``Implementation`` that says, for given inputs, every reason it cannot take them
(``not_supported_reasons``, after xformers). The op's one registered CUDA kernel walks its
priority list and runs the first implementation with no reasons; when none can run, one error
lists every implementation's reasons.

``MMFAST_BACKEND=triton|cuda`` in the environment, or ``with mmfast.backend("triton"):``,
restricts the choice to one kind of implementation. ``last_choice(op)`` names the
implementation that ran last for an op (the benchmark table shows it).
"""

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BACKENDS = ("triton", "cuda")

_state = threading.local()
_last_choice: dict[str, str] = {}


@dataclass(frozen=True)
class Implementation:
    """One way to run an op on CUDA.

    name:    shown in errors and in the benchmark table, e.g. "triton" or "cuda-vec16".
    backend: "triton" or "cuda" (what MMFAST_BACKEND selects).
    reasons: inputs -> list of reasons this implementation cannot take them ([] = it can).
    run:     inputs -> outputs.
    """

    name: str
    backend: str
    reasons: Callable[..., list[str]]
    run: Callable[..., object]


def forced_backend() -> str | None:
    forced = getattr(_state, "forced", None) or os.environ.get("MMFAST_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"MMFAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
    return forced


@contextlib.contextmanager
def backend(name: str | None):
    """Force one kind of CUDA implementation ("triton" or "cuda") inside the block; None lifts it."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def triton_available() -> list[str]:
    """Reasons Triton cannot run at all (empty when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["triton is not installed"]
    return []


def cuda_kernels_available() -> list[str]:
    if not torch.ops.mmfast._has_cuda_kernels():
        return ["mmfast was built without its CUDA C++ kernels (no nvcc or MMFAST_CUDA=0 at build time)"]
    return []


def choose(op: str, implementations: Sequence[Implementation], *args, **kwargs) -> Implementation:
    """The first implementation (in priority order) that can take these inputs."""
    forced = forced_backend()
    report = []
    for impl in implementations:
        if forced is not None and impl.backend != forced:
            report.append(f"{impl.name}: not the forced backend {forced!r}")
            continue
        reasons = impl.reasons(*args, **kwargs)
        if not reasons:
            _last_choice[op] = impl.name
            return impl
        report.append(f"{impl.name}: " + "; ".join(reasons))
    raise NotImplementedError(
        f"mmfast.{op}: no CUDA implementation can take these inputs:\n  " + "\n  ".join(report))


def dispatch(op: str, implementations: Sequence[Implementation], *args, **kwargs):
    return choose(op, implementations, *args, **kwargs).run(*args, **kwargs)


def last_choice(op: str) -> str | None:
    """Name of the implementation that last ran `op` on CUDA (None if it never ran there)."""
    return _last_choice.get(op)
