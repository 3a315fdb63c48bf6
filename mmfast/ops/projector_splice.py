"""projector_splice: LLaVA's "project the image features, then
inputs_embeds.masked_scatter(image_mask, features)" as one op: the projector's second GEMM
writes its rows straight into their placeholder rows of a copy of embeds."""

import torch

from mmfast import _backend
from mmfast.ops.projector import check_backward, check_weights, grads_like, save_for_backward

OP = "projector_splice"


def projector_splice(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                     w2: torch.Tensor, b2: torch.Tensor | None, embeds: torch.Tensor,
                     image_mask: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``embeds.masked_scatter(image_mask[..., None], projector(x, w1, b1, w2, b2, approximate))``.

    x:          [N, Cin], one row per image token, in the order of the True positions.
    w1, b1, w2, b2, approximate: as in mmfast.ops.projector; w2 [Hout, H].
    embeds:     [..., Hout] (typically [B, L, Hout]), x's dtype and device.
    image_mask: bool, embeds' shape without the last dim; exactly N True positions (a mismatch
        is a ValueError on CPU; on CUDA, where counting would synchronise with the host, it is a
        device-side assertion).
    Returns a new tensor shaped like embeds (contiguous): the True rows hold the projected
    features, the others embeds' rows. Differentiable in x, the weights and embeds.
    """
    # Without a backward to come, h need not outlive the op: the GELU then runs in place.
    keep_h = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, embeds))
    return torch.ops.mmfast.projector_splice(x, w1, b1, w2, b2, embeds, image_mask, approximate,
                                             keep_h)[0]


def check_splice(op, x, w2, embeds, image_mask, embeds_name="embeds"):
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape [N, in_features] (N = number of True "
                         f"positions in image_mask), got {list(x.shape)}")
    if embeds.dim() < 2 or embeds.shape[-1] != w2.shape[0]:
        raise ValueError(f"{op}: {embeds_name} must have shape [..., {w2.shape[0]}] "
                         f"(out_features = w2.shape[0]), got {list(embeds.shape)}")
    if embeds.dtype != x.dtype or embeds.device != x.device:
        raise ValueError(f"{op}: {embeds_name} must have x's dtype and device ({x.dtype}, "
                         f"{x.device}), got {embeds.dtype}, {embeds.device}")
    if image_mask.dtype != torch.bool:
        raise ValueError(f"{op}: image_mask must be bool, got {image_mask.dtype}")
    if image_mask.shape != embeds.shape[:-1]:
        raise ValueError(f"{op}: image_mask must have shape {list(embeds.shape[:-1])} "
                         f"({embeds_name} without its last dim), got {list(image_mask.shape)}")
    if image_mask.device != x.device:
        raise ValueError(f"{op}: image_mask is on {image_mask.device} but x is on {x.device}")


@torch.library.register_fake("mmfast::projector_splice")
def _splice_fake(x, w1, b1, w2, b2, embeds, image_mask, approximate="none", keep_h=True):
    check_weights(OP, x, w1, b1, w2, b2, approximate)
    check_splice(OP, x, w2, embeds, image_mask)
    h = x.new_empty(x.shape[0], w1.shape[0]) if keep_h else x.new_empty(0)
    return embeds.new_empty(embeds.shape), h


@torch.library.register_fake("mmfast::projector_splice_backward")
def _splice_backward_fake(grad_out, x, h, w1, w2, image_mask, approximate, output_mask):
    op = "projector_splice_backward"
    check_backward(op, grad_out, x, h, w1, w2, approximate, output_mask[0])
    check_splice(op, x, w2, grad_out, image_mask, "grad_out")
    grads = grads_like(x, (h.shape[-1], x.shape[-1]), h, w2, output_mask[:5])
    return grads + (grad_out.new_empty(grad_out.shape if output_mask[5] else (0,)),)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, embeds, image_mask, approximate, keep_h = inputs
    save_for_backward(ctx, OP, x, output[1], w1, w2, approximate, keep_h, 6, image_mask)


def _backward(ctx, grad_out, _grad_h):
    x, h, w1, w2, image_mask = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:6])
    if grad_out is None:  # out was not used
        return (None,) * 9
    grads = torch.ops.mmfast.projector_splice_backward(grad_out, x, h, w1, w2, image_mask,
                                                       ctx.approximate, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None, None)


torch.library.register_autograd("mmfast::projector_splice", _backward,
                                setup_context=_setup_context)


# --- CUDA: the Triton GEMM writes through a row-index map; cuBLASLt's output is one strided
# matrix, so the CUDA C++ path has no splice -----------------------------------------------------

def _triton_reasons(*args):
    return _backend.triton_available()


def _triton_forward(x, w1, b1, w2, b2, embeds, image_mask, approximate):
    from mmfast.kernels.projector import projector_splice_forward
    return projector_splice_forward(x, w1, b1, w2, b2, embeds, image_mask, approximate == "tanh")


def _triton_backward(grad_out, x, h, w1, w2, image_mask, approximate, output_mask):
    from mmfast.kernels.projector import projector_splice_backward
    return projector_splice_backward(grad_out, x, h, w1, w2, image_mask, approximate == "tanh",
                                     output_mask)


FORWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons, _triton_forward),)
BACKWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons, _triton_backward),)


@torch.library.register_kernel("mmfast::projector_splice", "cuda")
def _splice_cuda(x, w1, b1, w2, b2, embeds, image_mask, approximate="none", keep_h=True):
    check_weights(OP, x, w1, b1, w2, b2, approximate)
    check_splice(OP, x, w2, embeds, image_mask)
    out, h = _backend.dispatch(OP, FORWARD_IMPLS, x, w1, b1, w2, b2, embeds, image_mask,
                               approximate)
    # the Triton GEMM's epilogue writes h and the activation to separate buffers
    return out, h if keep_h else h.new_empty(0)


@torch.library.register_kernel("mmfast::projector_splice_backward", "cuda")
def _splice_backward_cuda(grad_out, x, h, w1, w2, image_mask, approximate, output_mask):
    op = "projector_splice_backward"
    check_backward(op, grad_out, x, h, w1, w2, approximate, output_mask[0])
    check_splice(op, x, w2, grad_out, image_mask, "grad_out")
    return _backend.dispatch(op, BACKWARD_IMPLS, grad_out, x, h, w1, w2, image_mask,
                             approximate, list(output_mask))
