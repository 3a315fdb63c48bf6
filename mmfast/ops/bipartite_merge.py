"""bipartite_merge: ToMe's bipartite soft matching and size-weighted merge, fused."""

import torch

from mmfast import _backend
from mmfast.ops._checks import check_float, check_per_token, check_same


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
    value in the metric is an error. Similarities are float32 dot products of the metric rows,
    scaled by the inverse norms afterwards: metric values must keep those dot products finite
    in float32 (|values| up to ~1e18 for Cm = 1024), and on CPU a metric row that is not zero
    must have a norm of at least 2^-50 (else an error: its products would underflow).
    On CPU the similarity GEMM runs in int8 (VNNI; bfloat16 on CPUs without it) and every B
    token that could still be a row's best within the GEMM's rounding is re-scored exactly; on
    CUDA a Triton kernel (float32 via 3-pass TF32) finds the matches, then a deterministic
    selection and a segmented merge.
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
        check_per_token(op, "size", size, x)


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


# --- CUDA: Triton matching, then the selection (deterministic torch sorts and scans), then
# the segmented merge in CUDA C++ (16-byte vectors) or Triton -----------------------------

def _select(node_max, node_idx, n, r):
    """Which tokens merge, from each A token's best match: (dest [B, N], perm [B, N],
    starts [B, N - r + 1]); row o's tokens are perm[starts[o] .. starts[o + 1]), by index."""
    bsz = node_max.shape[0]
    # A stable sort keeps equal scores in index order: ToMe's choice, ties to the lower index.
    order = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    src = 2 * order[:, :r]                                  # merged A tokens (token index)
    dst = 2 * node_idx.gather(1, order[:, :r]) + 1          # their B tokens
    survives = torch.ones(bsz, n, dtype=torch.int64, device=node_max.device)
    survives.scatter_(1, src, 0)
    row = survives.cumsum(1) - 1
    dest = (row * survives).scatter_(1, src, row.gather(1, dst))
    sorted_dest, perm = torch.sort(dest, dim=1, stable=True)
    bounds = torch.arange(n - r + 1, device=dest.device).expand(bsz, -1).contiguous()
    starts = torch.searchsorted(sorted_dest, bounds)
    return dest, perm, starts


def _match(x, metric, r, size, protect_first):
    from mmfast.kernels.bipartite_merge import best_matches, inverse_norms

    if not bool(torch.isfinite(metric).all()):  # a host sync: NaN must not merge silently
        bad = (~torch.isfinite(metric)).nonzero()[0].tolist()
        raise ValueError(f"bipartite_merge: metric has a non-finite value at {bad}; "
                         "similarities would be NaN")
    n = x.shape[1]
    if r == 0:
        node_max = metric.new_zeros(x.shape[0], (n + 1) // 2, dtype=torch.float32)
        node_idx = node_max.long()
    else:
        node_max, node_idx = best_matches(metric, inverse_norms(metric), protect_first)
    return _select(node_max, node_idx, n, r)


def _cuda_merge_reasons(*args):
    return _backend.cuda_kernels_available() + _backend.triton_available()


def _triton_reasons(*args):
    return _backend.triton_available()


def _run_cuda(x, metric, r, size, protect_first):
    dest, perm, starts = _match(x, metric, r, size, protect_first)
    merged, merged_size = torch.ops.mmfast._bipartite_merge_cuda(x, perm, starts, size)
    return merged, merged_size, dest


def _run_triton(x, metric, r, size, protect_first):
    from mmfast.kernels.bipartite_merge import merge_groups

    dest, perm, starts = _match(x, metric, r, size, protect_first)
    merged, merged_size = merge_groups(x, perm, starts, size)
    return merged, merged_size, dest


def _run_triton_backward(grad_merged, dest, size, merged_size):
    from mmfast.kernels.bipartite_merge import merge_backward

    if dest.numel() and not (0 <= int(dest.min()) and int(dest.max()) < grad_merged.shape[1]):
        raise IndexError(f"bipartite_merge_backward: dest has values outside "
                         f"[0, {grad_merged.shape[1]})")
    return merge_backward(grad_merged, dest, size, merged_size)


FORWARD_IMPLS = (
    _backend.Implementation("triton-match+cuda-merge", "cuda", _cuda_merge_reasons, _run_cuda),
    _backend.Implementation("triton", "triton", _triton_reasons, _run_triton),
)
BACKWARD_IMPLS = (
    _backend.Implementation("cuda-vec16", "cuda", lambda *a: _backend.cuda_kernels_available(),
                            lambda *a: torch.ops.mmfast._bipartite_merge_backward_cuda(*a)),
    _backend.Implementation("triton", "triton", _triton_reasons, _run_triton_backward),
)


def _check_backward(grad_merged, dest, size, merged_size):
    op = "bipartite_merge_backward"
    if grad_merged.dim() != 3 or dest.dim() != 2 or dest.shape[0] != grad_merged.shape[0]:
        raise ValueError(f"{op}: grad_merged must be [B, M, C] and dest [B, N], got "
                         f"{list(grad_merged.shape)} and {list(dest.shape)}")
    if merged_size.shape != grad_merged.shape[:2] or merged_size.dtype != torch.float32:
        raise ValueError(f"{op}: merged_size must be float32 {list(grad_merged.shape[:2])}")


@torch.library.register_kernel("mmfast::bipartite_merge", "cuda")
def _bipartite_merge_cuda(x, metric, r, size=None, protect_first=False):
    _check(x, metric, r, size, protect_first)
    return _backend.dispatch("bipartite_merge", FORWARD_IMPLS, x, metric, r, size, protect_first)


@torch.library.register_kernel("mmfast::bipartite_merge_backward", "cuda")
def _bipartite_merge_backward_cuda(grad_merged, dest, size, merged_size):
    _check_backward(grad_merged, dest, size, merged_size)
    return _backend.dispatch("bipartite_merge_backward", BACKWARD_IMPLS, grad_merged, dest, size,
                             merged_size)
