"""Resamplers: a fixed number of learned queries attend to a variable number of image tokens
(open_flamingo's PerceiverResampler, Qwen-VL's single-layer Resampler), over
mmfast.ops.cross_attention."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.cross_attention import cross_attention


class PerceiverAttention(nn.Module):
    """One open_flamingo PerceiverAttention layer: latents attend to concat(media, latents).

    Parameter names are open_flamingo's, so its state dicts load unchanged.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor,
                media_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x [M, Nm, dim] media tokens, latents [M, Nl, dim], media_lens [M] valid media tokens
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        m, nl = latents.shape[:2]
        q = self.to_q(latents).view(m, nl, self.heads, self.dim_head)
        # Softmax over keys does not depend on their order, so the keys are laid out as
        # (latents, media) rather than open_flamingo's (media, latents): then every padding key
        # sits at the end of the sequence, which is what kv_lens expresses.
        kv_input = torch.cat((latents, x), dim=1)
        k, v = self.to_kv(kv_input).view(m, kv_input.shape[1], 2, self.heads,
                                         self.dim_head).unbind(2)
        kv_lens = None if media_lens is None else media_lens + nl
        out = cross_attention(q, k, v, kv_lens=kv_lens)  # [M, Nl, heads, dim_head]
        return self.to_out(out.reshape(m, nl, self.heads * self.dim_head))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """open_flamingo's FeedForward (LayerNorm, Linear, GELU, Linear; no biases)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """open_flamingo's PerceiverResampler: ``num_latents`` learned latents, ``depth`` layers of
    (latents += attn(media, latents); latents += ff(latents)), then a final LayerNorm.

    forward(x, media_lens=None):
      x: [B, T, F, v, dim] (open_flamingo: T media per sample, F frames of v tokens each) or
         [B, N, dim] (one media of N tokens).
      media_lens: optional int tensor of shape [B, T] resp. [B]: how many of the F*v (resp. N)
         tokens of each media are real, counted in (frame, token) order; the tokens after them
         are padding and never attended.
    Returns [B, T, num_latents, dim] resp. [B, num_latents, dim].
    """

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8,
                 num_latents: int = 64, max_num_media: Optional[int] = None,
                 max_num_frames: Optional[int] = None, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = (nn.Parameter(torch.randn(max_num_frames, dim))
                           if max_num_frames is not None else None)
        self.media_time_embs = (nn.Parameter(torch.randn(max_num_media, 1, dim))
                                if max_num_media is not None else None)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, media_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() == 3:
            lens = None if media_lens is None else media_lens[:, None]
            return self.forward(x[:, None, None], lens)[:, 0]
        if x.dim() != 5:
            raise ValueError("PerceiverResampler: x must be [B, T, F, v, dim] or [B, N, dim], "
                             f"got shape {list(x.shape)}")
        b, t, f, nv, dim = x.shape
        if media_lens is not None and tuple(media_lens.shape) != (b, t):
            raise ValueError(f"PerceiverResampler: media_lens must have shape {[b, t]}, got "
                             f"{list(media_lens.shape)}")
        if self.frame_embs is not None:
            x = x + self.frame_embs[:f][None, None, :, None]
        x = x.reshape(b, t, f * nv, dim)
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:t]
        # Each media resamples independently: fold T into the batch.
        x = x.reshape(b * t, f * nv, dim)
        lens = None if media_lens is None else media_lens.reshape(b * t)
        latents = self.latents.to(x.dtype).expand(b * t, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents, lens) + latents
            latents = ff(latents) + latents
        return self.norm(latents).view(b, t, -1, dim)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """[h * w, dim] float32: the MAE / Qwen-VL 2-D sin-cos table, row-major over the grid.

    The first dim/2 channels encode the column (MAE's grid[0] comes from np.meshgrid(w, h)),
    the last dim/2 the row; each half is [sin(pos * omega), cos(pos * omega)] with
    omega_i = 10000 ** (-i / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def one_axis(pos):  # [h * w] -> [h * w, dim / 2]
        angle = pos.reshape(-1, 1) * omega
        return torch.cat((angle.sin(), angle.cos()), dim=1)

    return torch.cat((one_axis(cols), one_axis(rows)), dim=1).float()


class Resampler(nn.Module):
    """Qwen-VL's visual Resampler with the ln_post / proj that follow it.

    ``grid_size ** 2`` learned queries (LayerNorm'd) plus their 2-D sin-cos positions attend,
    in one multi-head cross-attention, to the (projected, LayerNorm'd) image tokens plus theirs;
    the key positions are the query table bicubically resized to the key grid when it differs
    (Qwen-VL's get_abs_pos). Then LayerNorm and a projection to ``output_dim``.

    forward(x, kv_lens=None): x [B, N, kv_dim] with N a square number, kv_lens [B] optional
    count of real tokens. Returns [B, grid_size ** 2, output_dim].
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int,
                 kv_dim: Optional[int] = None, output_dim: Optional[int] = None,
                 eps: float = 1e-6):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"Resampler: embed_dim ({embed_dim}) must be a multiple of "
                             f"num_heads ({num_heads})")
        self.grid_size = grid_size
        self.num_heads = num_heads
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size, grid_size),
                             persistent=False)
        self.query = nn.Parameter(torch.empty(grid_size * grid_size, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False)
                        if kv_dim is not None and kv_dim != embed_dim else nn.Identity())
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.to_q = nn.Linear(embed_dim, embed_dim)
        self.to_k = nn.Linear(embed_dim, embed_dim)
        self.to_v = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Linear(embed_dim, output_dim or embed_dim, bias=False)

    def key_pos_embed(self, n: int) -> torch.Tensor:
        """[n, embed_dim]: Qwen-VL's get_abs_pos for n = side ** 2 key tokens."""
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"Resampler: the number of image tokens must be a square, got {n}")
        if side == self.grid_size:
            return self.pos_embed
        table = self.pos_embed.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(side, side), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(n, -1)

    def forward(self, x: torch.Tensor, kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"Resampler: x must be [B, N, kv_dim], got shape {list(x.shape)}")
        b, n = x.shape[:2]
        x = self.ln_kv(self.kv_proj(x))
        query = self.ln_q(self.query).to(x.dtype)
        pos = self.pos_embed.to(x.dtype)
        d = query.shape[1] // self.num_heads
        q = self.to_q(query + pos).expand(b, -1, -1).reshape(b, -1, self.num_heads, d)
        k = self.to_k(x + self.key_pos_embed(n).to(x.dtype)).view(b, n, self.num_heads, d)
        v = self.to_v(x).view(b, n, self.num_heads, d)
        out = cross_attention(q, k, v, kv_lens=kv_lens)  # [B, Nq, heads, d]
        out = self.out_proj(out.reshape(b, -1, self.num_heads * d))
        return self.proj(self.ln_post(out))
