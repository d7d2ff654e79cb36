"""The benchmarks' data: random tensors, synthetic attention inputs with structure, procedural
images and videos. No downloads.

* :func:`randn`, :func:`random_qkv`: seeded Gaussian tensors (``kernels``, ``e2e``)
* :func:`video_qkv`: video-like Q/K/V with local, sink, flat and mixed heads (``accuracy``)
* :func:`trained_qkv`: Q/K/V of a tiny video transformer trained on :func:`moving_blobs` (``accuracy``)
* :func:`smooth_dit_batch`: spatially smooth DiT-stack inputs (``calibrate``)
* :func:`shape_images`: coloured shapes on gradients, the class is the front shape (``distill``)
* :func:`shape_clips`: the same as clips (a shape crossing the frames) laid out as a mosaic (``quality``)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.models import VideoTransformer, rope_3d

SHAPE_CLASSES = 3   # shape_images' classes: circle, square, diamond

# --------------------------------------------------------------------------------------------
# Random tensors

def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, device, dtype, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(shape, generator=generator(device, seed), device=device, dtype=torch.float32)
    t = t.to(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def random_qkv(B: int, H: int, N: int, D: int, device, dtype, seed: int = 0,
               requires_grad: bool = False):
    return tuple(randn((B, H, N, D), device, dtype, seed + i, requires_grad) for i in range(3))


def structured_qkv(B: int, Hq: int, Hkv: int, N: int, D: int, device, dtype, seed: int = 0,
                   logit_std: float = 3.0, big: float = 4.0):
    """q, k, v shaped like a trained model's, the hard case for low-bit attention: q and k share a
    rank-4 component (per-token coefficients) plus noise and a per-token offset; channels 0-2 are
    ``big`` times larger (outlier channels); k has a bias over the sequence (what K smoothing
    removes); v has a per-channel mean. q is scaled so the scores scale·q·kᵀ have std logit_std."""
    g = generator(torch.device("cpu"), seed)
    basis = torch.randn(4, D, generator=g)

    def tokens(H):
        x = (torch.randn(B, H, N, 4, generator=g) @ basis + torch.randn(B, H, N, D, generator=g)
             + torch.randn(B, H, N, 1, generator=g))
        x[..., :3] *= big
        return x

    q, k = tokens(Hq), tokens(Hkv)
    s = (q[:, :, :512] @ k.repeat_interleave(Hq // Hkv, 1)[:, :, :512].transpose(-1, -2)).std() * D ** -0.5
    q = q * (logit_std / s)
    k = k + 2.0 * torch.randn(B, Hkv, 1, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g) + torch.randn(B, Hkv, 1, D, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


# --------------------------------------------------------------------------------------------
# Synthetic attention inputs (video-like tokens on a T x H x W grid)


def smooth_field(C_: int, T: int, Hh: int, W: int, sigma: tuple, gen, device) -> torch.Tensor:
    """(T*Hh*W, C_) Gaussian-smoothed noise, unit variance per channel: locally correlated."""
    x = torch.randn(1, C_, T, Hh, W, generator=gen, device=device)
    for axis, s in zip((2, 3, 4), sigma):
        if s <= 0:
            continue
        r = max(1, int(math.ceil(2.5 * s)))
        t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
        w = torch.exp(-0.5 * (t / s) ** 2)
        w = (w / w.sum()).view(1, 1, -1, 1, 1) if axis == 2 else (
            (w / w.sum()).view(1, 1, 1, -1, 1) if axis == 3 else (w / w.sum()).view(1, 1, 1, 1, -1))
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = r
        x = F.pad(x, pad, mode="replicate")
        x = F.conv3d(x, w.expand(C_, 1, *w.shape[2:]).contiguous(), groups=C_)
    x = x.reshape(C_, -1).t()
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def video_qkv(T: int, Hh: int, W: int, kinds: list[str], D: int, device, seed: int = 0,
              sink_tokens: int = 128):
    """Synthetic (q, k, v), each (1, H, T*Hh*W, D) float32, one head per entry of ``kinds``."""
    gen = generator(device, seed)
    N = T * Hh * W
    qs, ks, vs = [], [], []
    for kind in kinds:
        z = smooth_field(D, T, Hh, W, (1.0, 2.0, 2.0), gen, device)
        nq = torch.randn(N, D, generator=gen, device=device)
        nk = torch.randn(N, D, generator=gen, device=device)
        amp = {"local": 1.0, "sink": 0.3, "flat": 0.05, "mixed": 1.0}[kind]
        q = rope_3d(amp * (z + 0.5 * nq), T, Hh, W)
        k = rope_3d(z + 0.5 * nk, T, Hh, W)
        if kind in ("sink", "mixed"):
            u = torch.randn(D, generator=gen, device=device)
            u = u / u.norm()
            ns = min(sink_tokens, N)
            # sink logit L for every query: ns * e^L ~ (1.5 | 0.3) * N  => sink holds ~60% | ~25%
            share = 1.5 if kind == "sink" else 0.3
            L = math.log(share * N / ns)
            k[:ns] = k[:ns] * 0.2 + math.sqrt(D) * u
            q = q + L * u
        v = smooth_field(D, T, Hh, W, (1.0, 1.5, 1.5), gen, device) + 0.3 * torch.randn(
            N, D, generator=gen, device=device)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return tuple(torch.stack(x)[None].contiguous() for x in (qs, ks, vs))


def smooth_dit_batch(dim: int, grid: tuple[int, int, int], text_len: int, device, dtype, seed: int):
    """(x, e, ctx) for a DiT stack: spatially smooth tokens (1, T*H*W, dim) plus noise, adaLN
    input (1, 6, dim), text tokens (1, text_len, dim)."""
    gen = generator(device, seed)
    x = smooth_field(dim, *grid, (1.0, 2.0, 2.0), gen, device)
    x = x + 0.3 * torch.randn(x.shape, generator=gen, device=device)
    e = 0.1 * torch.randn(1, 6, dim, generator=gen, device=device)
    ctx = torch.randn(1, text_len, dim, generator=gen, device=device)
    return tuple(t.to(dtype) for t in (x[None], e, ctx))


# --------------------------------------------------------------------------------------------
# Procedural training data and a trained source


def moving_blobs(T: int, Hh: int, W: int, bs: int, device) -> torch.Tensor:
    """(bs, T*Hh*W, 1) videos of 3 Gaussian blobs moving at constant velocity (wrapping around),
    one scalar per pixel; the seed is drawn from torch's global generator."""
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,)).item()))
    tt = torch.arange(T, device=device, dtype=torch.float32).view(1, 1, T, 1, 1)
    yy = torch.arange(Hh, device=device, dtype=torch.float32).view(1, 1, 1, Hh, 1)
    xx = torch.arange(W, device=device, dtype=torch.float32).view(1, 1, 1, 1, W)
    nb = 3
    c = torch.rand(bs, nb, 2, generator=g, device=device) * torch.tensor([Hh, W], device=device)
    vel = (torch.rand(bs, nb, 2, generator=g, device=device) - 0.5) * 2.0
    r = 1.0 + torch.rand(bs, nb, 1, 1, 1, generator=g, device=device) * 2.0
    cy = (c[..., 0].view(bs, nb, 1, 1, 1) + vel[..., 0].view(bs, nb, 1, 1, 1) * tt) % Hh
    cx = (c[..., 1].view(bs, nb, 1, 1, 1) + vel[..., 1].view(bs, nb, 1, 1, 1) * tt) % W
    img = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2)).sum(1)  # (bs, T, Hh, W)
    return img.reshape(bs, T * Hh * W, 1)


def trained_qkv(T: int, Hh: int, W: int, D: int, heads: int, device, steps: int, seed: int = 0,
                width: int | None = None, layers: int = 2):
    """Q/K/V of the last layer of a tiny video transformer trained on moving blobs.

    The task: predict frame t+1 of a video of Gaussian blobs moving at constant velocity from
    frames <= t, one token per pixel, 3-D RoPE. After ``steps`` AdamW steps the attention is
    whatever training made of it. Returns (q, k, v) as (1, heads, T*Hh*W, D) float32 and the
    final training loss.
    """
    torch.manual_seed(seed)
    width = width or heads * D
    model = VideoTransformer(width, heads, D, (T, Hh, W), layers).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4)
    frame = Hh * W
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = moving_blobs(T, Hh, W, 4, device)
        pred = model(x)[:, :-frame]
        loss = F.mse_loss(pred, x[:, frame:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model(moving_blobs(T, Hh, W, 1, device))
    q, k, v = (t.float().contiguous() for t in model.blocks[-1].captured)
    return (q, k, v), float(loss)


def shape_images(n: int, size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB images in [-1, 1] (n, 3, size, size) and their class (n,): the front shape's kind
    (0 circle, 1 square, 2 diamond). A gradient background, a smaller shape behind, soft edges."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    ax = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = ax.view(1, -1, 1), ax.view(1, 1, -1)
    theta = rand(n) * 2 * math.pi
    g = (torch.cos(theta).view(-1, 1, 1) * (xx - 0.5) + torch.sin(theta).view(-1, 1, 1) * (yy - 0.5)) + 0.5
    c1, c2 = rand(n, 3) * 1.2 - 0.6, rand(n, 3) * 1.2 - 0.6
    img = c1.view(n, 3, 1, 1) + (c2 - c1).view(n, 3, 1, 1) * g.clamp(0, 1).unsqueeze(1)

    def shape(kind, r):
        cx, cy = r + rand(n) * (1 - 2 * r), r + rand(n) * (1 - 2 * r)
        dx, dy = (xx - cx.view(-1, 1, 1)).abs(), (yy - cy.view(-1, 1, 1)).abs()
        d = torch.where(kind.view(-1, 1, 1) == 0, torch.sqrt(dx ** 2 + dy ** 2),
                        torch.where(kind.view(-1, 1, 1) == 1, torch.maximum(dx, dy), (dx + dy) / 1.3))
        m = torch.sigmoid((r.view(-1, 1, 1) - d) * size * 1.5).unsqueeze(1)
        col = (rand(n, 3) * 2 - 1).sign() * (0.5 + 0.5 * rand(n, 3))   # saturated colours
        return m, col.view(n, 3, 1, 1)

    back = torch.randint(0, SHAPE_CLASSES, (n,), generator=gen, device=device)
    m, col = shape(back, 0.08 + rand(n) * 0.1)
    img = img * (1 - m) + col * m
    y = torch.randint(0, SHAPE_CLASSES, (n,), generator=gen, device=device)
    m, col = shape(y, 0.15 + rand(n) * 0.15)
    img = img * (1 - m) + col * m
    return img.clamp(-1, 1), y


def shape_clips(n: int, frames: int, size: int, gen: torch.Generator,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """n video-like clips as mosaic images (n, 3, g·size, g·size), g = sqrt(frames), frame t at
    tile (t // g, t % g), values in [-1, 1], and their class (n,): the moving shape's kind (0 circle,
    1 square, 2 diamond). Per clip: a gradient background and a smaller still shape, fixed; the
    front shape crosses the clip in a straight line (its centre moves from one random point to
    another over the frames). One token per pixel at patch 1: attention must find the same shape
    in every tile, a structure as long-range as a video's."""
    g = math.isqrt(frames)
    if g * g != frames:
        raise ValueError(f"frames must be a square number (a g x g mosaic), got {frames}")

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    ax = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = ax.view(1, 1, -1, 1), ax.view(1, 1, 1, -1)            # (1, 1, S, 1), (1, 1, 1, S)
    tt = torch.linspace(0, 1, frames, device=device).view(1, frames, 1, 1)
    theta = rand(n) * 2 * math.pi
    cos, sin = torch.cos(theta).view(-1, 1, 1, 1), torch.sin(theta).view(-1, 1, 1, 1)
    grad = cos * (xx - 0.5) + sin * (yy - 0.5) + 0.5
    c1, c2 = rand(n, 3) * 1.2 - 0.6, rand(n, 3) * 1.2 - 0.6
    img = c1.view(n, 1, 3, 1, 1) + (c2 - c1).view(n, 1, 3, 1, 1) * grad.clamp(0, 1).unsqueeze(2)

    def shape(kind, r, moving):
        lo, span = r.view(-1, 1, 1, 1), (1 - 2 * r).view(-1, 1, 1, 1)
        cx0, cy0, cx1, cy1 = (lo + rand(n).view(-1, 1, 1, 1) * span for _ in range(4))
        w = tt if moving else torch.zeros_like(tt)
        dx, dy = (xx - (cx0 + (cx1 - cx0) * w)).abs(), (yy - (cy0 + (cy1 - cy0) * w)).abs()
        k = kind.view(-1, 1, 1, 1)
        d = torch.where(k == 0, torch.sqrt(dx ** 2 + dy ** 2), torch.where(k == 1, torch.maximum(dx, dy),
                                                                           (dx + dy) / 1.3))
        m = torch.sigmoid((lo - d) * size * 1.5).unsqueeze(2)          # (n, F, 1, S, S)
        col = (rand(n, 3) * 2 - 1).sign() * (0.5 + 0.5 * rand(n, 3))
        return m, col.view(n, 1, 3, 1, 1)

    m, col = shape(torch.randint(0, SHAPE_CLASSES, (n,), generator=gen, device=device), 0.08 + rand(n) * 0.1,
                   moving=False)
    img = img * (1 - m) + col * m
    y = torch.randint(0, SHAPE_CLASSES, (n,), generator=gen, device=device)
    m, col = shape(y, 0.12 + rand(n) * 0.1, moving=True)
    img = (img * (1 - m) + col * m).clamp(-1, 1)                          # (n, F, 3, S, S)
    return img.view(n, g, g, 3, size, size).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, g * size, g * size), y
