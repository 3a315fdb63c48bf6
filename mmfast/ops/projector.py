"""projector: the VLM adapter MLP, Linear -> GELU -> Linear, fused, with a memory-lean backward
(only x and the pre-activation h are kept; the activation is recomputed in the backward, in the
same pass as the GELU derivative)."""

import torch

from mmfast import _backend
from mmfast.ops._checks import check_approximate, check_float, check_same

OP = "projector"


def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)``, fused.

    x:  [..., Cin] float32, float16 or bfloat16 (any leading dims, any strides).
    w1: [H, Cin], b1: [H] or None, w2: [Hout, H], b2: [Hout] or None; x's dtype and device.
    approximate: "none" (exact erf GELU, LLaVA's mlp2x_gelu and HF LlavaMultiModalProjector)
        or "tanh".
    Returns out [..., Hout] in x's dtype (GEMMs accumulate in float32, GELU in float32).
    Differentiable in every tensor; for the backward only x and h = x w1^T + b1 [..., H] are
    kept, and a gradient that no input needs is not computed.
    """
    # Without a backward to come, h need not outlive the op: the GELU then runs in place.
    keep_h = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    if keep_h and x.device.type == "cpu" and first_layer_node_lowers_peak(x, w1, w2):
        # Two autograd nodes, as eager's two Linear layers: w2's gradient is added into w2.grad
        # and freed before w1's is computed (see _projector_link in csrc/registration.cpp).
        link = torch.ops.mmfast._projector_link(x, w1)
        return torch.ops.mmfast._projector_linked(x, w1, b1, w2, b2, link, approximate)[0]
    return torch.ops.mmfast.projector(x, w1, b1, w2, b2, approximate, keep_h)[0]


def first_layer_node_lowers_peak(x, w1, w2) -> bool:
    """Whether to give the first layer's gradients an autograd node of their own. One node
    holds dx [M, Cin] and dw1 [H, Cin] (those asked for) next to dw2 until it returns; two
    nodes hold grad_h^T [H, M] there instead, the second node's input. Two are taken where
    grad_h^T is at most half of what they save, since the second node costs time (bf16 A/B on
    AMX: SigLIP's 729 x 1152 tokens x features 1.02-1.03x slower for 3.3 MiB less; InternVL's
    1792 x 4096 0.96x for 14 MiB less; float32 0.98x, its grad_h^T transposed in a tiled pass
    of its own). At LLaVA-1.5's 4608 x 1024 grad_h^T would be 4.5x dw1: one node."""
    if not w2.requires_grad or not (x.requires_grad or w1.requires_grad) or x.dim() < 1:
        return False  # (a 0-d x: the op's checks say what is wrong)
    m, cin, hidden = rows_of(x), x.shape[-1], w1.shape[0]
    held = (hidden * cin if w1.requires_grad else 0) + (m * cin if x.requires_grad else 0)
    return 2 * hidden * m <= held


def check_input(op: str, x, w1) -> None:
    """x [..., Cin] of a float dtype, w1 [H, Cin] (shape only: callers check w1 as an operand)."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    check_float(op, "x", x)
    if w1.dim() != 2 or w1.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: w1 must have shape [hidden, {x.shape[-1]}] (in_features = the "
                         f"last dim of x), got {list(w1.shape)}")


def check_weights(op: str, x, w1, b1, w2, b2, approximate) -> bool:
    """Checks the projector operands (shared with projector_splice); True for the tanh form."""
    tanh = check_approximate(op, approximate)
    check_input(op, x, w1)
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{op}: w2 must have shape [out_features, {w1.shape[0]}] (hidden = "
                         f"w1.shape[0]), got {list(w2.shape)}")
    check_same(op, "w1", w1, "x", x)
    check_same(op, "w2", w2, "x", x)
    for name, b, w in (("b1", b1, w1), ("b2", b2, w2)):
        if b is None:
            continue
        if b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"{op}: {name} must have shape [{w.shape[0]}], got {list(b.shape)}")
        check_same(op, name, b, "x", x)
    return tanh


def check_backward(op: str, grad_out, x, h, w1, w2, approximate, need_grad_x: bool) -> bool:
    tanh = check_approximate(op, approximate)
    if x.dim() < 1 or h.dim() != x.dim() or h.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: h must have x's leading dims, got {list(h.shape)} for x "
                         f"{list(x.shape)}")
    if w2.dim() != 2 or w2.shape[1] != h.shape[-1]:
        raise ValueError(f"{op}: w2 must have shape [out_features, {h.shape[-1]}], got "
                         f"{list(w2.shape)}")
    if grad_out.dim() < 1 or grad_out.shape[-1] != w2.shape[0]:
        raise ValueError(f"{op}: grad_out's last dim must be {w2.shape[0]}, got "
                         f"{list(grad_out.shape)}")
    if need_grad_x and w1 is None:
        raise ValueError(f"{op}: w1 is needed for the gradient of x")
    if w1 is not None:
        if w1.dim() != 2 or tuple(w1.shape) != (h.shape[-1], x.shape[-1]):
            raise ValueError(f"{op}: w1 must have shape [{h.shape[-1]}, {x.shape[-1]}], got "
                             f"{list(w1.shape)}")
        check_same(op, "w1", w1, "x", x)
    for name, t in (("grad_out", grad_out), ("h", h), ("w2", w2)):
        check_same(op, name, t, "x", x)
    return tanh


def grads_like(x, w1_shape, h, w2, mask):
    """Fake gradients: (x, w1, b1, w2, b2) shapes where asked for, empty tensors elsewhere."""
    shapes = (x.shape, w1_shape, (h.shape[-1],), w2.shape, (w2.shape[0],))
    return tuple(x.new_empty(s if m else (0,)) for s, m in zip(shapes, mask))


@torch.library.register_fake("mmfast::projector")
def _projector_fake(x, w1, b1, w2, b2, approximate="none", keep_h=True):
    check_weights(OP, x, w1, b1, w2, b2, approximate)
    h = x.new_empty(*x.shape[:-1], w1.shape[0]) if keep_h else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], w2.shape[0]), h


@torch.library.register_fake("mmfast::projector_backward")
def _projector_backward_fake(grad_out, x, h, w1, w2, approximate, output_mask):
    check_backward("projector_backward", grad_out, x, h, w1, w2, approximate, output_mask[0])
    w1_shape = (h.shape[-1], x.shape[-1])
    return grads_like(x, w1_shape, h, w2, output_mask)


def packed_weight_shape(w: torch.Tensor) -> tuple[int, int, int, int]:
    """Shape of _projector_pack_weight(w) for w [N, K]: [ceil(N/64), ceil(K/2), 64, 2]."""
    return (-(-w.shape[0] // 64), -(-w.shape[1] // 2), 64, 2)


@torch.library.register_fake("mmfast::_projector_pack_weight")
def _pack_weight_fake(w):
    if w.dim() != 2:
        raise ValueError("projector_pack_weight: w must be 2-D [out_features, in_features], got "
                         f"shape {list(w.shape)}")
    if w.dtype != torch.bfloat16:
        raise ValueError(f"projector_pack_weight: w must be bfloat16, got {w.dtype}")
    return w.new_empty(packed_weight_shape(w))


@torch.library.register_fake("mmfast::_projector_prepacked")
def _prepacked_fake(x, w1, w1_packed, b1, w2, w2_packed, b2, approximate="none"):
    op = "projector_prepacked"
    check_weights(op, x, w1, b1, w2, b2, approximate)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"{op}: x must be bfloat16, got {x.dtype}")
    for name, packed, w in (("w1", w1_packed, w1), ("w2", w2_packed, w2)):
        if packed.dtype != torch.bfloat16 or tuple(packed.shape) != packed_weight_shape(w):
            raise ValueError(f"{op}: {name}_packed must be projector_pack_weight({name}): "
                             f"bfloat16 of shape {list(packed_weight_shape(w))}, got "
                             f"{packed.dtype} {list(packed.shape)}")
    return x.new_empty(*x.shape[:-1], w2.shape[0])


def save_for_backward(ctx, op: str, x, h, w1, w2, approximate, keep_h: bool, n_inputs: int,
                      *extra) -> None:
    """The autograd context of projector and projector_splice: x, h, w1 (only when x needs a
    gradient), w2 and `extra`. n_inputs: how many leading inputs are differentiable."""
    if not keep_h and any(ctx.needs_input_grad[:n_inputs]):
        raise RuntimeError(f"{op}: keep_h=False drops the pre-activation the backward needs; "
                           "pass keep_h=True when an input requires grad")
    ctx.mark_non_differentiable(h)
    # h never receives a gradient; without this autograd would hand the backward a zero-filled
    # tensor of h's size (an [N, hidden] allocation and memset per step).
    ctx.set_materialize_grads(False)
    # w1 is only needed for grad_x: a frozen x (the alignment stage) keeps no reference to it.
    ctx.save_for_backward(x, h, w1 if ctx.needs_input_grad[0] else None, w2, *extra)
    ctx.approximate = approximate


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, keep_h = inputs
    save_for_backward(ctx, OP, x, output[1], w1, w2, approximate, keep_h, 5)


def _backward(ctx, grad_out, _grad_h):
    x, h, w1, w2 = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])
    if grad_out is None:  # out was not used
        return (None,) * 7
    grads = torch.ops.mmfast.projector_backward(grad_out, x, h, w1, w2, ctx.approximate, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None)


torch.library.register_autograd("mmfast::projector", _backward, setup_context=_setup_context)


# --- CPU training graph: the first layer's gradients in a node of their own -----------------

def rows_of(x) -> int:
    return int(torch.Size(x.shape[:-1]).numel())


def check_link(op: str, name: str, link, x, hidden: int) -> None:
    """link / grad_link: [hidden, rows of x], grad_h^T's shape, which the link stands for."""
    expected = (hidden, rows_of(x))
    if tuple(link.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {list(expected)} (hidden, the rows of x), "
                         f"got {list(link.shape)}")
    check_same(op, name, link, "x", x)


@torch.library.register_fake("mmfast::_projector_link")
def _link_fake(x, w1):
    # errors name the op the user called (projector)
    check_input(OP, x, w1)
    check_same(OP, "w1", w1, "x", x)
    return x.new_empty_strided((w1.shape[0], rows_of(x)), (0, 0))


@torch.library.register_fake("mmfast::_projector_linked")
def _linked_fake(x, w1, b1, w2, b2, link, approximate="none"):
    outputs = _projector_fake(x, w1, b1, w2, b2, approximate, True)  # checks the operands
    check_link(OP, "link", link, x, w1.shape[0])
    return outputs


@torch.library.register_fake("mmfast::_projector_backward_head")
def _backward_head_fake(grad_out, x, h, w2, approximate, output_mask):
    op = "projector_backward_head"
    check_backward(op, grad_out, x, h, None, w2, approximate, False)
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: grad_out must have x's leading dims, got {list(grad_out.shape)} "
                         f"for x {list(x.shape)}")
    m = rows_of(x)
    # grad_h^T [H, M], rows padded to an even length (link_gradient_buffer in the CPU kernels)
    grad_link = (x.new_empty_strided((h.shape[-1], m), (max(m + m % 2, 1), 1)) if output_mask[0]
                 else x.new_empty(0))
    shapes = ((h.shape[-1],), w2.shape, (w2.shape[0],))
    return (grad_link,) + tuple(x.new_empty(s if k else (0,))
                                for s, k in zip(shapes, output_mask[1:]))


@torch.library.register_fake("mmfast::_projector_backward_tail")
def _backward_tail_fake(grad_link, x, w1, output_mask):
    op = "projector_backward_tail"
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if grad_link.dim() != 2:
        raise ValueError(f"{op}: grad_link must be 2-D [hidden, rows of x], got "
                         f"{list(grad_link.shape)}")
    check_link(op, "grad_link", grad_link, x, grad_link.shape[0])
    if output_mask[0] and w1 is None:
        raise ValueError(f"{op}: w1 is needed for the gradient of x")
    if w1 is not None:
        if w1.dim() != 2 or tuple(w1.shape) != (grad_link.shape[0], x.shape[-1]):
            raise ValueError(f"{op}: w1 must have shape [{grad_link.shape[0]}, {x.shape[-1]}], "
                             f"got {list(w1.shape)}")
        check_same(op, "w1", w1, "x", x)
    shapes = (x.shape, (grad_link.shape[0], x.shape[-1]))
    return tuple(x.new_empty(s if m else (0,)) for s, m in zip(shapes, output_mask))


def _link_setup_context(ctx, inputs, output):
    x, w1 = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1 if ctx.needs_input_grad[0] else None)


def _link_backward(ctx, grad_link):
    if grad_link is None:
        return None, None
    x, w1 = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    grads = torch.ops.mmfast._projector_backward_tail(grad_link, x, w1, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


def _linked_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, link, approximate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    # x only for the shape checks (an input: no memory of its own); w1 is the link's to keep.
    ctx.save_for_backward(x, output[1], w2)
    ctx.approximate = approximate


def _linked_backward(ctx, grad_out, _grad_h):
    if grad_out is None:
        return (None,) * 7
    x, h, w2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[5], needs[2], needs[3], needs[4]]  # link, b1, w2, b2
    g_link, g_b1, g_w2, g_b2 = torch.ops.mmfast._projector_backward_head(
        grad_out, x, h, w2, ctx.approximate, mask)
    keep = lambda g, m: g if m else None  # noqa: E731
    return (None, None, keep(g_b1, mask[1]), keep(g_w2, mask[2]), keep(g_b2, mask[3]),
            keep(g_link, mask[0]), None)


torch.library.register_autograd("mmfast::_projector_link", _link_backward,
                                setup_context=_link_setup_context)
torch.library.register_autograd("mmfast::_projector_linked", _linked_backward,
                                setup_context=_linked_setup_context)


# --- CUDA: cuBLASLt (CUDA C++) first, the Triton GEMM for what it cannot take -----------------

def _lt_reasons(features, tensors):
    """cuBLASLt's GELU aux buffer needs a leading dimension divisible by 8, and its fast
    kernels 16-byte aligned rows and pointers."""
    reasons = _backend.cuda_kernels_available()
    for name, n in features:
        if n % 8:
            reasons.append(f"{name} {n} is not a multiple of 8 (cuBLASLt's aligned rows)")
    for name, t in tensors:
        if t is not None and t.data_ptr() % 16:
            reasons.append(f"{name} is not 16-byte aligned")
    return reasons


def _cuda_reasons(x, w1, b1, w2, b2, *rest):
    return _lt_reasons((("in_features", w1.shape[1]), ("hidden", w1.shape[0]),
                        ("out_features", w2.shape[0])),
                       (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)))


def _cuda_backward_reasons(grad_out, x, h, w1, w2, *rest):
    return _lt_reasons((("in_features", x.shape[-1]), ("hidden", h.shape[-1]),
                        ("out_features", w2.shape[0])),
                       (("grad_out", grad_out), ("x", x), ("h", h), ("w1", w1), ("w2", w2)))


def _triton_reasons(*args):
    return _backend.triton_available()


def _triton_forward(x, w1, b1, w2, b2, approximate):
    from mmfast.kernels.projector import projector_forward
    return projector_forward(x, w1, b1, w2, b2, approximate == "tanh")


def _triton_backward(grad_out, x, h, w1, w2, approximate, output_mask):
    from mmfast.kernels.projector import projector_backward
    return projector_backward(grad_out, x, h, w1, w2, approximate == "tanh", output_mask)


FORWARD_IMPLS = (
    _backend.Implementation("cublaslt", "cuda", _cuda_reasons,
                            lambda *a: torch.ops.mmfast._projector_cuda(*a)),
    _backend.Implementation("triton", "triton", _triton_reasons, _triton_forward),
)
BACKWARD_IMPLS = (
    _backend.Implementation("cublaslt", "cuda", _cuda_backward_reasons,
                            lambda *a: torch.ops.mmfast._projector_backward_cuda(*a)),
    _backend.Implementation("triton", "triton", _triton_reasons, _triton_backward),
)


@torch.library.register_kernel("mmfast::projector", "cuda")
def _projector_cuda(x, w1, b1, w2, b2, approximate="none", keep_h=True):
    check_weights(OP, x, w1, b1, w2, b2, approximate)
    out, h = _backend.dispatch(OP, FORWARD_IMPLS, x, w1, b1, w2, b2, approximate)
    # the CUDA implementations always write h (their epilogues need it as a separate buffer)
    return out, h if keep_h else h.new_empty(0)


@torch.library.register_kernel("mmfast::projector_backward", "cuda")
def _projector_backward_cuda(grad_out, x, h, w1, w2, approximate, output_mask):
    check_backward("projector_backward", grad_out, x, h, w1, w2, approximate, output_mask[0])
    return _backend.dispatch("projector_backward", BACKWARD_IMPLS, grad_out, x, h, w1, w2,
                             approximate, list(output_mask))
