"""bias_gelu: y = gelu(x + bias), fused into one pass over memory."""

import torch

from mmfast import _backend
from mmfast.ops._checks import check_approximate, check_float, check_same


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` in one pass.

    x:    [..., C] float32, float16 or bfloat16 (any strides).
    bias: [C], same dtype and device as x.
    approximate: "none" (exact, erf) or "tanh".
    Returns y [..., C] (contiguous) in x's dtype; the math is done in float32.
    Differentiable in x and bias.
    """
    return torch.ops.mmfast.bias_gelu(x, bias, approximate)


def _check(x, bias, approximate) -> bool:
    tanh = check_approximate("bias_gelu", approximate)
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dimension")
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias_gelu: bias must have shape [{x.shape[-1]}] (the last dim of x), "
                         f"got {list(bias.shape)}")
    check_float("bias_gelu", "x", x)
    check_same("bias_gelu", "bias", bias, "x", x)
    return tanh


def _check_backward(grad_out, x, bias, approximate) -> bool:
    tanh = _check(x, bias, approximate)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError(f"bias_gelu_backward: grad_out must match x in shape and dtype, got "
                         f"{list(grad_out.shape)} {grad_out.dtype} vs {list(x.shape)} {x.dtype}")
    return tanh


@torch.library.register_fake("mmfast::bias_gelu")
def _bias_gelu_fake(x, bias, approximate="none"):
    _check(x, bias, approximate)
    return x.new_empty(x.shape)


@torch.library.register_fake("mmfast::bias_gelu_backward")
def _bias_gelu_backward_fake(grad_out, x, bias, approximate):
    _check_backward(grad_out, x, bias, approximate)
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = torch.ops.mmfast.bias_gelu_backward(
        grad_out.contiguous(), x, bias, ctx.approximate)
    return grad_x, grad_bias, None


torch.library.register_autograd("mmfast::bias_gelu", _backward, setup_context=_setup_context)


# --- CUDA: CUDA C++ (16-byte vectors) first, Triton for every shape it cannot take ----------

def _cuda_reasons(x, bias, *rest):
    reasons = _backend.cuda_kernels_available()
    vec = 16 // x.element_size()
    if x.shape[-1] % vec:
        reasons.append(f"last dim {x.shape[-1]} is not a multiple of {vec} (16-byte vectors)")
    return reasons


def _triton_reasons(*args):
    return _backend.triton_available()


def _triton_forward(x, bias, approximate):
    from mmfast.kernels.bias_gelu import bias_gelu_forward
    return bias_gelu_forward(x, bias, approximate == "tanh")


def _triton_backward(grad_out, x, bias, approximate):
    from mmfast.kernels.bias_gelu import bias_gelu_backward
    return bias_gelu_backward(grad_out, x, bias, approximate == "tanh")


FORWARD_IMPLS = (
    _backend.Implementation("cuda-vec16", "cuda", _cuda_reasons,
                            lambda *a: torch.ops.mmfast._bias_gelu_cuda(*a)),
    _backend.Implementation("triton", "triton", _triton_reasons, _triton_forward),
)
BACKWARD_IMPLS = (
    _backend.Implementation("cuda-vec16", "cuda", lambda g, x, *r: _cuda_reasons(x, *r),
                            lambda *a: torch.ops.mmfast._bias_gelu_backward_cuda(*a)),
    _backend.Implementation("triton", "triton", _triton_reasons, _triton_backward),
)


@torch.library.register_kernel("mmfast::bias_gelu", "cuda")
def _bias_gelu_cuda(x, bias, approximate="none"):
    _check(x, bias, approximate)
    return _backend.dispatch("bias_gelu", FORWARD_IMPLS, x, bias, approximate)


@torch.library.register_kernel("mmfast::bias_gelu_backward", "cuda")
def _bias_gelu_backward_cuda(grad_out, x, bias, approximate):
    _check_backward(grad_out, x, bias, approximate)
    return _backend.dispatch("bias_gelu_backward", BACKWARD_IMPLS, grad_out, x, bias, approximate)
