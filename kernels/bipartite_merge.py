"""Triton kernels of bipartite_merge: the matching step (every A token's best B token), and a
Triton form of the segmented merge and its backward (the CUDA C++ form is
csrc/cuda/bipartite_merge.cu).

For sample b, A token i (token 2i) and B token j (token 2j+1) of metric m [B, N, K]:
    s[i, j]     = (m[2i] . m[2j+1]) * inv_b[j]           inv_b[j] = 1 / |m[2j+1]| (0 if zero)
    node_idx[i] = the smallest j with s[i, j] = max_j s[i, j]
    node_max[i] = max_j s[i, j] * inv_a[i]               (-inf for i = 0 with PROTECT_FIRST)
which is the cosine similarity of ToMe's L2-normalised metric, scaled after the dot product so
that bfloat16/float16 products stay exact. Each program owns BLOCK_A A tokens, walks the B
tokens in BLOCK_B blocks, builds each [BLOCK_A, BLOCK_B] tile of dot products with tl.dot over
BLOCK_K slices of K, and folds the tile into a running (max, first argmax): the A x B matrix is
never stored. float32 uses the 3-pass TF32 dot ("tf32x3"), accurate to float32 rounding,
because plain TF32 would change which tokens merge.
"""

import torch
import triton
import triton.language as tl

from mmfast.kernels.aot import AotSpec, register_aot

# Launch configurations, chosen so that neither sm_80 nor sm_90 spills registers (the 3-pass
# float32 dot needs smaller B and K tiles than the 16-bit one).
CONFIGS = {
    "16bit": dict(BLOCK_A=64, BLOCK_B=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_A=64, BLOCK_B=32, BLOCK_K=32, num_warps=8, num_stages=3),
}


@triton.jit
def bipartite_best_match_kernel(
    m_ptr,         # [B, N, K] metric, unit stride along K
    inv_ptr,       # [B, N] float32 inverse norms of the metric rows
    max_ptr,       # [B, Na] float32 out: best similarity
    idx_ptr,       # [B, Na] int64 out: index of the best B token
    N, K, stride_mb, stride_mn,
    PROTECT_FIRST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_a = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    na = (N + 1) // 2
    nb = N // 2
    i = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    i_ok = i < na
    m_base = m_ptr + bat * stride_mb
    # A tokens are rows 0, 2, 4, ... and B tokens rows 1, 3, 5, ... of the metric: block
    # pointers with a doubled row stride (B is read transposed, [K, Nb]).
    a_blocks = tl.make_block_ptr(m_base, (na, K), (2 * stride_mn, 1), (pid_a * BLOCK_A, 0),
                                 (BLOCK_A, BLOCK_K), (1, 0))
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_A], tl.int32)
    for j0 in range(0, nb, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        j_ok = j < nb
        b_blocks = tl.make_block_ptr(m_base + stride_mn, (K, nb), (1, 2 * stride_mn), (0, j0),
                                     (BLOCK_K, BLOCK_B), (0, 1))
        a_k = a_blocks
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(a_k, boundary_check=(0, 1), padding_option="zero")
            b = tl.load(b_blocks, boundary_check=(0, 1), padding_option="zero")
            if UPCAST:  # the interpreter multiplies bfloat16 bit patterns in tl.dot
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_k = tl.advance(a_k, (0, BLOCK_K))
            b_blocks = tl.advance(b_blocks, (BLOCK_K, 0))
        inv_b = tl.load(inv_ptr + bat * N + 2 * j + 1, mask=j_ok, other=0.0)
        s = tl.where(j_ok[None, :], acc * inv_b[None, :], float("-inf"))
        tile_max = tl.max(s, axis=1)
        # First column reaching the maximum (an explicit min: the lower index wins a tie).
        tile_arg = tl.min(tl.where(s == tile_max[:, None], j[None, :], 2147483647), axis=1)
        better = tile_max > best  # strict: an earlier block keeps a tie
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_max, best)
    inv_a = tl.load(inv_ptr + bat * N + 2 * i, mask=i_ok, other=0.0)
    score = best * inv_a
    if PROTECT_FIRST:
        score = tl.where(i == 0, float("-inf"), score)
    tl.store(max_ptr + bat * na + i, score, mask=i_ok)
    tl.store(idx_ptr + bat * na + i, arg.to(tl.int64), mask=i_ok)


@triton.jit
def bipartite_merge_groups_kernel(
    x_ptr,       # [B, N, C] contiguous
    w_ptr,       # [B, N] float32 token sizes
    perm_ptr,    # [B, N] int64: tokens grouped by output row, in token order
    starts_ptr,  # [B, M + 1] int64: row o's tokens are perm[starts[o] .. starts[o + 1])
    out_ptr,     # [B, M, C]
    size_ptr,    # [B, M] float32 out
    N, M, C,
    BLOCK_C: tl.constexpr,
):
    """merged[b, o, c] = sum_t w[t] x[b, t, c] / sum_t w[t] over row o's tokens, summed in
    token order (deterministic); a row of one token is copied exactly."""
    o = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s0 = tl.load(starts_ptr + bat * (M + 1) + o)
    s1 = tl.load(starts_ptr + bat * (M + 1) + o + 1)
    acc = tl.zeros([BLOCK_C], tl.float32)
    total = 0.0
    for p in range(s0, s1):
        t = tl.load(perm_ptr + bat * N + p)
        wt = tl.load(w_ptr + bat * N + t)
        acc += wt * tl.load(x_ptr + (bat * N + t) * C + cols, mask=cmask, other=0.0).to(tl.float32)
        total += wt
    first = tl.load(perm_ptr + bat * N + s0)
    single = tl.load(x_ptr + (bat * N + first) * C + cols, mask=cmask, other=0.0)
    res = tl.where(s1 - s0 == 1, single.to(tl.float32), acc / total)
    tl.store(out_ptr + (bat * M + o) * C + cols, res.to(out_ptr.dtype.element_ty), mask=cmask)
    if tl.program_id(2) == 0:
        tl.store(size_ptr + bat * M + o, total)


@triton.jit
def bipartite_merge_backward_kernel(
    g_ptr,      # [B, M, C] gradient of merged
    dest_ptr,   # [B, N] int64
    w_ptr,      # [B, N] float32 token sizes
    ms_ptr,     # [B, M] float32 merged sizes
    dx_ptr,     # [B, N, C] out
    N, M, C,
    BLOCK_C: tl.constexpr,
):
    """dx[b, t, c] = g[b, dest[t], c] * w[t] / merged_size[dest[t]]."""
    t = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    o = tl.load(dest_ptr + bat * N + t)
    f = tl.load(w_ptr + bat * N + t) / tl.load(ms_ptr + bat * M + o)
    g = tl.load(g_ptr + (bat * M + o) * C + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + (bat * N + t) * C + cols, (g * f).to(dx_ptr.dtype.element_ty), mask=cmask)


MERGE_BLOCK_C = 256


def _weights(size, x):
    if size is None:
        return torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
    return size.to(torch.float32).contiguous()


def merge_groups(x, perm, starts, size):
    """Triton form of mmfast::_bipartite_merge_cuda: (merged [B, M, C], merged_size [B, M])."""
    x = x.contiguous()
    bsz, n, c = x.shape
    m = starts.shape[1] - 1
    merged = torch.empty(bsz, m, c, device=x.device, dtype=x.dtype)
    merged_size = torch.empty(bsz, m, device=x.device, dtype=torch.float32)
    if bsz and m:
        # At least one column block, so that merged_size is written even when C == 0.
        grid = (m, bsz, max(1, triton.cdiv(c, MERGE_BLOCK_C)))
        bipartite_merge_groups_kernel[grid](x, _weights(size, x), perm.contiguous(),
                                            starts.contiguous(), merged, merged_size, n, m, c,
                                            BLOCK_C=MERGE_BLOCK_C)
    return merged, merged_size


def merge_backward(grad, dest, size, merged_size):
    grad = grad.contiguous()
    bsz, m, c = grad.shape
    n = dest.shape[1]
    dx = torch.empty(bsz, n, c, device=grad.device, dtype=grad.dtype)
    if bsz and n and c:
        grid = (n, bsz, triton.cdiv(c, MERGE_BLOCK_C))
        bipartite_merge_backward_kernel[grid](grad, dest.contiguous(), _weights(size, dx),
                                              merged_size.contiguous(), dx, n, m, c,
                                              BLOCK_C=MERGE_BLOCK_C)
    return dx


def inverse_norms(metric: torch.Tensor) -> torch.Tensor:
    """[B, N] float32: 1 / |metric row|, 0 for a zero row."""
    norm = torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32)
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def best_matches(metric: torch.Tensor, inv_norm: torch.Tensor, protect_first: bool):
    """metric [B, N, K] -> node_max [B, Na] float32, node_idx [B, Na] int64."""
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    bsz, n, k = metric.shape
    na = (n + 1) // 2
    node_max = torch.empty(bsz, na, device=metric.device, dtype=torch.float32)
    node_idx = torch.empty(bsz, na, device=metric.device, dtype=torch.int64)
    if bsz == 0 or na == 0:
        return node_max, node_idx
    interpret = metric.device.type == "cpu"
    precision = "tf32x3" if metric.dtype == torch.float32 and not interpret else "ieee"
    config = CONFIGS["fp32" if metric.dtype == torch.float32 else "16bit"]
    grid = (triton.cdiv(na, config["BLOCK_A"]), bsz)
    bipartite_best_match_kernel[grid](
        metric, inv_norm.contiguous(), node_max, node_idx, n, k, metric.stride(0),
        metric.stride(1), PROTECT_FIRST=protect_first,
        UPCAST=interpret and metric.dtype == torch.bfloat16, PRECISION=precision, **config)
    return node_max, node_idx


_SIGNATURE = {"m_ptr": "*{dt}", "inv_ptr": "*fp32", "max_ptr": "*fp32", "idx_ptr": "*i64",
              "N": "i32", "K": "i32", "stride_mb": "i64", "stride_mn": "i64"}


def _spec(config, precision, dtypes):
    tiles = {k: v for k, v in config.items() if k.startswith("BLOCK")}
    return AotSpec(bipartite_best_match_kernel, _SIGNATURE,
                   {"PROTECT_FIRST": (False, True), "UPCAST": False, "PRECISION": precision,
                    **tiles},
                   num_warps=config["num_warps"], num_stages=config["num_stages"],
                   uses_dot=True, dtypes=dtypes)


register_aot(
    _spec(CONFIGS["16bit"], "ieee", ("fp16", "bf16")),
    _spec(CONFIGS["fp32"], "tf32x3", ("fp32",)),
    AotSpec(bipartite_merge_groups_kernel,
            {"x_ptr": "*{dt}", "w_ptr": "*fp32", "perm_ptr": "*i64", "starts_ptr": "*i64",
             "out_ptr": "*{dt}", "size_ptr": "*fp32", "N": "i32", "M": "i32", "C": "i32"},
            {"BLOCK_C": MERGE_BLOCK_C}, num_warps=4),
    AotSpec(bipartite_merge_backward_kernel,
            {"g_ptr": "*{dt}", "dest_ptr": "*i64", "w_ptr": "*fp32", "ms_ptr": "*fp32",
             "dx_ptr": "*{dt}", "N": "i32", "M": "i32", "C": "i32"},
            {"BLOCK_C": MERGE_BLOCK_C}, num_warps=4),
)
