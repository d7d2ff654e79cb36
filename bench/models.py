"""The benchmarks' models (random weights unless trained here) and the rotary embedding they use.

* :class:`WanBlock` / :class:`WanStack`: Wan2.1-style DiT blocks (self-attention with 3-D RoPE,
  cross-attention to text tokens, FFN, adaLN modulation): ``e2e`` and ``calibrate``
* :class:`RopeStack` and :func:`calibration_stack`: the stack with the RoPE tables computed once
  and per-layer attention sharpness (``calibrate``)
* :class:`VideoTransformer`: a tiny video transformer trained on moving blobs (``accuracy``'s
  trained source, see :func:`bench.data.trained_qkv`)
* :func:`diffusers_dit`: diffusers' ``DiTTransformer2DModel`` (``dit``)

The distillation benchmark trains the library's own ``sparge_compile.models.DiT``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Rotary position embedding (Wan-style, 3-D)


def rope_tables(T: int, Hh: int, W: int, D: int, device=None, theta: float = 10000.0):
    """cos, sin (T*Hh*W, D/2) of the Wan-style 3-D rotary embedding: D/2 pairs split over (t, h, w)."""
    half = D // 2
    nh = half // 3
    nt = half - 2 * nh
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(Hh, device=device),
                             torch.arange(W, device=device), indexing="ij")

    def freqs(n):
        return theta ** (-torch.arange(n, device=device, dtype=torch.float32) / max(1, n))

    ang = torch.cat([t.reshape(-1, 1) * freqs(nt), h.reshape(-1, 1) * freqs(nh),
                     w.reshape(-1, 1) * freqs(nh)], dim=-1)  # (N, half)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (even, odd) pairs of x (..., N, D) by the tables of :func:`rope_tables` (float32)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xp[..., 0], xp[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)


def rope_3d(x: torch.Tensor, T: int, Hh: int, W: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan-style 3-D rotary embedding on (..., N, D): D/2 rotation pairs split over (t, h, w)."""
    return apply_rope(x, *rope_tables(T, Hh, W, x.shape[-1], x.device, theta))


# --------------------------------------------------------------------------------------------
# Wan2.1-style DiT blocks


class WanBlock(nn.Module):
    """Self-attention (3-D RoPE) + cross-attention + FFN with adaLN modulation, as in Wan2.1."""

    def __init__(self, dim: int, heads: int, ffn: int, grid: tuple[int, int, int]):
        super().__init__()
        self.heads, self.grid = heads, grid
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cq = nn.Linear(dim, dim)
        self.ckv = nn.Linear(dim, 2 * dim)
        self.co = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def _heads(self, x):
        B, N, Cc = x.shape
        return x.view(B, N, self.heads, Cc // self.heads).transpose(1, 2)

    def forward(self, x, e, ctx, rope=None):
        """rope: precomputed (cos, sin) of :func:`rope_tables` (else built here)."""
        B, N, Cc = x.shape
        s1, g1, a1, s2, g2, a2 = (self.modulation + e).chunk(6, dim=1)
        h = self.norm1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if rope is None:
            q = rope_3d(self._heads(self.norm_q(q)), *self.grid).to(x.dtype)
            k = rope_3d(self._heads(self.norm_k(k)), *self.grid).to(x.dtype)
        else:
            q = apply_rope(self._heads(self.norm_q(q)), *rope).to(x.dtype)
            k = apply_rope(self._heads(self.norm_k(k)), *rope).to(x.dtype)
        a = F.scaled_dot_product_attention(q, k, self._heads(v))
        x = x + a1 * self.o(a.transpose(1, 2).reshape(B, N, Cc))
        cq = self._heads(self.cq(self.norm3(x)))
        ck, cv = (self._heads(t) for t in self.ckv(ctx).chunk(2, dim=-1))
        c = F.scaled_dot_product_attention(cq, ck, cv)
        x = x + self.co(c.transpose(1, 2).reshape(B, N, Cc))
        return x + a2 * self.ffn(self.norm2(x) * (1 + g2) + s2)


class WanStack(nn.Module):
    """``depth`` :class:`WanBlock` s, a final norm and a linear head (RoPE built in each block)."""

    def __init__(self, dim=1536, heads=12, ffn=8960, depth=4, grid=(21, 30, 52)):
        super().__init__()
        self.blocks = nn.ModuleList(WanBlock(dim, heads, ffn, grid) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, dim)

    def forward(self, x, e, ctx):
        for b in self.blocks:
            x = b(x, e, ctx)
        return self.head(self.norm(x))


class RopeStack(nn.Module):
    """:class:`WanStack` with the RoPE tables computed once (a smaller graph to trace)."""

    def __init__(self, dim, heads, ffn, depth, grid):
        super().__init__()
        self.blocks = nn.ModuleList(WanBlock(dim, heads, ffn, grid) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, dim)
        cos, sin = rope_tables(*grid, dim // heads, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, e, ctx):
        for b in self.blocks:
            x = b(x, e, ctx, rope=(self.cos, self.sin))
        return self.head(self.norm(x))


@torch.no_grad()
def calibration_stack(dim, heads, ffn, depth, grid, device, dtype, gain_range, tie, v_bias=0.0,
                      seed=0) -> tuple[RopeStack, list]:
    """A :class:`RopeStack` whose layers range from flat to peaked attention, and the q gains.

    Per block, from the seed: the q RMSNorm gain log-uniform in ``gain_range`` (the sharpness),
    the key projection tied to the query's (k = tie*Wq + sqrt(1-tie^2)*Wk), a value bias of std
    ``v_bias`` and the self-attention gate ~1, so attention errors reach the output.
    """
    torch.manual_seed(seed)
    with torch.device(device):   # initialise on the device: 1.4 B parameters at full size
        model = RopeStack(dim, heads, ffn, depth, grid)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = math.log(gain_range[0]), math.log(gain_range[1])
    gains = torch.exp(lo + (hi - lo) * torch.rand(depth, generator=g)).tolist()
    for blk, gain in zip(model.blocks, gains):
        w = blk.qkv.weight
        wq, wk = w[:dim], w[dim:2 * dim]
        wk.copy_(tie * wq + math.sqrt(max(0.0, 1 - tie * tie)) * wk)
        blk.norm_q.weight.fill_(gain)
        blk.qkv.bias[2 * dim:].copy_(v_bias * torch.randn(dim, generator=g))
        blk.modulation[:, 2].add_(1.0)   # the self-attention gate a1 ~ 1
    model = model.to(device=device, dtype=dtype).eval()
    model.cos, model.sin = model.cos.float(), model.sin.float()   # RoPE tables stay float32
    for p in model.parameters():
        p.requires_grad_(False)
    return model, gains


# --------------------------------------------------------------------------------------------
# A tiny video transformer (one token per pixel, 3-D RoPE)


class VideoBlock(nn.Module):
    """Pre-norm attention + MLP block; keeps the last (q, k, v) it saw in ``captured``."""

    def __init__(self, width: int, heads: int, D: int, grid: tuple[int, int, int]):
        super().__init__()
        self.heads, self.D, self.grid = heads, D, grid
        self.n1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * heads * D)
        self.o = nn.Linear(heads * D, width)
        self.n2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.captured = None

    def forward(self, x):
        B, N = x.shape[:2]
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.heads, self.D).permute(2, 0, 3, 1, 4)
        q, k = rope_3d(q, *self.grid), rope_3d(k, *self.grid)
        self.captured = (q.detach(), k.detach(), v.detach())
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, N, self.heads * self.D))
        return x + self.mlp(self.n2(x))


class VideoTransformer(nn.Module):
    """One scalar per token in, one out: a linear embedding, ``layers`` :class:`VideoBlock` s, a head."""

    def __init__(self, width: int, heads: int, D: int, grid: tuple[int, int, int], layers: int = 2):
        super().__init__()
        self.emb = nn.Linear(1, width)
        self.blocks = nn.ModuleList([VideoBlock(width, heads, D, grid) for _ in range(layers)])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


# --------------------------------------------------------------------------------------------
# diffusers


def diffusers_dit(layers: int, heads: int, head_dim: int, latent: int, patch: int, device, dtype):
    """diffusers' DiTTransformer2DModel (4 latent channels, 1000 classes), random weights, eval."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, num_layers=layers, sample_size=latent,
                                  patch_size=patch, num_embeds_ada_norm=1000)
    return model.to(device=device, dtype=dtype).eval()
