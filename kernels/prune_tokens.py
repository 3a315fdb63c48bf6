"""Triton kernels of prune_tokens: row gather (forward) and row scatter (backward).

Forward:  kept[b, k, c] = x[b, index[b, k], c]
Backward: grad_x[b, index[b, k], c] = grad_kept[b, k, c]   (grad_x zero elsewhere; the indices
          of one sample are distinct, so every row is written at most once)
The selection of `index` (a stable sort of the scores) runs before, in torch.
"""

import torch
import triton
import triton.language as tl

from mmfast.kernels.aot import AotSpec, register_aot

BLOCK_C = 256


@triton.jit
def prune_gather_kernel(
    x_ptr,     # [B, N, C] contiguous
    idx_ptr,   # [B, KEEP] int64
    out_ptr,   # [B, KEEP, C]
    N, KEEP, C,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    t = tl.load(idx_ptr + bat * KEEP + k)
    row = tl.load(x_ptr + (bat * N + t) * C + cols, mask=mask)
    tl.store(out_ptr + (bat * KEEP + k) * C + cols, row, mask=mask)


@triton.jit
def prune_scatter_kernel(
    g_ptr,     # [B, KEEP, C] gradient of kept
    idx_ptr,   # [B, KEEP] int64
    dx_ptr,    # [B, N, C] zero-filled
    N, KEEP, C,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    t = tl.load(idx_ptr + bat * KEEP + k)
    row = tl.load(g_ptr + (bat * KEEP + k) * C + cols, mask=mask)
    tl.store(dx_ptr + (bat * N + t) * C + cols, row, mask=mask)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    bsz, n, c = x.shape
    keep = index.shape[1]
    out = torch.empty(bsz, keep, c, device=x.device, dtype=x.dtype)
    if out.numel():
        prune_gather_kernel[(keep, bsz, triton.cdiv(c, BLOCK_C))](
            x, index.contiguous(), out, n, keep, c, BLOCK_C=BLOCK_C)
    return out


def scatter(grad: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    grad = grad.contiguous()
    bsz, keep, c = grad.shape
    dx = torch.zeros(bsz, n, c, device=grad.device, dtype=grad.dtype)
    if grad.numel():
        prune_scatter_kernel[(keep, bsz, triton.cdiv(c, BLOCK_C))](
            grad, index.contiguous(), dx, n, keep, c, BLOCK_C=BLOCK_C)
    return dx


_SIG = {"N": "i32", "KEEP": "i32", "C": "i32"}
register_aot(
    AotSpec(prune_gather_kernel, {"x_ptr": "*{dt}", "idx_ptr": "*i64", "out_ptr": "*{dt}", **_SIG},
            {"BLOCK_C": BLOCK_C}, num_warps=4),
    AotSpec(prune_scatter_kernel, {"g_ptr": "*{dt}", "idx_ptr": "*i64", "dx_ptr": "*{dt}", **_SIG},
            {"BLOCK_C": BLOCK_C}, num_warps=4),
)
