import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The meaning of mmfast.ops.bias_gelu: gelu(x + bias), bias broadcast over the last dim."""
    return F.gelu(x + bias, approximate=approximate)
