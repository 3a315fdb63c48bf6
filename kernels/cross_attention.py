"""Triton kernels of cross_attention (forward, backward dq and dk/dv) and key_attention_mass.

Per head, with s_ij = q_i · k_j · scale over the allowed keys (mask rule below):
  forward:  m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i), out_i = sum_j exp(s_ij - m_i) v_j / l_i,
            lse_i = m_i + log l_i  (online over key blocks; no allowed key: out 0, lse -inf)
  backward: p_ij = exp(s_ij - lse_i), dp_ij = do_i · v_j, ds_ij = p_ij (dp_ij - delta_i) scale,
            delta_i = do_i · out_i - dlse_i;  dq_i = sum_j ds_ij k_j,  dk_j = sum_i ds_ij q_i,
            dv_j = sum_i p_ij do_i  (dk/dv summed over the query heads of a GQA group in order)
  key mass: mass_j = sum_h sum_i p_ij.
Mask rule on float codes prepared by the launcher (mmfast/ops/cross_attention.py):
  IMMEDIATE: allowed iff kcode_j == qcode_i (kcode -1 = never); else iff kcode_j <= qcode_i
  (kcode +inf = never). Key blocks that no query of the tile may attend are skipped using
  per-block min/max codes computed once per call.
Math in float32; tl.dot accumulates in float32. Head dim is padded to the power of two BD.
"""

import os

import torch
import triton
import triton.language as tl

from mmfast.kernels.aot import AotSpec, register_aot

# The interpreter's tl.dot multiplies bf16 bit patterns: upcast the operands there only.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# The media mode is a run-time flag (IMMEDIATE != 0), not a constexpr: one compiled kernel serves
# both modes, and the comparison costs the same either way.
@triton.jit
def _query_tile_codes(QLO, QHI, qidx):
    """min/max media code of query tile qidx (a flat index into the [B, nqt] summaries)."""
    return tl.load(QLO + qidx), tl.load(QHI + qidx)


@triton.jit
def _key_block_codes(KLO, KHI, KANY, kidx):
    """min/max valid media code of key block kidx and whether it has a valid key (a flat
    index into the [B, nkb] summaries)."""
    return tl.load(KLO + kidx), tl.load(KHI + kidx), tl.load(KANY + kidx)


@triton.jit
def _skip_block(qlo, qhi, klo, khi, kany, IMMEDIATE):
    """No query of the query tile may attend a key of the key block."""
    skip_immediate = (qhi < klo) | (qlo > khi)
    skip_previous = klo > qhi
    return (kany == 0) | ((IMMEDIATE != 0) & skip_immediate) | ((IMMEDIATE == 0) & skip_previous)


@triton.jit
def _safe_lse(LSE, offs, row_ok):
    """lse of a row tile, rows without an allowed key at +inf so that exp(s - lse) is 0."""
    lse = tl.load(LSE + offs, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _allowed(kc, qc, IMMEDIATE):
    return tl.where(IMMEDIATE != 0, kc == qc, kc <= qc)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def xattn_fwd_kernel(
    Q, K, V, O,            # q [B, Lq, Hq, D], k/v [B, Lk, Hk, D] (strided), o [B, Lq, Hq, D]
    LSE,                   # [B, Hq, Lq] float32
    QC, KC,                # [B, Lq], [B, Lk] float32 mask codes
    QLO, QHI,              # [B, nqt] min/max qcode per query tile
    KLO, KHI, KANY,        # [B, nkb] min/max valid kcode per key block, any valid key (0/1)
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh,
    Lq, Lk, Hq, group, nqt, nkb, scale, never, IMMEDIATE,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    WITH_V: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + offs_m[:, None] * sql + h * sqh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qc = tl.load(QC + b64 * Lq + offs_m, mask=row_ok, other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    qlo, qhi = _query_tile_codes(QLO, QHI, b * nqt + pid_m)
    for kb in range(0, nkb):
        klo, khi, kany = _key_block_codes(KLO, KHI, KANY, b * nkb + kb)
        if not _skip_block(qlo, qhi, klo, khi, kany, IMMEDIATE):
            offs_k = kb * BN + offs_n
            k_ok = offs_k < Lk
            k = tl.load(k_base + offs_k[:, None] * skl + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scale
            kc = tl.load(KC + b64 * Lk + offs_k, mask=k_ok, other=never)
            s = tl.where(_allowed(kc[None, :], qc[:, None], IMMEDIATE), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if WITH_V:
                v = tl.load(v_base + offs_k[:, None] * svl + offs_d[None, :],
                            mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
    has = l_i > 0.0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(LSE + (b64 * Hq + h) * Lq + offs_m, lse, mask=row_ok)
    if WITH_V:
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        o_ptr = O + ((b64 * Lq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def xattn_bwd_dq_kernel(
    Q, K, V, DO, DQ,       # q, k, v as in forward; do, dq [B, Lq, Hq, D] contiguous
    LSE, DELTA,            # [B, Hq, Lq] float32
    QC, KC, QLO, QHI, KLO, KHI, KANY,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh,
    Lq, Lk, Hq, group, nqt, nkb, scale, never, IMMEDIATE,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    md = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sqb + offs_m[:, None] * sql + h * sqh + offs_d[None, :], mask=md, other=0.0)
    o_off = ((b64 * Lq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :]
    do = tl.load(DO + o_off, mask=md, other=0.0)
    lse = _safe_lse(LSE, (b64 * Hq + h) * Lq + offs_m, row_ok)
    delta = tl.load(DELTA + (b64 * Hq + h) * Lq + offs_m, mask=row_ok, other=0.0)
    qc = tl.load(QC + b64 * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    qlo, qhi = _query_tile_codes(QLO, QHI, b * nqt + pid_m)
    for kb in range(0, nkb):
        klo, khi, kany = _key_block_codes(KLO, KHI, KANY, b * nkb + kb)
        if not _skip_block(qlo, qhi, klo, khi, kany, IMMEDIATE):
            offs_k = kb * BN + offs_n
            k_ok = offs_k < Lk
            kd = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_k[:, None] * skl + offs_d[None, :], mask=kd, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svl + offs_d[None, :], mask=kd, other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scale
            kc = tl.load(KC + b64 * Lk + offs_k, mask=k_ok, other=never)
            p = tl.where(_allowed(kc[None, :], qc[:, None], IMMEDIATE),
                         tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), UPCAST)
            ds = p * (dp - delta[:, None]) * scale
            dq += _dot(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + o_off, dq.to(DQ.dtype.element_ty), mask=md)


@triton.jit
def xattn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,   # dk, dv [B, Lk, Hk, D] contiguous
    LSE, DELTA,
    QC, KC, QLO, QHI, KLO, KHI, KANY,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh,
    Lq, Lk, Hq, group, nqt, nkb, scale, never, IMMEDIATE,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    Hk = Hq // group
    b = bh // Hk
    hk = bh % Hk
    offs_k = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_m0 = tl.arange(0, BM)
    k_ok = offs_k < Lk
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    kd = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * skb + offs_k[:, None] * skl + hk * skh + offs_d[None, :], mask=kd, other=0.0)
    v = tl.load(V + b64 * svb + offs_k[:, None] * svl + hk * svh + offs_d[None, :], mask=kd, other=0.0)
    kc = tl.load(KC + b64 * Lk + offs_k, mask=k_ok, other=never)
    klo, khi, kany = _key_block_codes(KLO, KHI, KANY, b * nkb + pid_n)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for h in range(hk * group, hk * group + group):
        for qt in range(0, nqt):
            qlo, qhi = _query_tile_codes(QLO, QHI, b * nqt + qt)
            if not _skip_block(qlo, qhi, klo, khi, kany, IMMEDIATE):
                offs_m = qt * BM + offs_m0
                row_ok = offs_m < Lq
                md = row_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sql + h * sqh + offs_d[None, :],
                            mask=md, other=0.0)
                do = tl.load(DO + ((b64 * Lq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :],
                             mask=md, other=0.0)
                lse = _safe_lse(LSE, (b64 * Hq + h) * Lq + offs_m, row_ok)
                delta = tl.load(DELTA + (b64 * Hq + h) * Lq + offs_m, mask=row_ok, other=0.0)
                qc = tl.load(QC + b64 * Lq + offs_m, mask=row_ok, other=0.0)
                st = _dot(k, tl.trans(q), UPCAST) * scale            # [BN, BM]
                pt = tl.where(_allowed(kc[:, None], qc[None, :], IMMEDIATE),
                              tl.exp(st - lse[None, :]), 0.0)
                dv += _dot(pt.to(do.dtype), do, UPCAST)
                dpt = _dot(v, tl.trans(do), UPCAST)
                dst = pt * (dpt - delta[None, :]) * scale
                dk += _dot(dst.to(q.dtype), q, UPCAST)
    out = ((b64 * Lk + offs_k[:, None]) * Hk + hk) * D + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kd)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kd)


@triton.jit
def xattn_mass_kernel(
    Q, K, MASS,            # mass [B, Lk] float32
    LSE,
    QC, KC, QLO, QHI, KLO, KHI, KANY,
    sqb, sql, sqh, skb, skl, skh,
    Lq, Lk, Hq, group, nqt, nkb, scale, never, IMMEDIATE,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_k = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_m0 = tl.arange(0, BM)
    k_ok = offs_k < Lk
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    kc = tl.load(KC + b64 * Lk + offs_k, mask=k_ok, other=never)
    klo, khi, kany = _key_block_codes(KLO, KHI, KANY, b * nkb + pid_n)
    mass = tl.zeros([BN], tl.float32)
    for h in range(0, Hq):
        k = tl.load(K + b64 * skb + offs_k[:, None] * skl + (h // group) * skh + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        for qt in range(0, nqt):
            qlo, qhi = _query_tile_codes(QLO, QHI, b * nqt + qt)
            if not _skip_block(qlo, qhi, klo, khi, kany, IMMEDIATE):
                offs_m = qt * BM + offs_m0
                row_ok = offs_m < Lq
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sql + h * sqh + offs_d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse = _safe_lse(LSE, (b64 * Hq + h) * Lq + offs_m, row_ok)
                qc = tl.load(QC + b64 * Lq + offs_m, mask=row_ok, other=0.0)
                st = _dot(k, tl.trans(q), UPCAST) * scale
                pt = tl.where(_allowed(kc[:, None], qc[None, :], IMMEDIATE),
                              tl.exp(st - lse[None, :]), 0.0)
                mass += tl.sum(pt, axis=1)
    tl.store(MASS + b64 * Lk + offs_k, mass, mask=k_ok)


# --- tile configurations -----------------------------------------------------------------------

# (BM, BN, num_warps, num_stages) per (kernel kind, architecture, padded head dim BD), chosen by
# compiling for sm_80/sm_90 and reading ptxas's register report: the forward (and key mass) never
# spills; the backward, which holds q/do/dq or k/v/dk/dv tiles at once, spills a little for
# BD >= 128 at the largest tiles that still keep the tensor cores busy (wgmma needs 64-row tiles
# on both sides of the backward's GEMMs). A float32 backward at BD = 256 does not fit in shared
# memory at those tiles: it is not offered (see BACKWARD_FP32_MAX_HEAD_DIM).
_CONFIGS = {
    ("fwd", 80): {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 8, 1)},
    ("fwd", 90): {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 64, 8, 2)},
    ("bwd", 80): {64: (32, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 32, 8, 1)},
    ("bwd", 90): {64: (64, 64, 8, 2), 128: (64, 64, 8, 2), 256: (64, 64, 8, 1)},
}


def config(kind: str, cc: int, bd: int) -> dict:
    """Tiles for a kernel kind ("fwd": forward and key mass, "bwd": dq and dk/dv)."""
    table = _CONFIGS[(kind, 90 if cc >= 90 else 80)]
    bm, bn, warps, stages = table[min(b for b in table if b >= bd)]
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}


INTERPRETER_CONFIG = {"BM": 16, "BN": 16, "num_warps": 4, "num_stages": 1}
HEAD_DIMS = (64, 128, 256)
MAX_HEAD_DIM = 256
BACKWARD_FP32_MAX_HEAD_DIM = 128


def head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def launch_config(kind: str, device: torch.device, d: int) -> dict:
    if INTERPRET or device.type != "cuda":
        return dict(INTERPRETER_CONFIG)
    major, minor = torch.cuda.get_device_capability(device)
    return config(kind, major * 10 + minor, head_block(d))


# --- launchers (inputs already checked; masks already turned into codes) ------------------------

def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, plan, scale, with_values=True):
    """(out [B, Lq, Hq, D] or None, lse [B, Hq, Lq] float32). plan: MaskPlan of the launcher."""
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    cfg = plan.cfg
    out = torch.empty((b, lq, hq, d), device=q.device, dtype=q.dtype) if with_values else None
    lse = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(lq, cfg["BM"]), b * hq)
    vv = v if with_values else k
    xattn_fwd_kernel[grid](
        q, k, vv, out if with_values else lse, lse, *plan.tensors(),
        *_strides(q), *_strides(k), *_strides(vv),
        lq, lk, hq, hq // hk, plan.nqt, plan.nkb, scale, plan.never, int(plan.immediate),
        D=d, BD=head_block(d), BM=cfg["BM"], BN=cfg["BN"],
        WITH_V=with_values, UPCAST=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def backward(do, q, k, v, lse, delta, plan, scale):
    """(dq, dk, dv); do contiguous [B, Lq, Hq, D], delta [B, Hq, Lq] float32."""
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    cfg = plan.cfg
    dq = torch.empty((b, lq, hq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, lk, hk, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((b, lk, hk, d), device=q.device, dtype=q.dtype)
    common = (*plan.tensors(), *_strides(q), *_strides(k), *_strides(v),
              lq, lk, hq, hq // hk, plan.nqt, plan.nkb, scale, plan.never, int(plan.immediate))
    meta = dict(D=d, BD=head_block(d), BM=cfg["BM"], BN=cfg["BN"],
                UPCAST=INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    xattn_bwd_dq_kernel[(plan.nqt, b * hq)](q, k, v, do, dq, lse, delta, *common, **meta)
    xattn_bwd_dkdv_kernel[(plan.nkb, b * hk)](q, k, v, do, dk, dv, lse, delta, *common, **meta)
    return dq, dk, dv


def key_mass(q, k, plan, scale):
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    cfg = plan.cfg
    _, lse = forward(q, k, None, plan, scale, with_values=False)
    mass = torch.empty((b, lk), device=q.device, dtype=torch.float32)
    xattn_mass_kernel[(plan.nkb, b)](
        q, k, mass, lse, *plan.tensors(), *_strides(q), *_strides(k),
        lq, lk, hq, hq // hk, plan.nqt, plan.nkb, scale, plan.never, int(plan.immediate),
        D=d, BD=head_block(d), BM=cfg["BM"], BN=cfg["BN"],
        UPCAST=INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return mass


# --- ahead-of-time compile registrations ---------------------------------------------------------

_MASK_SIG = {n: "*fp32" for n in ("QC", "KC", "QLO", "QHI", "KLO", "KHI", "KANY")}
_STRIDE_SIG = {n: "i32" for n in ("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh")}
_SIZE_SIG = {"Lq": "i32", "Lk": "i32", "Hq": "i32", "group": "i32", "nqt": "i32", "nkb": "i32",
             "scale": "fp32", "never": "fp32", "IMMEDIATE": "i32"}


def _arch_options(kind, bd):
    out = {}
    for cc in (80, 90):
        c = config(kind, cc, bd)
        out[cc] = {"constexprs": {"BM": c["BM"], "BN": c["BN"]}, "num_warps": c["num_warps"],
                   "num_stages": c["num_stages"]}
    return out


def _specs():
    specs = []
    for bd in HEAD_DIMS:
        bwd_dtypes = ("fp32", "fp16", "bf16") if bd <= BACKWARD_FP32_MAX_HEAD_DIM else ("fp16", "bf16")
        base = {"D": bd, "BD": bd, "BM": 64, "BN": 64, "UPCAST": False}
        specs.append(AotSpec(
            xattn_fwd_kernel,
            {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "O": "*{dt}", "LSE": "*fp32", **_MASK_SIG,
             **_STRIDE_SIG, **_SIZE_SIG},
            {**base, "WITH_V": True}, uses_dot=True, arch_options=_arch_options("fwd", bd)))
        specs.append(AotSpec(
            xattn_bwd_dq_kernel,
            {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "DQ": "*{dt}",
             "LSE": "*fp32", "DELTA": "*fp32", **_MASK_SIG, **_STRIDE_SIG, **_SIZE_SIG},
            base, uses_dot=True, allow_spills=bd >= 128, dtypes=bwd_dtypes,
            arch_options=_arch_options("bwd", bd)))
        specs.append(AotSpec(
            xattn_bwd_dkdv_kernel,
            {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "DK": "*{dt}",
             "DV": "*{dt}", "LSE": "*fp32", "DELTA": "*fp32", **_MASK_SIG, **_STRIDE_SIG,
             **_SIZE_SIG},
            base, uses_dot=True, allow_spills=bd >= 128, dtypes=bwd_dtypes,
            arch_options=_arch_options("bwd", bd)))
        specs.append(AotSpec(
            xattn_mass_kernel,
            {"Q": "*{dt}", "K": "*{dt}", "MASS": "*fp32", "LSE": "*fp32", **_MASK_SIG,
             **{n: "i32" for n in ("sqb", "sql", "sqh", "skb", "skl", "skh")}, **_SIZE_SIG},
            base, uses_dot=True, arch_options=_arch_options("fwd", bd)))
    return specs


register_aot(*_specs())
