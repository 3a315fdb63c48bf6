"""Triton kernels of projector and projector_splice: one tiled GEMM with the projector's
epilogues fused, and a GELU pass.

GEMM:  acc[m, n] = sum_k A[m, k] B[k, n]     (A, B given by strides, so transposes are free;
                                              float32 accumulation; fp32 operands use TF32 on
                                              a GPU, like any tl.dot)
Epilogues (EPILOGUE constexpr):
  0  C[row(m), n] = acc + bias[n]                 the second layer; with HAS_ROWS the row
                                                  row(m) = rows[m] (the splice's row-index map
                                                  into the copy of embeds), else row(m) = m
  1  C = h = acc + bias[n];  act = gelu(h)         the first layer: h kept for the backward
                                                  (gelu is taken of h as stored)
  2  C = acc * gelu'(aux);   act = gelu(aux)       the backward through GELU: acc = g w2,
                                                  aux = the saved pre-activation h; act (the
                                                  recomputed activation) and the float32
                                                  column sums of C per row block (partials of
                                                  b1's gradient) are written when asked for
gelu(v) = 0.5 v (1 + erf(v / sqrt 2)), or 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))) with
TANH; gelu' is its derivative. GELU math in float32.

Tiles: BLOCK_M x BLOCK_N per program, grouped along M (GROUP_M) so that programs running
together share B's columns in L2. In the interpreter (TRITON_INTERPRET=1), UPCAST casts the dot
operands to float32 (bf16 tl.dot is wrong there).
"""

import os

import torch
import triton
import triton.language as tl

from mmfast.kernels.aot import AotSpec, register_aot
from mmfast.kernels.bias_gelu import _gelu, _tanh, gelu_rows

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand size on a GPU. 128 x 64 tiles
# keep the GELU epilogues (erf/exp on every element, plus the saved h in the backward) within
# the registers of 8 warps (ptxas: no spills on sm_90); shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * itemsize = 24 KiB, three stages fit sm_80 and sm_90.
GPU_CONFIG = {2: (128, 64, 64, 8, 3), 4: (128, 64, 32, 8, 3)}
INTERPRET_CONFIG = (32, 32, 32, 4, 1)
GROUP_M = 8


@triton.jit
def _gelu_and_grad(v, TANH: tl.constexpr):
    """(gelu(v), gelu'(v)) sharing erf and exp, or tanh (bias_gelu's _gelu and _dgelu, fused).
    sqrt(2/pi) = 0.7978845608028654, sqrt(1/2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327"""
    if TANH:
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)
        return 0.5 * v * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
        return v * cdf, cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)


@triton.jit
def projector_gemm_kernel(
    a_ptr,     # A [M, K] by strides
    b_ptr,     # B [K, N] by strides
    c_ptr,     # C [rows of the output, N], row stride stride_cm
    bias_ptr,  # [N] (HAS_BIAS)
    aux_ptr,   # [M, N] contiguous: the saved pre-activation (EPILOGUE 2)
    act_ptr,   # [M, N] contiguous: the activation (EPILOGUE 1, or 2 with WRITE_ACT)
    part_ptr,  # [cdiv(M, BLOCK_M), N] float32 column partial sums (HAS_PARTIAL)
    rows_ptr,  # [M] int64 output row of each m (HAS_ROWS); negative = no row
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
    WRITE_ACT: tl.constexpr, HAS_PARTIAL: tl.constexpr, TANH: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read row/column 0 instead (their results are never
    # stored), so only the K tail needs a mask inside the loop. 32-bit offsets: the launcher
    # checks that every operand has fewer than 2^31 elements.
    am = tl.where(rm < M, rm, 0)
    bn = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ty = c_ptr.dtype.element_ty
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mn = rm[:, None] * N + rn[None, :]  # 32-bit: see the launcher's size check
    if EPILOGUE == 1:
        h = acc.to(out_ty)
        tl.store(act_ptr + mn, _gelu(h.to(tl.float32), TANH).to(out_ty), mask=mask)
        acc = h.to(tl.float32)
    if EPILOGUE == 2:
        v = tl.load(aux_ptr + mn, mask=mask, other=0.0).to(tl.float32)
        act, d = _gelu_and_grad(v, TANH)
        if WRITE_ACT:
            tl.store(act_ptr + mn, act.to(out_ty), mask=mask)
        # rows past M computed row 0's products: zero them before the column sums
        acc = tl.where(mask, acc * d, 0.0)
        if HAS_PARTIAL:
            tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(acc, axis=0), mask=rn < N)
    if HAS_ROWS:
        row = tl.load(rows_ptr + rm, mask=rm < M, other=-1).to(tl.int32)
        mask = mask & (row[:, None] >= 0)
    else:
        row = rm
    tl.store(c_ptr + row[:, None] * stride_cm + rn[None, :], acc.to(out_ty), mask=mask)


def _config(dtype):
    return INTERPRET_CONFIG if INTERPRET else GPU_CONFIG[torch.tensor([], dtype=dtype).element_size()]


def _gemm(a, b, c, *, epilogue=0, bias=None, aux=None, act=None, partial=None, rows=None,
          tanh=False):
    """c[...] = epilogue(a @ b); a [M, K] and b [K, N] by strides; c has unit column stride."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    for t in (a, b, c, aux, act):
        if t is not None and t.numel() >= 2**31:
            raise ValueError(f"projector (triton): an operand of {t.numel()} elements exceeds "
                             "the kernel's 32-bit offsets")
    bm, bn, bk, warps, stages = _config(a.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    dummy = c
    projector_gemm_kernel[grid](
        a, b, c, bias if bias is not None else dummy, aux if aux is not None else dummy,
        act if act is not None else dummy, partial if partial is not None else dummy,
        rows if rows is not None else dummy,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, HAS_ROWS=rows is not None,
        WRITE_ACT=act is not None, HAS_PARTIAL=partial is not None, TANH=tanh,
        UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages)


def _first_layer(x2, w1, b1, tanh):
    """x2 [M, Cin] -> (h [M, H], act [M, H])."""
    h = x2.new_empty(x2.shape[0], w1.shape[0])
    act = torch.empty_like(h)
    _gemm(x2, w1.t(), h, epilogue=1, bias=b1, act=act, tanh=tanh)
    return h, act


def projector_forward(x, w1, b1, w2, b2, tanh):
    x2 = x.reshape(-1, x.shape[-1])
    h, act = _first_layer(x2, w1, b1, tanh)
    out = x.new_empty(x2.shape[0], w2.shape[0])
    _gemm(act, w2.t(), out, bias=b2)
    return out.view(*x.shape[:-1], w2.shape[0]), h.view(*x.shape[:-1], w1.shape[0])


def _backward_rows(g, x2, h2, w1, w2, tanh, mask):
    """Gradients (x, w1, b1, w2, b2) from g [M, Hout], x2 [M, Cin], h2 [M, H]; empty where not
    asked for."""
    M, H = h2.shape
    need_grad_h = mask[0] or mask[1] or mask[2]
    act = torch.empty_like(h2) if mask[3] else None
    grad_h = partial = None
    if need_grad_h:
        grad_h = torch.empty_like(h2)
        bm = _config(h2.dtype)[0]
        if mask[2]:
            partial = torch.zeros(max(triton.cdiv(M, bm), 1), H, device=h2.device,
                                  dtype=torch.float32)
        _gemm(g, w2, grad_h, epilogue=2, aux=h2, act=act, partial=partial, tanh=tanh)
    elif act is not None and act.numel():
        gelu_rows(h2, act, tanh)
    empty = h2.new_empty(0)
    grads = [empty] * 5
    if mask[3]:
        grads[3] = _mm(g.t(), act)
    if mask[4]:
        grads[4] = g.sum(0)
    if mask[2]:
        grads[2] = partial.sum(0).to(h2.dtype)
    if mask[1]:
        grads[1] = _mm(grad_h.t(), x2)
    if mask[0]:
        grads[0] = _mm(grad_h, w1)
    return grads


def _mm(a, b):
    c = a.new_empty(a.shape[0], b.shape[1])
    _gemm(a, b, c)  # an empty K leaves the accumulator at zero
    return c


def projector_backward(grad_out, x, h, w1, w2, tanh, mask):
    g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
    grads = _backward_rows(g, x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]).contiguous(),
                           w1, w2, tanh, mask)
    if mask[0]:
        grads[0] = grads[0].view(x.shape)
    return tuple(grads)


def _placeholder_rows(image_mask, n):
    """Rows (of embeds viewed as [-1, Hout]) of the True positions, without a host sync: the
    count is n = x.shape[0]; a mismatch trips a device-side assertion."""
    flat = image_mask.reshape(-1)
    torch._assert_async(flat.sum() == n, "projector_splice: the number of True positions in "
                        "image_mask differs from the number of rows of x")
    return torch.nonzero_static(flat, size=n, fill_value=-1).view(n)


def projector_splice_forward(x, w1, b1, w2, b2, embeds, image_mask, tanh):
    rows = _placeholder_rows(image_mask, x.shape[0])
    h, act = _first_layer(x, w1, b1, tanh)
    out = embeds.clone(memory_format=torch.contiguous_format)
    _gemm(act, w2.t(), out.view(-1, out.shape[-1]), bias=b2, rows=rows)
    return out, h


def projector_splice_backward(grad_out, x, h, w1, w2, image_mask, tanh, mask):
    rows = _placeholder_rows(image_mask, x.shape[0])
    g = grad_out.reshape(-1, grad_out.shape[-1]).index_select(0, rows.clamp_min(0))
    grads = _backward_rows(g, x, h.contiguous(), w1, w2, tanh, mask[:5])
    grad_embeds = (grad_out.masked_fill(image_mask.unsqueeze(-1), 0) if mask[5]
                   else grad_out.new_empty(0))
    return tuple(grads) + (grad_embeds,)


def _gemm_spec(dtypes, epilogue, has_bias, has_rows, write_act, has_partial, tanh):
    size = 4 if dtypes == ("fp32",) else 2
    bm, bn, bk, warps, stages = GPU_CONFIG[size]
    return AotSpec(
        projector_gemm_kernel,
        {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "c_ptr": "*{dt}", "bias_ptr": "*{dt}",
         "aux_ptr": "*{dt}", "act_ptr": "*{dt}", "part_ptr": "*fp32", "rows_ptr": "*i64",
         "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32",
         "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32"},
        {"EPILOGUE": epilogue, "HAS_BIAS": has_bias, "HAS_ROWS": has_rows, "WRITE_ACT": write_act,
         "HAS_PARTIAL": has_partial, "TANH": tanh, "UPCAST": False, "BLOCK_M": bm,
         "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
        num_warps=warps, num_stages=stages, uses_dot=True, dtypes=dtypes)


# The launched configurations: the first layer (bias + GELU kept) in every dtype, the rest in
# bf16 (the same tiles in fp16; fp32 differs only in BLOCK_K and is covered by the first layer).
register_aot(
    _gemm_spec(("fp16", "bf16"), 1, True, False, True, False, (False, True)),
    _gemm_spec(("fp32",), 1, True, False, True, False, False),
    _gemm_spec(("bf16",), 0, True, True, False, False, False),
    _gemm_spec(("bf16",), 0, False, False, False, False, False),
    _gemm_spec(("bf16",), 2, False, False, True, True, (False, True)),
)
