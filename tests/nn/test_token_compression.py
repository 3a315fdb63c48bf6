import math

import pytest
import torch
import torch.nn.functional as F

from mmfast import reference
from mmfast.nn import PixelShuffle, SpatialPool, TokenMerger
from tests.helpers import assert_close


def _internvl_pixel_shuffle(x, scale_factor=0.5):
    """InternVL's InternVLChatModel.pixel_shuffle (ps_version v2), as published."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor),
               int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_token_merger_vit_schedule_and_gradients():
    """ToMe on ViT-L/14-336 token counts: r=16 per layer, sizes tracked, bias = log(size)."""
    merger = TokenMerger(r=16)
    x = torch.randn(2, 577, 32, requires_grad=True)
    h, size, n = x, None, 577
    for _ in range(3):
        out = merger(h, metric=h.detach()[..., :16], size=size)
        n -= 16
        assert out.x.shape == (2, n, 32) and out.size.shape == (2, n)
        assert out.attn_bias.shape == (2, 1, 1, n)
        assert_close(out.attn_bias.exp()[:, 0, 0], out.size, atol=1e-5, rtol=1e-5)
        assert torch.all(out.size.sum(1) == 577)  # every original token is counted once
        h, size = out.x, out.size
    (h * torch.arange(32.0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Each token's gradient is its share of its final row: the weights of a row sum to 1.
    assert_close(x.grad.sum(1), torch.arange(32.0).expand(2, 32) * (577 - 48), atol=1e-3,
                 rtol=1e-5)


def test_token_merger_matches_reference_and_clamps_r():
    x, metric = torch.randn(1, 21, 8), torch.randn(1, 21, 8)
    out = TokenMerger(r=100, protect_first=True)(x, metric)
    assert out.x.shape == (1, 11, 8)  # r clamped to (21 - 1) // 2 = 10, as ToMe does
    ref, ref_size, ref_dest = reference.bipartite_merge(x.double(), metric, 10, protect_first=True)
    assert torch.equal(out.dest, ref_dest)
    assert_close(out.x, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="r must be"):
        TokenMerger(r=-1)


@pytest.mark.parametrize("h, w", [(24, 24), (7, 10)])
def test_spatial_pool_average_is_2x2_mean(h, w):
    x = torch.randn(16, h * w, 12)  # 16 video frames
    pooled, (ph, pw) = SpatialPool("average")(x, grid=(h, w))
    assert (ph, pw) == (h // 2, w // 2) and pooled.shape == (16, ph * pw, 12)
    g = x.reshape(16, h, w, 12)[:, :ph * 2, :pw * 2]
    expected = g.reshape(16, ph, 2, pw, 2, 12).mean(dim=(2, 4)).reshape(16, ph * pw, 12)
    assert_close(pooled, expected, atol=1e-6, rtol=1e-6)


def test_spatial_pool_bilinear_budgets():
    x = torch.randn(2, 576, 8, requires_grad=True)
    pooled, grid = SpatialPool("bilinear")(x)
    assert grid == (12, 12) and pooled.shape == (2, 144, 8)
    for budget in (64, 100, 577, 1):
        pooled, (ph, pw) = SpatialPool("bilinear", budget=budget)(x)
        assert ph * pw <= budget and pooled.shape == (2, ph * pw, 8)
        assert ph * pw >= min(budget, 576) * 0.75 or budget == 1
    wide, (ph, pw) = SpatialPool("bilinear", budget=100)(torch.randn(1, 24 * 48, 4), grid=(24, 48))
    assert ph * pw <= 100 and abs(pw / ph - 2) < 0.35
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Constant input stays constant through the resize.
    const, _ = SpatialPool("bilinear", budget=50)(torch.full((1, 576, 3), 2.5))
    assert_close(const, torch.full_like(const, 2.5), atol=1e-6, rtol=0)


def test_pixel_shuffle_matches_internvl():
    x = torch.randn(3, 1024, 20)  # InternVL: 448px / 14 = 32 x 32 tokens -> 16 x 16
    out = PixelShuffle(0.5)(x)
    expected = _internvl_pixel_shuffle(x.reshape(3, 32, 32, 20)).reshape(3, -1, 80)
    assert out.shape == (3, 256, 80) and torch.equal(out, expected)
    rect = torch.randn(1, 6 * 10, 4)
    assert torch.equal(PixelShuffle(0.5)(rect, grid=(6, 10)),
                       _internvl_pixel_shuffle(rect.reshape(1, 6, 10, 4)).reshape(1, -1, 16))


@pytest.mark.parametrize("make, match", [
    (lambda: PixelShuffle(0.3), "scale must be"),
    (lambda: PixelShuffle(0.5)(torch.randn(1, 35, 4)), "not a square grid"),
    (lambda: PixelShuffle(0.5)(torch.randn(1, 15, 4), grid=(3, 5)), "not divisible"),
    (lambda: SpatialPool("max"), "mode must be"),
    (lambda: SpatialPool("average", budget=10), "budget needs"),
    (lambda: SpatialPool()(torch.randn(1, 12, 4), grid=(3, 5)), "does not hold"),
])
def test_bad_module_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
