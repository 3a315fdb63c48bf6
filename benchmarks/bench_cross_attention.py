"""cross_attention: text tokens / resampler latents attending to image tokens, on shapes of real
vision-language models, against SDPA with a dense mask and FlexAttention with a block mask.

GFLOP/s count only attended (query, key) pairs: 4·D flops per pair and query head forward
(Q Kᵀ and P V), 2.5 times that backward (flash-attention's count)."""

import torch
import torch.nn.functional as F

import mmfast
from benchmarks.harness import Case, Provider, mmfast_implementation
from mmfast.reference.cross_attention import allowed_mask

OP = "cross_attention"
MODES = ("forward", "forward+backward")


def _flamingo_media(b, lq, n_images, device, gen):
    """q_media [B, Lq]: sorted image indices of interleaved text (some text before the first
    image), as open_flamingo's cumsum of media locations gives."""
    starts = torch.sort(torch.randint(0, lq, (b, n_images), generator=gen), dim=1).values
    locations = torch.zeros(b, lq, dtype=torch.int64)
    locations.scatter_add_(1, starts, torch.ones_like(starts))
    return locations.cumsum(1).clamp(max=n_images).to(device)


def _case(name, b, lq, lk, hq, hk, d, *, counts=None, mode=None, kv_lens=None, quick_scale=1):
    """counts: image token counts per sample (Flamingo masks); kv_lens: ragged key lengths."""
    params = {"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hk": hk, "D": d}
    if mode:
        params["media_mode"] = mode
    if kv_lens:
        params["kv_lens"] = kv_lens
    gen = torch.Generator().manual_seed(0)
    masks = {}
    if counts:
        ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(counts)])
        masks = {"q_media": _flamingo_media(b, lq, len(counts), "cpu", gen),
                 "kv_media": torch.nn.functional.pad(ids, (0, lk - ids.numel())).expand(b, -1),
                 "media_mode": mode}
    if kv_lens:
        masks["kv_lens"] = torch.tensor(kv_lens)
    allowed = allowed_mask(b, lq, lk, **masks)  # [B, Lq, Lk]
    pairs = int(allowed.sum())

    def make_inputs(device, dtype, requires_grad):
        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)
        inp = {"q": rnd(b, lq, hq, d), "k": rnd(b, lk, hk, d), "v": rnd(b, lk, hk, d),
               "masks": {n: t.to(device) if torch.is_tensor(t) else t for n, t in masks.items()},
               "dense_mask": allowed.to(device)[:, None] if masks else None}
        return inp

    flops = 4.0 * d * hq * pairs
    return Case(name, params, make_inputs, flops=flops, backward_flops=2.5 * flops)


def cases(quick):
    if quick:
        return [
            _case("OpenFlamingo-9B x-attn (1 sample, immediate)", 1, 256, 320, 8, 8, 64,
                  counts=[64] * 5, mode="immediate"),
            _case("Perceiver resampler step (1 image)", 1, 64, 641, 16, 16, 64),
        ]
    return [
        _case("OpenFlamingo-9B gated x-attn, immediate", 4, 1024, 320, 8, 8, 64,
              counts=[64] * 5, mode="immediate"),
        _case("OpenFlamingo-9B gated x-attn, previous", 4, 1024, 320, 8, 8, 64,
              counts=[64] * 5, mode="previous"),
        _case("OpenFlamingo/Idefics Perceiver resampler step", 4, 64, 577 + 64, 16, 16, 64),
        _case("Qwen-VL resampler (256 queries / 1024 tokens)", 2, 256, 1024, 16, 16, 128),
        _case("LLaVA-NeXT-like ragged image tokens (GQA)", 4, 256, 2880, 16, 4, 64,
              kv_lens=[2880, 1728, 2304, 576]),
    ]


def _reference(inp):
    return mmfast.reference.cross_attention(inp["q"], inp["k"], inp["v"], **inp["masks"])


def _sdpa(inp):
    q, k, v = (t.transpose(1, 2) for t in (inp["q"], inp["k"], inp["v"]))
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inp["dense_mask"],
                                          enable_gqa=gqa).transpose(1, 2)


_flex = None


def _flex_attention(inp):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.transpose(1, 2) for t in (inp["q"], inp["k"], inp["v"]))
    block_mask = inp.get("_block_mask")
    if block_mask is None and inp["dense_mask"] is not None:
        dense = inp["dense_mask"][:, 0]  # [B, Lq, Lk]

        def mask_mod(b, h, qi, kj):
            return dense[b, qi, kj]
        block_mask = create_block_mask(mask_mod, dense.shape[0], None, dense.shape[1],
                                       dense.shape[2], device=str(dense.device))
        inp["_block_mask"] = block_mask  # built once per case, outside the timed calls
    return _flex(q, k, v, block_mask=block_mask,
                 enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def providers(device):
    return [
        Provider("eager reference", _reference, "eager"),
        Provider("SDPA + dense mask", _sdpa, "peer"),
        Provider("FlexAttention + block mask (compiled)", _flex_attention, "peer"),
        Provider("mmfast", lambda inp: mmfast.ops.cross_attention(inp["q"], inp["k"], inp["v"],
                                                                  **inp["masks"]),
                 "mmfast", implementation=mmfast_implementation(OP, device)),
    ]
