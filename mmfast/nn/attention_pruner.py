"""Attention-guided image-token pruning (FastV, VisionZip), over mmfast.ops.key_attention_mass
and mmfast.ops.prune_tokens."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.cross_attention import key_attention_mass
from mmfast.ops.prune_tokens import prune_tokens

SCORES = ("mass", "cls")


class PrunedTokens(NamedTuple):
    x: torch.Tensor       # [B, keep + contextual, C]: kept tokens in order, then contextual ones
    index: torch.Tensor   # [B, keep] int64: the input row of each kept token, ascending
    scores: torch.Tensor  # [B, N] float32: the attention score of every input token


class AttentionPruner(nn.Module):
    """Keeps the ``keep`` image tokens that receive the most attention, optionally merging the
    dropped ones into ``contextual`` extra tokens (VisionZip, Yang et al. 2024).

    forward(x, q, k, metric=None):
      x:      [B, N, C] the tokens to prune.
      q:      [B, Lq, Hq, D] the queries of the attention that scores them (FastV: the text /
              last-token queries at layer K; VisionZip: the vision tower's penultimate layer).
      k:      [B, N, Hk, D] the keys of the N tokens in that attention.
      metric: [B, N, Cm] the similarity features for the contextual merge; defaults to k
              averaged over heads (VisionZip's choice).

    score="mass": a token's score is the attention it receives summed over heads and all
        queries (key_attention_mass). score="cls": only the query at position 0 (the CLS
        token) counts, as in VisionZip; the CLS token itself is then always kept, as one of the
        ``keep`` tokens.
    contextual: the dropped tokens are spread into ``contextual`` groups: every
        (dropped // contextual)-th dropped token is a group centre (VisionZip's uniform choice)
        and each other dropped token joins the centre whose metric is most cosine-similar; a
        group becomes the mean of its tokens. (VisionZip's release adds the centre to the mean
        of its members instead; the group mean keeps the token scale of the input, as ToMe's
        merge does.)
    """

    def __init__(self, keep: int, contextual: int = 0, score: str = "mass"):
        super().__init__()
        if keep < 0 or contextual < 0:
            raise ValueError(f"AttentionPruner: keep and contextual must be >= 0, got keep={keep}, "
                             f"contextual={contextual}")
        if score not in SCORES:
            raise ValueError(f"AttentionPruner: score must be one of {SCORES}, got {score!r}")
        if score == "cls" and keep < 1:
            raise ValueError("AttentionPruner: score='cls' keeps the CLS token, so keep must be "
                             ">= 1")
        self.keep = keep
        self.contextual = contextual
        self.score = score

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                metric: Optional[torch.Tensor] = None) -> PrunedTokens:
        n = x.shape[1]
        if self.keep + self.contextual > n:
            raise ValueError(f"AttentionPruner: keep + contextual ({self.keep} + "
                             f"{self.contextual}) exceeds the number of tokens N = {n}")
        if k.dim() != 4 or k.shape[:2] != x.shape[:2]:
            raise ValueError(f"AttentionPruner: k must be [B, N, Hk, D] with [B, N] = "
                             f"{list(x.shape[:2])}, got {list(k.shape)}")
        # The choice of tokens is discrete: no gradient flows into the scores.
        q, k = q.detach(), k.detach()
        if self.score == "cls":
            scores = key_attention_mass(q[:, :1], k)
            # CLS is always kept: rank it above every other token.
            scores = scores.index_fill(1, torch.tensor([0], device=x.device), float("inf"))
        else:
            scores = key_attention_mass(q, k)
        kept, index = prune_tokens(x, scores, self.keep)
        if self.contextual == 0:
            return PrunedTokens(kept, index, scores)
        if metric is None:
            metric = k.mean(dim=2)
        contextual = self._merge_dropped(x, metric.detach(), index)
        return PrunedTokens(torch.cat((kept, contextual), dim=1), index, scores)

    def _merge_dropped(self, x, metric, index):
        # x [B, N, C], metric [B, N, Cm], index [B, keep] -> [B, contextual, C]
        b, n, c = x.shape
        n_drop = n - self.keep
        dropped_mask = torch.ones(b, n, dtype=torch.float32, device=x.device)
        dropped_mask.scatter_(1, index, 0.0)
        # Selecting the tokens scored 1 returns exactly the dropped ones, in order.
        dropped, _ = prune_tokens(x, dropped_mask, n_drop)            # [B, n_drop, C]
        dropped_metric, _ = prune_tokens(metric, dropped_mask, n_drop)  # [B, n_drop, Cm]
        # Centre positions depend only on the sizes: index lists built in Python keep every
        # shape static (torch.compile(fullgraph=True) traces no data-dependent size).
        step = max(1, n_drop // self.contextual)
        centre_pos = list(range(0, n_drop, step))[:self.contextual]
        centre_set = set(centre_pos)
        member_pos = [i for i in range(n_drop) if i not in centre_set]
        centre_idx = torch.tensor(centre_pos, device=x.device)
        member_idx = torch.tensor(member_pos, dtype=torch.int64, device=x.device)
        centres, members = dropped[:, centre_idx], dropped[:, member_idx]
        unit = F.normalize(dropped_metric.float(), dim=-1)
        # bipartite_merge's contract fixes its two sets (even / odd positions) and merges at
        # most half the tokens, so it cannot assign all members to a few chosen centres; the
        # assignment and the group means are done here with tensor ops.
        similarity = unit[:, member_idx] @ unit[:, centre_idx].transpose(1, 2)  # [B, members, ctx]
        group = similarity.argmax(dim=2)                                     # [B, members]
        # Sums and counts in float32: a bfloat16 count is inexact above 256 members.
        sums = centres.float().scatter_add(1, group[..., None].expand(-1, -1, c), members.float())
        counts = torch.ones(b, self.contextual, dtype=torch.float32, device=x.device)
        counts = counts.scatter_add(1, group, torch.ones_like(group, dtype=torch.float32))
        return (sums / counts[..., None]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, contextual={self.contextual}, score={self.score!r}"
