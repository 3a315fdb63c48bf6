"""prune_tokens: keep the highest-scoring tokens of each sample, in their original order."""

import torch

from mmfast.ops._checks import check_float


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
    if scores.shape != x.shape[:2]:
        raise ValueError(f"{op}: scores must have shape [B, N] = {list(x.shape[:2])}, "
                         f"got {list(scores.shape)}")
    check_float(op, "scores", scores)
    if scores.device != x.device:
        raise ValueError(f"{op}: scores is on {scores.device} but x is on {x.device}")
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
