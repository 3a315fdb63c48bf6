"""Token-count reductions that need no similarity: spatial pooling of a token grid
(LLaVA-OneVision video frames) and InternVL's pixel shuffle."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _grid(x: torch.Tensor, hw, name: str):
    b, n, c = x.shape
    if hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{name}: {n} tokens are not a square grid; pass grid=(H, W)")
        hw = (side, side)
    h, w = hw
    if h * w != n:
        raise ValueError(f"{name}: grid {h} x {w} does not hold the {n} tokens of x")
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, H, W]


class SpatialPool(nn.Module):
    """Pools each frame's token grid, as LLaVA-OneVision pools video frames.

    mode="average":  stride x stride average pooling (LLaVA-OneVision's "average" mode).
    mode="bilinear": bilinear resize to ceil(H / stride) x ceil(W / stride) (its "bilinear"
                     mode), or, with ``budget``, to the largest grid of the same aspect ratio
                     holding at most ``budget`` tokens.
    Input x [B, H*W, C] (B frames or images) and grid=(H, W) (default: square); returns
    (pooled [B, H'*W', C], (H', W')).
    """

    def __init__(self, mode: str = "average", stride: int = 2, budget: int | None = None):
        super().__init__()
        if mode not in ("average", "bilinear"):
            raise ValueError(f"SpatialPool: mode must be 'average' or 'bilinear', got {mode!r}")
        if stride < 1:
            raise ValueError(f"SpatialPool: stride must be >= 1, got {stride}")
        if budget is not None and (mode != "bilinear" or budget < 1):
            raise ValueError("SpatialPool: budget needs mode='bilinear' and budget >= 1")
        self.mode, self.stride, self.budget = mode, stride, budget

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        if self.budget is not None:
            scale = min(1.0, math.sqrt(self.budget / (h * w)))
            oh, ow = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
            while oh * ow > self.budget:  # floor rounding can still overshoot by a row
                oh, ow = (oh - 1, ow) if oh >= ow else (oh, ow - 1)
            return oh, ow
        if self.mode == "average":
            return h // self.stride, w // self.stride
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward(self, x: torch.Tensor, grid=None):
        img = _grid(x, grid, "SpatialPool")
        oh, ow = self.output_grid(img.shape[2], img.shape[3])
        if self.mode == "average":
            img = F.avg_pool2d(img, self.stride, self.stride)
        else:
            img = F.interpolate(img, size=(oh, ow), mode="bilinear", align_corners=False)
        return img.flatten(2).transpose(1, 2), (oh, ow)


class PixelShuffle(nn.Module):
    """InternVL's pixel shuffle (``ps_version="v2"``): each 2 x 2 (1 / scale) block of
    neighbouring tokens becomes one token of 4x the channels, so [B, H*W, C] ->
    [B, (H/2)*(W/2), 4C] for scale 0.5. grid=(H, W) defaults to a square."""

    def __init__(self, scale: float = 0.5):
        super().__init__()
        inv = round(1 / scale)
        if not 0 < scale <= 1 or abs(inv * scale - 1) > 1e-9:
            raise ValueError(f"PixelShuffle: scale must be 1/k for an integer k, got {scale}")
        self.scale = scale
        self.factor = inv

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, c = x.shape
        img = _grid(x, grid, "PixelShuffle").permute(0, 2, 3, 1)  # [B, H, W, C]
        h, w, k = img.shape[1], img.shape[2], self.factor
        if h % k or w % k:
            raise ValueError(f"PixelShuffle: grid {h} x {w} is not divisible by {k}")
        # InternVL reads the grid as [B, W, H, C] (its first spatial dim is called w); the same
        # sequence of views and permutes, so the channel order matches its checkpoints.
        t = img.reshape(b, h, w // k, c * k)
        t = t.permute(0, 2, 1, 3).reshape(b, w // k, h // k, c * k * k)
        t = t.permute(0, 2, 1, 3)
        return t.reshape(b, (h // k) * (w // k), c * k * k)
