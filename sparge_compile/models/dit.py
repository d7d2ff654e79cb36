"""A small DiT (Peebles & Xie, 2023) whose attention is F.scaled_dot_product_attention.

Patchify (a strided conv), fixed 2-D sin-cos positions, sinusoidal timestep embedding + MLP,
class embedding (with a null class for classifier-free use), adaLN-Zero blocks, a final
adaLN + linear layer and unpatchify. Takes ``(x, t, y)``: images ``(B, C, H, W)``, timesteps
``(B,)`` (floats, e.g. flow-matching t in [0, 1]) and class labels ``(B,)`` (int64), and
returns a tensor shaped like x (the velocity for flow matching).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim). t in [0, 1] is scaled by 1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (h*w, dim)."""
    assert dim % 4 == 0, "dim must be a multiple of 4"
    d = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    oy, ox = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=-1)
        x = x + a1[:, None] * self.attn(modulate(self.norm1(x), s1, g1))
        return x + a2[:, None] * self.mlp(modulate(self.norm2(x), s2, g2))


class DiT(nn.Module):
    """DiT(image_size, patch, in_ch, dim, depth, heads, num_classes): tokens = (image_size/patch)^2,
    head dim = dim / heads. ``zero_init=True`` is DiT's adaLN-Zero init (outputs start at 0)."""

    def __init__(self, image_size: int = 64, patch: int = 1, in_ch: int = 3, dim: int = 256, depth: int = 4,
                 heads: int = 4, num_classes: int = 0, mlp_ratio: float = 4.0, zero_init: bool = True):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        self.image_size, self.patch, self.in_ch, self.dim = image_size, patch, in_ch, dim
        self.grid = image_size // patch
        self.x_embed = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos", sincos_2d(dim, self.grid, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.y_embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * in_ch)
        self._init(zero_init)

    def _init(self, zero_init: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if zero_init:
            for b in self.blocks:
                nn.init.zeros_(b.ada[-1].weight)
                nn.init.zeros_(b.ada[-1].bias)
            nn.init.zeros_(self.ada_out[-1].weight)
            nn.init.zeros_(self.ada_out[-1].bias)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        c = self.t_embed(timestep_embedding(t, self.dim).to(h.dtype))
        if self.y_embed is not None:
            if y is None:
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embed(y)
        for blk in self.blocks:
            h = blk(h, c)
        s, g = self.ada_out(c).chunk(2, dim=-1)
        h = self.out(modulate(self.norm_out(h), s, g))
        p, g_, C = self.patch, self.grid, self.in_ch
        h = h.view(B, g_, g_, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, g_ * p, g_ * p)
