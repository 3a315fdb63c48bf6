"""Shared test helpers: sample inputs per op, tolerances per dtype, the attention error rule,
and an assert that shows where tensors differ."""

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (atol, rtol) against a float64 reference, for elementwise ops computed in float32.
_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return _TOL[dtype]


@dataclass
class SampleInput:
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""

    def __repr__(self):
        shapes = [tuple(a.shape) if torch.is_tensor(a) else a for a in self.args]
        return f"SampleInput({self.name or ''} {shapes} {self.kwargs})"


def sample_inputs(op: str, device="cpu", dtype=torch.float32, requires_grad=False) -> list:
    """Sample inputs of `op`, from tests/samples/<op>.py: fresh random values (never zeros),
    odd sizes, non-contiguous tensors among them."""
    module = importlib.import_module(f"tests.samples.{op}")
    return module.sample_inputs(device=device, dtype=dtype, requires_grad=requires_grad)


def has_samples(op: str) -> bool:
    try:
        importlib.import_module(f"tests.samples.{op}")
    except ModuleNotFoundError:
        return False
    return True


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as t, stored with a gap after each element along the last dim."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide.normal_()
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 name: str = "output") -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise (expected may be float64), with
    NaN/Inf in the same places; on failure shows the worst and the first mismatching indices."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    assert torch.equal(a_nan, e_nan), (
        f"{name}: NaN positions differ, first at {(a_nan ^ e_nan).nonzero()[:5].tolist()}")
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    assert torch.equal(a_inf, e_inf) and torch.equal(a[a_inf], e[e_inf]), (
        f"{name}: Inf positions differ, first at {(a_inf ^ e_inf).nonzero()[:5].tolist()}")
    finite = ~(a_nan | a_inf)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = int(err.argmax())
        worst_idx = list(torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else []
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}: actual {[a[tuple(i)].item() for i in idx]} expected "
            f"{[e[tuple(i)].item() for i in idx]}; max error {err.max().item():.3g} at "
            f"{[int(i) for i in worst_idx]}")


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return (actual.detach().to("cpu", torch.float64) - ref64.detach().to("cpu", torch.float64)).abs().max().item()


def assert_attention_close(ours: torch.Tensor, torch_same_dtype: torch.Tensor,
                           ref64: torch.Tensor, *, floor: float, name: str = "output") -> None:
    """flash-attention's rule: err(ours, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref)
    + floor, with max-abs errors; NaN never passes."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output"
    ours_err = max_err(ours, ref64)
    torch_err = max_err(torch_same_dtype, ref64)
    assert ours_err <= 2 * torch_err + floor, (
        f"{name}: error {ours_err:.3g} > 2 * torch's {torch_err:.3g} + {floor:g}")


def cpu_has_avx512() -> bool:
    """oneDNN's avx512_core (F, CD, BW, VL, DQ): what its bfloat16 kernels, and so ATen's
    bfloat16 GEMMs and brgemm, need; without it ATen's bfloat16 GEMMs are scalar loops and its
    bfloat16 brgemm raises an error."""
    caps = torch.cpu.get_capabilities()
    return all(caps.get(f, False) for f in ("avx512_f", "avx512_cd", "avx512_bw", "avx512_vl",
                                            "avx512_dq"))


def run_pytest(tests: list, **env) -> subprocess.CompletedProcess:
    """pytest on `tests` in a fresh process with the environment variables `env` set (the
    kernel-path overrides are read once per process), from the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           *tests], env=dict(os.environ, **env), capture_output=True, text=True,
                          cwd=root)


def assert_pytest_passes(tests: list, passed: int | None = None, **env) -> str:
    """run_pytest, then: it succeeded, and (when given) exactly `passed` tests passed; returns
    its output."""
    out = run_pytest(tests, **env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    if passed is not None:
        assert f"{passed} passed" in out.stdout, out.stdout[-3000:]
    return out.stdout
