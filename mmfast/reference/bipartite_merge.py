"""The meaning of mmfast.ops.bipartite_merge: ToMe's bipartite soft matching followed by a
size-weighted merge (facebookresearch/ToMe ``bipartite_soft_matching`` + ``merge_wavg``),
written out step by step in plain PyTorch.

Differences from ToMe's code, all part of mmfast's contract:
- every tie is broken by the lower index (a B token's best match, and the ranking of A tokens);
- the output keeps the surviving tokens in their original relative order (ToMe puts the
  unmerged A tokens first, then the B tokens);
- ``dest`` maps each input token to its output row;
- the similarity is computed in float64 from the metric as given, the same way for every
  pair of tokens, so the reference itself introduces no rounding into which tokens merge and
  duplicate tokens tie exactly;
- a metric row of zeros has similarity 0 to every token (ToMe would produce NaN);
- ``merged_size`` is float32 (a bfloat16 size stops counting exactly at 256).
"""

import torch


def _distinct_row_products(a, b):
    """a @ b.T with every pair of equal rows given the same value: a [Na, K], b [Nb, K]."""
    ua, ia = torch.unique(a, dim=0, return_inverse=True)
    ub, ib = torch.unique(b, dim=0, return_inverse=True)
    return (ua @ ub.T)[ia][:, ib]


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, size=None,
                    protect_first: bool = False):
    """x [B, N, C], metric [B, N, Cm], size [B, N] or None ->
    merged [B, N - r, C] (x's dtype), merged_size [B, N - r] float32, dest [B, N] int64."""
    bsz, n, _ = x.shape
    if size is None:
        size = torch.ones(bsz, n, dtype=torch.float64, device=x.device)
    size = size.to(torch.float64)

    m = metric.to(torch.float64)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    a, b = m[:, ::2], m[:, 1::2]              # even tokens -> A, odd tokens -> B
    # [B, Na, Nb]. A GEMM may round equal rows differently by their position in its tiles,
    # which would decide exact ties by rounding: score each distinct pair of rows once.
    scores = torch.stack([_distinct_row_products(a[i], b[i]) for i in range(bsz)])
    if protect_first:
        scores[:, 0, :] = -torch.inf

    # torch.max does not promise which index it returns on ties: take the lowest explicitly.
    node_max = scores.max(dim=-1).values      # [B, Na]
    nb = scores.shape[-1]
    cols = torch.arange(nb, device=x.device).expand_as(scores)
    node_idx = torch.where(scores == node_max[..., None], cols, nb).min(dim=-1).values
    # Rank A tokens by score, highest first; equal scores keep index order (stable sort).
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_a = order[:, :r]                      # A tokens that merge away
    dst_b = node_idx.gather(1, src_a)         # ...into these B tokens

    # Token-level bookkeeping: which tokens survive, and where every token goes.
    token_of_a = torch.arange(0, n, 2, device=x.device)
    token_of_b = torch.arange(1, n, 2, device=x.device)
    survives = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
    survives.scatter_(1, token_of_a[src_a], False)
    row = survives.long().cumsum(1) - 1       # output row of each surviving token
    dest = torch.where(survives, row, 0)
    dest.scatter_(1, token_of_a[src_a], row.gather(1, token_of_b[dst_b]))

    xs = x.to(torch.float64) * size[..., None]
    out = torch.zeros(bsz, n - r, x.shape[-1], dtype=torch.float64, device=x.device)
    out.scatter_add_(1, dest[..., None].expand_as(xs), xs)
    merged_size = torch.zeros(bsz, n - r, dtype=torch.float64, device=x.device)
    merged_size.scatter_add_(1, dest, size)
    merged = out / merged_size[..., None]
    return merged.to(x.dtype), merged_size.to(torch.float32), dest


def tome_bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, size=None,
                         protect_first: bool = False):
    """ToMe's own computation, in the input dtype and with ToMe's output order (unmerged A
    tokens, then B tokens): the eager baseline the benchmarks measure against. It picks the
    same tokens as `bipartite_merge` up to rounding and ties; use that one for correctness.
    Returns merged [B, N - r, C] and merged_size [B, N - r, 1]."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[..., ::2, :], m[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if protect_first:
            scores[..., 0, :] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if protect_first:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged = merge(x * size)
    merged_size = merge(size)
    return merged / merged_size, merged_size
