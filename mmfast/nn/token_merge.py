"""ToMe token merging for a ViT, over mmfast.ops.bipartite_merge."""

from typing import NamedTuple, Optional

import torch
from torch import nn

from mmfast.ops.bipartite_merge import bipartite_merge


class MergedTokens(NamedTuple):
    x: torch.Tensor          # [B, N - r, C]
    size: torch.Tensor       # [B, N - r] float32: original tokens per row
    dest: torch.Tensor       # [B, N] int64: the row of every input token
    attn_bias: torch.Tensor  # [B, 1, 1, N - r] float32: log(size), ToMe's proportional attention


class TokenMerger(nn.Module):
    """Merges the ``r`` most similar tokens of each image (ToMe, Bolya et al. 2023), keeping
    the running token sizes across layers.

    Call it between a block's attention and its MLP, as ToMe does::

        out = merger(x, metric=k.mean(1), size=size)   # k: the attention keys [B, H, N, D]
        x, size = out.x, out.size
        # next attention: logits + out.attn_bias (proportional attention)

    r:             tokens removed per call; like ToMe, clamped to what the input allows
                   ((N - protect_first) // 2).
    protect_first: keep token 0 (the CLS token) unmerged.
    """

    def __init__(self, r: int, protect_first: bool = True):
        super().__init__()
        if r < 0:
            raise ValueError(f"TokenMerger: r must be >= 0, got {r}")
        self.r = r
        self.protect_first = protect_first

    def forward(self, x: torch.Tensor, metric: torch.Tensor,
                size: Optional[torch.Tensor] = None) -> MergedTokens:
        n = x.shape[1]
        r = min(self.r, max(n - int(self.protect_first), 0) // 2)
        merged, merged_size, dest = bipartite_merge(x, metric, r, size=size,
                                                    protect_first=self.protect_first)
        return MergedTokens(merged, merged_size, dest, self.attention_bias(merged_size))

    @staticmethod
    def attention_bias(size: torch.Tensor) -> torch.Tensor:
        """log(size) as an additive attention bias over keys: [B, N] -> [B, 1, 1, N]."""
        return size.to(torch.float32).log()[:, None, None, :]

    def extra_repr(self) -> str:
        return f"r={self.r}, protect_first={self.protect_first}"
