"""bipartite_merge: ToMe's bipartite soft matching and size-weighted merge, fused."""

import torch

from mmfast import _backend
from mmfast.ops._checks import check_float, check_same


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, size=None,
                    protect_first: bool = False):
    """Merge the ``r`` most redundant tokens of each sample (ToMe, Bolya et al. 2023).

    x:      [B, N, C] float32, float16 or bfloat16 (any strides).
    metric: [B, N, Cm], x's dtype: what similarity is measured on (ToMe: the keys, mean over
            heads).
    r:      how many tokens to remove, 0 <= r <= (N - protect_first) // 2.
    size:   [B, N] float, how many original tokens each row stands for (default: ones).
    protect_first: token 0 (a CLS token) is never merged.

    Tokens split alternately, even -> A, odd -> B. Each A token's match is the B token of
    highest cosine similarity of the metric (lowest index on ties); the r A tokens whose
    matches score highest (lower index on ties) merge into their matches:
        merged[o] = sum_{t in group o} size[t] x[t] / sum_{t in group o} size[t]
    Returns
        merged      [B, N - r, C] in x's dtype: surviving tokens in their original order,
        merged_size [B, N - r] float32: the summed sizes,
        dest        [B, N] int64: the output row of every input token (unmerge: merged[dest]).
    Differentiable in x (the matching itself is not: metric gets no gradient). A non-finite
    value in the metric is an error.
    """
    # The schema takes size positionally: register_autograd does not support keyword-only tensors.
    return torch.ops.mmfast.bipartite_merge(x, metric, r, size, protect_first)


def _check(x, metric, r, size, protect_first) -> None:
    op = "bipartite_merge"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, N, C], got {list(x.shape)}")
    if metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"{op}: metric must have shape [B, N, Cm] with x's B and N = "
                         f"{list(x.shape[:2])}, got {list(metric.shape)}")
    check_float(op, "x", x)
    check_same(op, "metric", metric, "x", x)
    max_r = max(x.shape[1] - int(protect_first), 0) // 2
    if not 0 <= r <= max_r:
        raise ValueError(f"{op}: r must be in [0, {max_r}] for N = {x.shape[1]}"
                         f"{' with protect_first' if protect_first else ''}, got r = {r}")
    if size is not None:
        if size.shape != x.shape[:2]:
            raise ValueError(f"{op}: size must have shape [B, N] = {list(x.shape[:2])}, "
                             f"got {list(size.shape)}")
        check_float(op, "size", size)
        if size.device != x.device:
            raise ValueError(f"{op}: size is on {size.device} but x is on {x.device}")


@torch.library.register_fake("mmfast::bipartite_merge")
def _bipartite_merge_fake(x, metric, r, size=None, protect_first=False):
    _check(x, metric, r, size, protect_first)
    b, n, c = x.shape
    return (x.new_empty(b, n - r, c), x.new_empty(b, n - r, dtype=torch.float32),
            x.new_empty(b, n, dtype=torch.int64))


@torch.library.register_fake("mmfast::bipartite_merge_backward")
def _bipartite_merge_backward_fake(grad_merged, dest, size, merged_size):
    return grad_merged.new_empty(dest.shape[0], dest.shape[1], grad_merged.shape[2])


def _setup_context(ctx, inputs, output):
    _, merged_size, dest = output
    ctx.save_for_backward(dest, merged_size, inputs[3])


def _backward(ctx, grad_merged, grad_size, grad_dest):
    dest, merged_size, size = ctx.saved_tensors
    grad_x = torch.ops.mmfast.bipartite_merge_backward(
        grad_merged.contiguous(), dest, size, merged_size)
    return grad_x, None, None, None, None


torch.library.register_autograd("mmfast::bipartite_merge", _backward,
                                setup_context=_setup_context)
