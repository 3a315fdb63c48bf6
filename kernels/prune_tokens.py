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
def prune_rows_kernel(
    src_ptr,   # [B, N, C] x (gather) or [B, KEEP, C] grad_kept (scatter), contiguous
    idx_ptr,   # [B, KEEP] int64
    dst_ptr,   # [B, KEEP, C] kept (gather) or [B, N, C] zero-filled grad_x (scatter)
    N, KEEP, C,
    SCATTER: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Copies row k of the kept side to/from row index[b, k] of the full side."""
    k = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    full_row = bat * N + tl.load(idx_ptr + bat * KEEP + k)
    kept_row = bat * KEEP + k
    if SCATTER:
        src_row, dst_row = kept_row, full_row
    else:
        src_row, dst_row = full_row, kept_row
    row = tl.load(src_ptr + src_row * C + cols, mask=mask)
    tl.store(dst_ptr + dst_row * C + cols, row, mask=mask)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    bsz, n, c = x.shape
    keep = index.shape[1]
    out = torch.empty(bsz, keep, c, device=x.device, dtype=x.dtype)
    if out.numel():
        prune_rows_kernel[(keep, bsz, triton.cdiv(c, BLOCK_C))](
            x, index.contiguous(), out, n, keep, c, SCATTER=False, BLOCK_C=BLOCK_C)
    return out


def scatter(grad: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    grad = grad.contiguous()
    bsz, keep, c = grad.shape
    dx = torch.zeros(bsz, n, c, device=grad.device, dtype=grad.dtype)
    if grad.numel():
        prune_rows_kernel[(keep, bsz, triton.cdiv(c, BLOCK_C))](
            grad, index.contiguous(), dx, n, keep, c, SCATTER=True, BLOCK_C=BLOCK_C)
    return dx


register_aot(
    AotSpec(prune_rows_kernel,
            {"src_ptr": "*{dt}", "idx_ptr": "*i64", "dst_ptr": "*{dt}", "N": "i32", "KEEP": "i32",
             "C": "i32"},
            {"SCATTER": (False, True), "BLOCK_C": BLOCK_C}, num_warps=4),
)
