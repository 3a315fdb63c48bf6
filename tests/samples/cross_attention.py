"""Sample inputs of cross_attention: odd sizes, every mask kind, ragged and zero-length samples,
GQA, non-contiguous inputs (slices of a packed qkv, strided last dim)."""

import torch

from tests.helpers import SampleInput, noncontiguous


def _media_keys(counts, lk, device):
    """kv_media [Lk] for images with the given token counts (1-based ids), 0-padded to lk."""
    ids = torch.cat([torch.full((n,), i + 1, dtype=torch.int64) for i, n in enumerate(counts)])
    return torch.nn.functional.pad(ids, (0, lk - ids.numel())).to(device)


def make_case(b, lq, lk, hq, hk, d, *, device, dtype, requires_grad, nc=False):
    def rnd(*shape):
        t = torch.randn(*shape, device=device, dtype=dtype)
        return noncontiguous(t) if nc else t
    q, k, v = rnd(b, lq, hq, d), rnd(b, lk, hk, d), rnd(b, lk, hk, d)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    g = dict(device=device, dtype=dtype, requires_grad=requires_grad)
    out = []

    out.append(SampleInput(make_case(2, 97, 77, 4, 2, 40, **g), {}, "97x77 gqa d40"))
    out.append(SampleInput(make_case(2, 1, 1, 2, 2, 72, **g),
                           {"kv_lens": torch.tensor([0, 1], device=device)}, "1x1 d72 len0"))
    out.append(SampleInput(make_case(1, 1025, 577, 1, 1, 40, **g),
                           {"kv_lens": torch.tensor([500], device=device, dtype=torch.int32)},
                           "1025x577 ragged"))

    # Flamingo: images with different token counts, text before the first image, sorted.
    lq, lk = 97, 77
    km = torch.stack([_media_keys([13, 30, 9], lk, device), _media_keys([64, 5], lk, device)])
    qm = torch.sort(torch.randint(0, 4, (2, lq), device=device), dim=1).values
    qm[1].clamp_(max=2)
    out.append(SampleInput(make_case(2, lq, lk, 4, 1, 72, **g),
                           {"q_media": qm, "kv_media": km, "media_mode": "immediate"},
                           "flamingo immediate mqa d72"))
    # previous mode, unsorted queries, ragged lengths with a zero-length sample, explicit scale.
    qm_u = torch.randint(0, 4, (3, lq), device=device, dtype=torch.int32)
    km3 = torch.cat([km, _media_keys([20, 20, 20], lk, device)[None]]).to(torch.int32)
    out.append(SampleInput(make_case(3, lq, lk, 2, 2, 40, **g),
                           {"q_media": qm_u, "kv_media": km3, "media_mode": "previous",
                            "kv_lens": torch.tensor([70, 0, 45], device=device), "scale": 0.3},
                           "flamingo previous unsorted ragged"))

    # Slices of a packed qkv [B, L, 3, H, D] (self-attention layout, Lq == Lk).
    packed = torch.randn(2, 33, 3, 2, 40, device=device, dtype=dtype)
    out.append(SampleInput(tuple(packed[:, :, i].detach().requires_grad_(requires_grad)
                                 for i in range(3)),
                           {"q_media": torch.ones(2, 33, dtype=torch.int64, device=device),
                            "kv_media": torch.ones(2, 33, dtype=torch.int64, device=device)},
                           "packed qkv slices"))
    out.append(SampleInput(make_case(2, 40, 70, 2, 1, 72, nc=True, **g),
                           {"kv_lens": torch.tensor([70, 3], device=device)},
                           "strided last dim"))
    return out
