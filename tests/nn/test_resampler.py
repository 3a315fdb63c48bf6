import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfast.nn import PerceiverResampler, Resampler
from tests.helpers import assert_close, noncontiguous


# --- open_flamingo's PerceiverResampler, written from its description (plain PyTorch) ---------

class _RefPerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, latents):  # x [b, T, n1, D], latents [b, T, n2, D]
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t):  # b t n (h d) -> b h t n d
            b, t_, n, hd = t.shape
            return t.view(b, t_, n, self.heads, hd // self.heads).permute(0, 3, 1, 2, 4)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = torch.einsum("...id,...jd->...ij", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("...ij,...jd->...id", sim.softmax(dim=-1), v)
        b, h, t, n, d = out.shape
        return self.to_out(out.permute(0, 2, 3, 1, 4).reshape(b, t, n, h * d))


class _RefPerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_latents, max_num_media, max_num_frames,
                 ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim))
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim))
        self.layers = nn.ModuleList(nn.ModuleList([
            _RefPerceiverAttention(dim, dim_head, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False))]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x [b, T, F, v, D] -> [b, T, n, D]
        b, t, f, v, d = x.shape
        x = x + self.frame_embs[:f].view(1, 1, f, 1, d)
        x = x.reshape(b, t, f * v, d) + self.media_time_embs[:t]
        latents = self.latents.expand(b, t, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


def _perceiver_pair(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = dict(dim=24, depth=2, dim_head=8, heads=3, num_latents=5, max_num_media=3,
               max_num_frames=2)
    ours = PerceiverResampler(**cfg)
    ref = _RefPerceiverResampler(**cfg)
    for p in ref.parameters():  # non-trivial LayerNorm affine parameters too
        nn.init.normal_(p, std=0.5)
    ours.load_state_dict(ref.state_dict())  # open_flamingo's parameter names, unchanged
    return ours.to(dtype), ref.double()


def test_perceiver_matches_open_flamingo_forward_and_gradients():
    ours, ref = _perceiver_pair()
    x = torch.randn(2, 3, 2, 7, 24)  # B=2, T=3 media, F=2 frames of 7 tokens
    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out, expected = ours(x_ours), ref(x_ref)
    assert out.shape == (2, 3, 5, 24)
    assert_close(out, expected, atol=2e-4, rtol=2e-4)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w.float()).sum().backward()
    (expected * w).sum().backward()
    assert_close(x_ours.grad, x_ref.grad, atol=2e-4, rtol=2e-4, name="x.grad")
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, p_ref.grad, atol=1e-3, rtol=1e-3, name=f"{name}.grad")


def test_perceiver_ragged_media_equals_unpadded_media():
    """media_lens: padding tokens are never attended, so each media's result equals the
    reference run on its real tokens alone."""
    ours, ref = _perceiver_pair()
    x = torch.randn(2, 2, 1, 9, 24)
    lens = torch.tensor([[9, 4], [1, 6]])
    out = ours(x, media_lens=lens)
    assert out.shape == (2, 2, 5, 24)
    for b in range(2):
        for t in range(2):
            # Media t alone, as media 0 of a sample: add the time embedding of t beforehand.
            alone = x[b:b + 1, t:t + 1, :, :int(lens[b, t])].double()
            alone = alone + (ref.media_time_embs[t] - ref.media_time_embs[0]).detach()
            assert_close(out[b, t], ref(alone)[0, 0], atol=2e-4, rtol=2e-4,
                         name=f"media ({b}, {t})")


def test_perceiver_flat_input_and_bad_lens():
    model = PerceiverResampler(dim=16, depth=1, dim_head=4, heads=2, num_latents=3)
    x = torch.randn(3, 11, 16)
    out = model(x, media_lens=torch.tensor([11, 5, 2]))
    assert out.shape == (3, 3, 16) and torch.isfinite(out).all()
    assert_close(model(x[1:2, :5]), out[1:2], atol=1e-5, rtol=1e-5)
    assert_close(model(noncontiguous(x), media_lens=torch.tensor([11, 5, 2])), out,
                 atol=1e-6, rtol=1e-6, name="non-contiguous x")
    with pytest.raises(ValueError, match="media_lens"):
        model(x[:, None, None], media_lens=torch.tensor([11, 5, 2]))
    with pytest.raises(ValueError, match="x must be"):
        model(x[0])


def test_perceiver_bfloat16_smoke():
    ours, _ = _perceiver_pair()
    x = torch.randn(2, 1, 2, 7, 24)
    expected = ours(x)
    out = ours.to(torch.bfloat16)(x.bfloat16().requires_grad_())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out, expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()


# --- Qwen-VL's Resampler with F.scaled_dot_product_attention ----------------------------------

def _mae_sincos(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (numpy, as Qwen-VL copies it)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                       np.arange(grid_size, dtype=np.float64))  # w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb)


def _qwen_abs_pos(abs_pos, tgt):
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
                         size=(tgt, tgt), mode="bicubic", align_corners=False
                         ).permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


def _qwen_reference(m, x, kv_lens=None):
    """Qwen-VL Resampler.forward + ln_post + proj with SDPA, from m's parameters."""
    b, n = x.shape[:2]
    h = m.num_heads
    pos = _mae_sincos(m.query.shape[1], m.grid_size).to(x.dtype)
    x = m.ln_kv(m.kv_proj(x))
    q_in = m.ln_q(m.query) + pos
    k_in = x + _qwen_abs_pos(pos, n)

    def heads(t):  # [b, L, E] -> [b, h, L, E / h]
        return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

    q = heads(m.to_q(q_in).expand(b, -1, -1))
    k, v = heads(m.to_k(k_in)), heads(m.to_v(x))
    mask = None
    if kv_lens is not None:
        mask = (torch.arange(n)[None, :] < kv_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = m.out_proj(out.transpose(1, 2).reshape(b, -1, m.query.shape[1]))
    return m.proj(m.ln_post(out))


def _randomized_resampler(**kw):
    torch.manual_seed(1)
    m = Resampler(**kw)
    for name, p in m.named_parameters():
        nn.init.normal_(p, mean=1.0 if name.endswith("ln_q.weight") else 0.0, std=0.3)
    return m


def test_resampler_pos_embed_is_mae_sincos():
    m = Resampler(grid_size=5, embed_dim=12, num_heads=3)
    assert_close(m.pos_embed, _mae_sincos(12, 5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [9, 49])  # the query grid (3x3) and a larger, interpolated one
def test_resampler_matches_sdpa_reference(n):
    m = _randomized_resampler(grid_size=3, embed_dim=12, num_heads=3, kv_dim=10, output_dim=7)
    x = torch.randn(3, n, 10)
    lens = torch.tensor([n, n - 2, 1])
    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out = m(x_ours, kv_lens=lens)
    m64 = _randomized_resampler(grid_size=3, embed_dim=12, num_heads=3, kv_dim=10,
                                output_dim=7).double()
    expected = _qwen_reference(m64, x_ref, kv_lens=lens)
    assert out.shape == (3, 9, 7)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert_close(m(noncontiguous(x), kv_lens=lens), out, atol=1e-6, rtol=1e-6,
                 name="non-contiguous x")
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w.float()).sum().backward()
    (expected * w).sum().backward()
    assert_close(x_ours.grad, x_ref.grad, atol=1e-4, rtol=1e-4, name="x.grad")
    assert_close(m.query.grad, m64.query.grad, atol=1e-4, rtol=1e-4, name="query.grad")


def test_resampler_bad_input_and_bfloat16_smoke():
    m = _randomized_resampler(grid_size=2, embed_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 10, 8))
    x = torch.randn(2, 16, 8)
    expected = m(x)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 8)
    assert_close(out, expected, atol=0.1, rtol=0.05)


def test_perceiver_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(2)
    ours = PerceiverResampler(dim=16, depth=1, dim_head=4, heads=2, num_latents=3)
    x = torch.randn(2, 1, 2, 7, 16)
    lens = torch.tensor([[14], [9]])
    x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = ours(x_e, media_lens=lens)
    expected.sum().backward()
    out = torch.compile(ours, fullgraph=True)(x_c, media_lens=lens)
    out.sum().backward()
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_close(x_c.grad, x_e.grad, atol=1e-5, rtol=1e-5, name="x.grad")
