import torch


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int):
    """The meaning of mmfast.ops.prune_tokens: per sample, the `keep` tokens with the highest
    score (equal scores: the lower index first), returned in their original order.
    x [B, N, C], scores [B, N] -> kept [B, keep, C], index [B, keep] int64 (ascending)."""
    order = torch.sort(scores.to(torch.float64), dim=-1, descending=True, stable=True).indices
    index = order[:, :keep].sort(dim=-1).values
    kept = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return kept, index
