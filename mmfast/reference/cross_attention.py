"""The meaning of mmfast.ops.cross_attention and mmfast.ops.key_attention_mass, in plain PyTorch.

Everything is computed in the inputs' dtype (pass float64 tensors for a reference), the full
[B, H, Lq, Lk] score matrix is materialized: this is a definition, not a kernel.
"""

import torch

MEDIA_MODES = ("immediate", "previous")


def allowed_mask(batch: int, lq: int, lk: int, *, kv_lens=None, q_media=None, kv_media=None,
                 media_mode: str = "immediate", device=None) -> torch.Tensor:
    """[B, Lq, Lk] bool: may query i attend key j.

    kv_lens [B]:   keys j >= kv_lens[b] are padding.
    q_media [B, Lq], kv_media [B, Lk] (open_flamingo): 1-based image index a text token follows
    (0 = before any image) and the image a key belongs to (0 = padding key).
    "immediate": kv_media[j] == q_media[i] > 0;  "previous": 0 < kv_media[j] <= q_media[i].
    """
    if media_mode not in MEDIA_MODES:
        raise ValueError(f"media_mode must be one of {MEDIA_MODES}, got {media_mode!r}")
    allowed = torch.ones(batch, lq, lk, dtype=torch.bool, device=device)
    if kv_lens is not None:
        keys = torch.arange(lk, device=device)
        allowed &= (keys[None, :] < kv_lens.to(device)[:, None])[:, None, :]
    if (q_media is None) != (kv_media is None):
        raise ValueError("q_media and kv_media must be given together")
    if q_media is not None:
        qm = q_media.to(device).long()[:, :, None]   # [B, Lq, 1]
        km = kv_media.to(device).long()[:, None, :]  # [B, 1, Lk]
        if media_mode == "immediate":
            allowed &= (km == qm) & (qm > 0)
        else:
            allowed &= (km > 0) & (km <= qm)
    return allowed


def _scores(q, k, scale):
    """[B, Hq, Lq, Lk] scaled scores, K/V heads repeated for GQA."""
    hq, hk = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(hq // hk, dim=2)
    return torch.einsum("bihd,bjhd->bhij", q, kk) * scale


def _probabilities(q, k, scale, allowed):
    """(P [B, Hq, Lq, Lk], lse [B, Hq, Lq]); rows without an allowed key are 0 and lse -inf.
    Such rows are filled with finite scores before the logsumexp so that autograd never sees
    exp(-inf - -inf)."""
    has_key = allowed.any(dim=-1)[:, None, :, None]  # [B, 1, Lq, 1]
    s = _scores(q, k, scale).masked_fill(~allowed[:, None], float("-inf"))
    s = s.masked_fill(~has_key, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * has_key
    return p, lse.squeeze(-1).masked_fill(~has_key[..., 0], float("-inf"))


def cross_attention(q, k, v, *, kv_lens=None, q_media=None, kv_media=None,
                    media_mode="immediate", scale=None, return_lse=False):
    """softmax(q kᵀ · scale) v per head over the allowed keys (see allowed_mask).

    q [B, Lq, Hq, D], k and v [B, Lk, Hk, D], Hq % Hk == 0. Returns out [B, Lq, Hq, D]
    (and lse [B, Hq, Lq] in float32 with return_lse); a query with no allowed key gives 0 and
    lse = -inf.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = allowed_mask(q.shape[0], q.shape[1], k.shape[1], kv_lens=kv_lens, q_media=q_media,
                           kv_media=kv_media, media_mode=media_mode, device=q.device)
    p, lse = _probabilities(q, k, scale, allowed)
    hq, hk = q.shape[2], k.shape[2]
    vv = v.repeat_interleave(hq // hk, dim=2)
    out = torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), vv)
    if return_lse:
        return out, lse.float()
    return out


def key_attention_mass(q, k, *, kv_lens=None, q_media=None, kv_media=None,
                       media_mode="immediate", scale=None):
    """[B, Lk] float32: per key, the attention probability it receives summed over query heads
    and queries (each query row with an allowed key sums to 1, others contribute 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = allowed_mask(q.shape[0], q.shape[1], k.shape[1], kv_lens=kv_lens, q_media=q_media,
                           kv_media=kv_media, media_mode=media_mode, device=q.device)
    p, _ = _probabilities(q, k, scale, allowed)
    return p.sum(dim=(1, 2)).float()


__all__ = ["cross_attention", "key_attention_mass", "allowed_mask", "MEDIA_MODES"]
