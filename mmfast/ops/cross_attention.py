"""cross_attention and key_attention_mass: text tokens (or resampler latents) attending to image
tokens, with ragged image-token counts, Flamingo media masks and GQA, flash-style (no Lq x Lk
matrix is ever stored)."""

import torch

from mmfast import _backend
from mmfast.ops._checks import FLOAT_DTYPES

MEDIA_MODES = ("immediate", "previous")
INDEX_DTYPES = (torch.int32, torch.int64)


def cross_attention(q, k, v, *, kv_lens=None, q_media=None, kv_media=None,
                    media_mode="immediate", scale=None, return_lse=False):
    """softmax(q kᵀ · scale) v per head, over the keys each query may attend.

    q:  [B, Lq, Hq, D] float32, float16 or bfloat16 (any strides)
    k, v: [B, Lk, Hk, D], same dtype and device; Hq % Hk == 0 (GQA/MQA: query head h uses
        key/value head h // (Hq // Hk)).
    kv_lens: [B] int32/int64, keys j >= kv_lens[b] are padding (ragged image-token counts).
    q_media [B, Lq], kv_media [B, Lk] int32/int64 (open_flamingo): the 1-based index of the image
        a text token follows (0 = before any image) and of the image a key belongs to
        (0 = padding). media_mode "immediate": query i may attend key j iff
        kv_media[j] == q_media[i] > 0; "previous": iff 0 < kv_media[j] <= q_media[i].
    scale: defaults to D ** -0.5.
    Returns out [B, Lq, Hq, D] in q's dtype (float32 accumulation), and with return_lse also
    lse [B, Hq, Lq] float32 (log-sum-exp of the scaled allowed scores). A query with no allowed
    key gets out = 0 and lse = -inf. Differentiable in q, k and v (and through lse).
    """
    out, lse = torch.ops.mmfast.cross_attention(q, k, v, kv_lens=kv_lens, q_media=q_media,
                                                kv_media=kv_media, media_mode=media_mode,
                                                scale=scale)
    return (out, lse) if return_lse else out


def key_attention_mass(q, k, *, kv_lens=None, q_media=None, kv_media=None,
                       media_mode="immediate", scale=None):
    """Per key, the attention probability it receives, summed over query heads and queries.

    Same inputs and masks as cross_attention (no v). Returns mass [B, Lk] float32:
    mass[b, j] = sum_h sum_i P[b, h, i, j], where each query row with an allowed key sums to 1.
    Computed tile by tile (two passes: row statistics, then column sums), never materializing
    the attention matrix: the score FastV / VisionZip-style token pruning needs.
    """
    return torch.ops.mmfast.key_attention_mass(q, k, kv_lens=kv_lens, q_media=q_media,
                                               kv_media=kv_media, media_mode=media_mode,
                                               scale=scale)


# --- argument checks (the C++ kernels check the same in csrc/common/cross_attention.h) --------

def _check_index(op, name, t, q, shape):
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def check_args(op, q, k, v, kv_lens, q_media, kv_media, media_mode):
    """Shape/dtype/device checks (no value checks: they would need the data)."""
    if media_mode not in MEDIA_MODES:
        raise ValueError(f"{op}: media_mode must be 'immediate' or 'previous', got {media_mode!r}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, Lq, Hq, D], got shape {list(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"{op}: k must be [B, Lk, Hk, D], got shape {list(k.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k batch size {k.shape[0]} differs from q batch size {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k head dim {k.shape[3]} differs from q head dim {q.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{op}: the number of q heads ({q.shape[2]}) must be a multiple of the "
                         f"number of k heads ({k.shape[2]})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if kv_lens is not None:
        _check_index(op, "kv_lens", kv_lens, q, (b,))
    if (q_media is None) != (kv_media is None):
        given = "q_media" if q_media is not None else "kv_media"
        raise ValueError(f"{op}: q_media and kv_media must be given together (got only {given})")
    if q_media is not None:
        _check_index(op, "q_media", q_media, q, (b, lq))
        _check_index(op, "kv_media", kv_media, q, (b, lk))


def _check_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media, kv_media,
                    media_mode):
    op = "cross_attention_backward"
    check_args(op, q, k, v, kv_lens, q_media, kv_media, media_mode)
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype:
        raise ValueError(f"{op}: grad_out must match q in shape and dtype, got "
                         f"{list(grad_out.shape)} {grad_out.dtype}")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"{op}: out must match q in shape and dtype, got {list(out.shape)}")
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != lse_shape or lse.dtype != torch.float32:
        raise ValueError(f"{op}: lse must be float32 [B, Hq, Lq], got {list(lse.shape)} {lse.dtype}")
    if grad_lse is not None and grad_lse.shape != lse.shape:
        raise ValueError(f"{op}: grad_lse must have the shape of lse {list(lse.shape)}, got "
                         f"{list(grad_lse.shape)}")


def resolve_scale(scale, d):
    return d ** -0.5 if scale is None else float(scale)


# --- fake kernels ------------------------------------------------------------------------------

@torch.library.register_fake("mmfast::cross_attention")
def _cross_attention_fake(q, k, v, kv_lens=None, q_media=None, kv_media=None,
                          media_mode="immediate", scale=None):
    check_args("cross_attention", q, k, v, kv_lens, q_media, kv_media, media_mode)
    b, lq, hq, d = q.shape
    return q.new_empty((b, lq, hq, d)), q.new_empty((b, hq, lq), dtype=torch.float32)


@torch.library.register_fake("mmfast::cross_attention_backward")
def _cross_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media,
                                   kv_media, media_mode, scale):
    _check_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media, kv_media, media_mode)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.register_fake("mmfast::key_attention_mass")
def _key_attention_mass_fake(q, k, kv_lens=None, q_media=None, kv_media=None,
                             media_mode="immediate", scale=None):
    check_args("key_attention_mass", q, k, None, kv_lens, q_media, kv_media, media_mode)
    return q.new_empty((q.shape[0], k.shape[1]), dtype=torch.float32)


# --- autograd ----------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, q_media, kv_media, media_mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, q_media, kv_media)
    ctx.media_mode = media_mode
    ctx.scale = resolve_scale(scale, q.shape[-1])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lens, q_media, kv_media = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.mmfast.cross_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media, kv_media, ctx.media_mode,
        ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("mmfast::cross_attention", _backward,
                                setup_context=_setup_context)


# --- CUDA: Triton ------------------------------------------------------------------------------

class TritonMaskPlan:
    """The mask of one call as float codes per token and min/max per query tile and key block
    (the same rule as the CPU kernels, see mmfast.kernels.cross_attention), built with torch ops
    on the inputs' device, once per call."""

    def __init__(self, q, k, kv_lens, q_media, kv_media, media_mode, cfg):
        op = "cross_attention"
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        dev = q.device
        media = q_media is not None
        self.cfg = cfg
        self.immediate = media and media_mode == "immediate"
        self.never = -1.0 if self.immediate else float("inf")
        invalid = torch.zeros(b, lk, dtype=torch.bool, device=dev)
        if kv_lens is not None:
            if bool(((kv_lens < 0) | (kv_lens > lk)).any()):
                raise ValueError(f"{op}: kv_lens values must be in [0, {lk}], got {kv_lens.tolist()}")
            invalid |= torch.arange(lk, device=dev)[None, :] >= kv_lens[:, None]
        if media:
            for name, t in (("q_media", q_media), ("kv_media", kv_media)):
                if t.numel() and bool(((t < 0) | (t >= 2 ** 24)).any()):
                    raise ValueError(f"{op}: {name} values must be in [0, 2**24)")
            qcode = q_media.float()
            kcode = kv_media.float()
            invalid |= kv_media == 0
        else:
            qcode = torch.zeros(b, lq, device=dev)
            kcode = torch.zeros(b, lk, device=dev)
        kcode = kcode.masked_fill(invalid, self.never)
        bm, bn = cfg["BM"], cfg["BN"]
        self.nqt, self.nkb = triton_cdiv(lq, bm), triton_cdiv(lk, bn)
        pad_q = self.nqt * bm - lq
        qpad = torch.nn.functional.pad
        self.q_lo = qpad(qcode, (0, pad_q), value=float("inf")).view(b, self.nqt, bm).amin(-1)
        self.q_hi = qpad(qcode, (0, pad_q), value=float("-inf")).view(b, self.nqt, bm).amax(-1)
        valid = qpad(~invalid, (0, self.nkb * bn - lk), value=False).view(b, self.nkb, bn)
        kc = qpad(kcode, (0, self.nkb * bn - lk)).view(b, self.nkb, bn)
        self.k_lo = kc.masked_fill(~valid, float("inf")).amin(-1) if lk else kc.sum(-1)
        self.k_hi = kc.masked_fill(~valid, float("-inf")).amax(-1) if lk else kc.sum(-1)
        self.k_any = valid.any(-1).float()
        self.qcode, self.kcode = qcode.contiguous(), kcode.contiguous()

    def tensors(self):
        return (self.qcode, self.kcode, self.q_lo.contiguous(), self.q_hi.contiguous(),
                self.k_lo.contiguous(), self.k_hi.contiguous(), self.k_any.contiguous())


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_reasons(q, k, *rest):
    from mmfast.kernels.cross_attention import MAX_HEAD_DIM
    reasons = _backend.triton_available()
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


def triton_cross_attention(q, k, v, kv_lens=None, q_media=None, kv_media=None,
                           media_mode="immediate", scale=None):
    """(out, lse) by the Triton kernels (on CUDA, or on CPU tensors in the interpreter)."""
    from mmfast.kernels import cross_attention as K
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, lq, hq, d = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        return (q.new_zeros(q.shape),
                torch.full((b, hq, lq), float("-inf"), device=q.device, dtype=torch.float32))
    plan = TritonMaskPlan(q, k, kv_lens, q_media, kv_media, media_mode,
                          K.launch_config("fwd", q.device, d))
    return K.forward(q, k, v, plan, resolve_scale(scale, d))


def triton_cross_attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media,
                                    kv_media, media_mode, scale):
    from mmfast.kernels import cross_attention as K
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    plan = TritonMaskPlan(q, k, kv_lens, q_media, kv_media, media_mode,
                          K.launch_config("bwd", q.device, q.shape[-1]))
    do = grad_out.contiguous()
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)  # [B, Hq, Lq]
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    return K.backward(do, q, k, v, lse.contiguous(), delta.contiguous(), plan, scale)


def triton_key_attention_mass(q, k, kv_lens=None, q_media=None, kv_media=None,
                              media_mode="immediate", scale=None):
    from mmfast.kernels import cross_attention as K
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros(q.shape[0], k.shape[1], device=q.device, dtype=torch.float32)
    plan = TritonMaskPlan(q, k, kv_lens, q_media, kv_media, media_mode,
                          K.launch_config("fwd", q.device, q.shape[-1]))
    return K.key_mass(q, k, plan, resolve_scale(scale, q.shape[-1]))


def _triton_backward_reasons(grad_out, grad_lse, q, k, *rest):
    from mmfast.kernels.cross_attention import BACKWARD_FP32_MAX_HEAD_DIM
    reasons = _triton_reasons(q, k)
    if q.dtype == torch.float32 and q.shape[-1] > BACKWARD_FP32_MAX_HEAD_DIM:
        reasons.append(f"float32 backward with head dim {q.shape[-1]} > "
                       f"{BACKWARD_FP32_MAX_HEAD_DIM} (its tiles exceed shared memory)")
    return reasons


FORWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons,
                                         triton_cross_attention),)
BACKWARD_IMPLS = (_backend.Implementation("triton", "triton", _triton_backward_reasons,
                                          triton_cross_attention_backward),)
MASS_IMPLS = (_backend.Implementation("triton", "triton", _triton_reasons,
                                      triton_key_attention_mass),)


@torch.library.register_kernel("mmfast::cross_attention", "cuda")
def _cross_attention_cuda(q, k, v, kv_lens=None, q_media=None, kv_media=None,
                          media_mode="immediate", scale=None):
    check_args("cross_attention", q, k, v, kv_lens, q_media, kv_media, media_mode)
    return _backend.dispatch("cross_attention", FORWARD_IMPLS, q, k, v, kv_lens, q_media,
                             kv_media, media_mode, scale)


@torch.library.register_kernel("mmfast::cross_attention_backward", "cuda")
def _cross_attention_backward_cuda(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media,
                                   kv_media, media_mode, scale):
    _check_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, q_media, kv_media, media_mode)
    return _backend.dispatch("cross_attention_backward", BACKWARD_IMPLS, grad_out, grad_lse, q,
                             k, v, out, lse, kv_lens, q_media, kv_media, media_mode, scale)


@torch.library.register_kernel("mmfast::key_attention_mass", "cuda")
def _key_attention_mass_cuda(q, k, kv_lens=None, q_media=None, kv_media=None,
                             media_mode="immediate", scale=None):
    check_args("key_attention_mass", q, k, None, kv_lens, q_media, kv_media, media_mode)
    return _backend.dispatch("key_attention_mass", MASS_IMPLS, q, k, kv_lens, q_media, kv_media,
                             media_mode, scale)
