"""Triton kernels of bias_gelu.

Forward:  y[r, c] = gelu(x[r, c] + b[c])
          gelu(v) = 0.5 v (1 + erf(v / sqrt 2))                       (approximate="none")
          gelu(v) = 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))   (approximate="tanh")
Backward: dx[r, c] = dy[r, c] * gelu'(x[r, c] + b[c])
          db[c]    = sum_r dx[r, c]   (float32 partials per row block, summed in order)

Math in float32 whatever the storage type. Each program owns a [BLOCK_R, BLOCK_C] tile.
Constants: 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
sqrt(2/pi) = 0.7978845608028654 (written as literals: the interpreter rejects constexpr globals
on the left of a tensor product, and plain float globals do not compile).
"""

import torch
import triton
import triton.language as tl

from mmfast.kernels.aot import AotSpec, register_aot


BLOCK_R = 16
BLOCK_C = 128


@triton.jit
def _tanh(u):
    # tanh through exp (libdevice's tanh is not available in the interpreter); saturates to
    # +-1 for large |u| without overflow: exp -> inf gives 1 - 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(v, TANH: tl.constexpr):
    if TANH:
        return 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    else:
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))


@triton.jit
def _dgelu(v, TANH: tl.constexpr):
    if TANH:
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du
    else:
        return 0.5 * (1.0 + tl.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)


@triton.jit
def bias_gelu_forward_kernel(
    x_ptr,  # [rows, cols] contiguous
    b_ptr,  # [cols]; not read without HAS_BIAS
    y_ptr,  # [rows, cols]
    rows, cols,
    TANH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = gelu(x + b), or gelu(x) without HAS_BIAS (the projector's recomputed activation)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
    y = _gelu(x, TANH)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_backward_kernel(
    g_ptr,   # [rows, cols] upstream gradient
    x_ptr,   # [rows, cols]
    b_ptr,   # [cols]
    dx_ptr,  # [rows, cols]
    db_ptr,  # [cdiv(rows, BLOCK_R), cols] float32 partials
    rows, cols,
    TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)
    dx = g * _dgelu(x + b[None, :], TANH)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + pid_r.to(tl.int64) * cols + c, tl.sum(dx, axis=0), mask=c < cols)


def _grid(rows, cols):
    return (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    x2 = x.contiguous().view(-1, x.shape[-1]) if x.shape[-1] else x.contiguous()
    y = torch.empty_like(x2)
    rows, cols = (x2.shape[0], x2.shape[1]) if x2.dim() == 2 else (0, 0)
    if rows and cols:
        bias_gelu_forward_kernel[_grid(rows, cols)](
            x2, bias.contiguous(), y, rows, cols, TANH=tanh, HAS_BIAS=True, BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C)
    return y.view(x.shape)


def gelu_rows(h: torch.Tensor, out: torch.Tensor, tanh: bool) -> None:
    """out = gelu(h) for contiguous [rows, cols] tensors (no bias)."""
    rows, cols = h.shape
    bias_gelu_forward_kernel[_grid(rows, cols)](
        h, h, out, rows, cols, TANH=tanh, HAS_BIAS=False, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)


def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, tanh: bool):
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    x2 = x.contiguous().view(rows, cols)
    g2 = grad.contiguous().view(rows, cols)
    dx = torch.empty_like(x2)
    partial = torch.zeros((max(triton.cdiv(rows, BLOCK_R), 1), cols), device=x.device,
                          dtype=torch.float32)
    if rows and cols:
        bias_gelu_backward_kernel[_grid(rows, cols)](
            g2, x2, bias.contiguous(), dx, partial, rows, cols,
            TANH=tanh, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return dx.view(x.shape), partial.sum(0).to(x.dtype)


register_aot(
    AotSpec(bias_gelu_forward_kernel,
            {"x_ptr": "*{dt}", "b_ptr": "*{dt}", "y_ptr": "*{dt}", "rows": "i32", "cols": "i32"},
            {"TANH": (False, True), "HAS_BIAS": (True, False), "BLOCK_R": BLOCK_R,
             "BLOCK_C": BLOCK_C},
            num_warps=4, uses_dot=False),
    AotSpec(bias_gelu_backward_kernel,
            {"g_ptr": "*{dt}", "x_ptr": "*{dt}", "b_ptr": "*{dt}", "dx_ptr": "*{dt}",
             "db_ptr": "*fp32", "rows": "i32", "cols": "i32"},
            {"TANH": (False, True), "BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C},
            num_warps=4, uses_dot=False),
)
