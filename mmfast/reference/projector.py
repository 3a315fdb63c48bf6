import torch
import torch.nn.functional as F


def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """The meaning of mmfast.ops.projector: Linear -> GELU -> Linear over the last dim of x."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def projector_splice(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                     b2: torch.Tensor | None, embeds: torch.Tensor, image_mask: torch.Tensor,
                     approximate: str = "none") -> torch.Tensor:
    """The meaning of mmfast.ops.projector_splice: LLaVA's
    ``embeds.masked_scatter(image_mask[..., None], projector(x))`` (rows in order)."""
    features = projector(x, w1, b1, w2, b2, approximate)
    return embeds.masked_scatter(image_mask[..., None], features)
