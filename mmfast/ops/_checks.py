"""Argument checks shared by the fake kernels and the CUDA choosers (the C++ kernels check the
same in csrc/common/). Each error names the argument and what was expected."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_approximate(op: str, approximate: str) -> bool:
    """Returns True for the tanh form of GELU."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_per_token(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """t holds one float value per token of x [B, N, C]: shape [B, N], x's device."""
    if t.shape != x.shape[:2]:
        raise ValueError(f"{op}: {name} must have shape [B, N] = {list(x.shape[:2])}, "
                         f"got {list(t.shape)}")
    check_float(op, name, t)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
