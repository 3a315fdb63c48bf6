"""prune_tokens: keep the highest-scoring tokens of each sample, in their original order."""

import torch

from mmfast import _backend
from mmfast.ops._checks import check_per_token


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int):
    """The ``keep`` highest-scoring tokens per sample (FastV / VisionZip token selection).

    x:      [B, N, C] any dtype and strides.
    scores: [B, N] float32, float16 or bfloat16 (NaN is an error); equal scores rank the
            lower index first.
    keep:   0 <= keep <= N.
    Returns kept [B, keep, C] (x's dtype, tokens in their original order) and
    index [B, keep] int64 (ascending). Differentiable in x.
    """
    return torch.ops.mmfast.prune_tokens(x, scores, keep)


def _check(x, scores, keep) -> None:
    op = "prune_tokens"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, N, C], got {list(x.shape)}")
    check_per_token(op, "scores", scores, x)
    if not 0 <= keep <= x.shape[1]:
        raise ValueError(f"{op}: keep must be in [0, N = {x.shape[1]}], got {keep}")


@torch.library.register_fake("mmfast::prune_tokens")
def _prune_tokens_fake(x, scores, keep):
    _check(x, scores, keep)
    return x.new_empty(x.shape[0], keep, x.shape[2]), x.new_empty(x.shape[0], keep,
                                                                  dtype=torch.int64)


@torch.library.register_fake("mmfast::prune_tokens_backward")
def _prune_tokens_backward_fake(grad_kept, index, n):
    return grad_kept.new_empty(grad_kept.shape[0], n, grad_kept.shape[2])


def _setup_context(ctx, inputs, output):
    x, _, _ = inputs
    ctx.n = x.shape[1]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_kept, grad_index):
    (index,) = ctx.saved_tensors
    return torch.ops.mmfast.prune_tokens_backward(grad_kept.contiguous(), index, ctx.n), None, None


torch.library.register_autograd("mmfast::prune_tokens", _backward, setup_context=_setup_context)


# --- CUDA: selection by a stable torch sort, rows moved by the Triton gather/scatter --------

def _select(scores, keep):
    if bool(torch.isnan(scores).any()):  # a host sync: the ranking would be undefined
        bad = torch.isnan(scores).nonzero()[0].tolist()
        raise ValueError(f"prune_tokens: scores{bad} is NaN; the ranking would be undefined")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :keep].sort(dim=1).values


def _run_triton(x, scores, keep):
    from mmfast.kernels.prune_tokens import gather

    index = _select(scores, keep)
    return gather(x, index), index


def _run_triton_backward(grad_kept, index, n):
    from mmfast.kernels.prune_tokens import scatter

    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n):
        raise IndexError(f"prune_tokens_backward: index has values outside [0, {n})")
    return scatter(grad_kept, index, n)


def _triton_reasons(*args):
    return _backend.triton_available()


FORWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons, _run_triton),)
BACKWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons,
                                          _run_triton_backward),)


@torch.library.register_kernel("mmfast::prune_tokens", "cuda")
def _prune_tokens_cuda(x, scores, keep):
    _check(x, scores, keep)
    return _backend.dispatch("prune_tokens", FORWARD_IMPLS, x, scores, keep)


@torch.library.register_kernel("mmfast::prune_tokens_backward", "cuda")
def _prune_tokens_backward_cuda(grad_kept, index, n):
    if grad_kept.dim() != 3 or index.shape != grad_kept.shape[:2]:
        raise ValueError(f"prune_tokens_backward: index must be [B, keep] = "
                         f"{list(grad_kept.shape[:2])}, got {list(index.shape)}")
    return _backend.dispatch("prune_tokens_backward", BACKWARD_IMPLS, grad_kept, index, n)
