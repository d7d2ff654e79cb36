"""Flow-matching helpers for distilling a diffusion model: timesteps, noised inputs, Euler sampling.

Convention (rectified flow, as in SD3 / Wan): ``x_t = (1 - t) * x0 + t * eps``, so ``t = 0`` is
data and ``t = 1`` is pure noise; the model predicts the velocity ``v = dx_t/dt = eps - x0``.
The distillation target is the teacher's velocity, so the data only has to supply ``x_t``.

    import sparge_compile as sc
    inputs = sc.flow_matching_inputs(latents, cond, batch_size=4)     # callable(step) -> (x_t, t, cond)
    result = sc.distill(dit, inputs, steps=500, config=cfg)

``t`` is drawn logit-normal, ``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (SD3's
"logit-normal" sampling, which the flow-matching video models that SpargeAttention2 distills
train with), optionally moved towards noise with the SD3/Wan shift ``t' = s t / (1 + (s - 1) t)``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["logit_normal_timesteps", "add_noise", "flow_matching_inputs", "euler_sample"]


def logit_normal_timesteps(n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                           generator: torch.Generator | None = None, device=None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` timesteps in (0, 1): ``sigmoid(mean + std * N(0, 1))``, then the optional shift.

    shift > 1 moves the mass towards t = 1 (noise), as SD3/Wan do for large resolutions.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    gen_device = generator.device if generator is not None else device
    z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float32)
    t = torch.sigmoid(mean + std * z)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=dtype)


def add_noise(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``x_t = (1 - t) * x0 + t * noise`` with ``t`` of shape (B,) broadcast over the sample."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def _index(x: Any, idx: Tensor) -> Any:
    """Select rows ``idx`` of a tensor, or of every tensor in a tuple/list/dict (None stays None)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, (tuple, list)):
        return type(x)(_index(v, idx) for v in x)
    if isinstance(x, dict):
        return {k: _index(v, idx) for k, v in x.items()}
    raise TypeError(f"cond must be a tensor, a tuple/list/dict of tensors or None, got {type(x).__name__}")


def flow_matching_inputs(latents: Tensor | None = None, cond: Any = None, batch_size: int = 4, *,
                         teacher: Callable | None = None, noise_shape: Sequence[int] | None = None,
                         num_samples: int | None = None, sample_steps: int = 25,
                         t_mean: float = 0.0, t_std: float = 1.0, shift: float = 1.0,
                         timestep_scale: float = 1.0, keys: Sequence[str] | None = None,
                         seed: int = 0, device=None) -> Callable[[int], Any]:
    """Model inputs for :func:`sparge_compile.distill`: a callable ``step -> (x_t, t, cond)``.

    Data, one of:
      * ``latents``: a data batch ``(N, ...)`` of clean samples x0 (images, video latents);
      * ``teacher`` + ``noise_shape``: x0 are the teacher's own samples, ``num_samples`` of them
        drawn once with :func:`euler_sample` (``sample_steps`` Euler steps) from seeded noise
        ``(num_samples, *noise_shape)``; with ``cond`` its rows condition the samples.

    cond: per-sample conditions aligned with the rows of x0 (a tensor, a tuple/list/dict of
        tensors, or None for an unconditional model); each batch takes the same rows.
    batch_size: samples per call (drawn with replacement).
    t_mean, t_std, shift: the logit-normal timestep law (see :func:`logit_normal_timesteps`).
    timestep_scale: the model receives ``t * timestep_scale`` (1000 for models trained on
        timesteps in [0, 1000], such as Wan; 1 for models that take t in [0, 1]).
    keys: return a dict ``{keys[0]: x_t, keys[1]: t, keys[2]: cond}`` (called as
        ``model(**batch)``) instead of a tuple, e.g. ``("hidden_states", "timestep",
        "encoder_hidden_states")`` for a diffusers transformer.

    Deterministic: batch ``step`` depends only on ``(seed, step)``, so a resumed
    :func:`distill` sees exactly the batches of an uninterrupted run. Without ``cond`` the
    tuple is ``(x_t, t)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (latents is None) == (teacher is None):
        raise ValueError("pass exactly one of latents= (a data batch) or teacher= (sample x0 from it)")
    if teacher is not None:
        latents = _teacher_samples(teacher, cond, noise_shape, num_samples, sample_steps, timestep_scale,
                                   seed, device)
    if not isinstance(latents, Tensor) or latents.dim() < 2:
        raise TypeError("latents must be a tensor of clean samples with a leading batch axis (N, ...)")
    n = latents.shape[0]
    if keys is not None and len(keys) != (3 if cond is not None else 2):
        raise ValueError(f"keys must name x_t, t{' and cond' if cond is not None else ''}, got {keys!r}")
    latents = latents.detach()
    out_device = device if device is not None else latents.device

    def draw(step: int):
        g = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(step))
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x0 = latents[idx.to(latents.device)].to(out_device)
        t = logit_normal_timesteps(batch_size, mean=t_mean, std=t_std, shift=shift, generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(device=out_device, dtype=x0.dtype)
        t = t.to(out_device)
        x_t = add_noise(x0, t, eps)
        ts = (t * timestep_scale).to(x0.dtype if x0.is_floating_point() else torch.float32)
        items = [x_t, ts] if cond is None else [x_t, ts, _index(cond, idx)]
        if keys is not None:
            return dict(zip(keys, items))
        return tuple(items)

    return draw


def _teacher_samples(teacher, cond, noise_shape, num_samples, steps, timestep_scale, seed, device):
    """x0 for flow_matching_inputs(teacher=...): the teacher's samples from seeded noise."""
    if noise_shape is None or num_samples is None:
        raise ValueError("teacher= needs noise_shape= (one sample's shape) and num_samples=")
    dev = device if device is not None else _module_device(teacher)
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    noise = torch.randn((num_samples, *noise_shape), generator=gen).to(dev)
    c = _index(cond, torch.arange(num_samples)) if cond is not None else None
    return euler_sample(teacher, noise, c, steps=steps, timestep_scale=timestep_scale)


def _module_device(m) -> torch.device:
    for p in getattr(m, "parameters", lambda: iter(()))():
        return p.device
    return torch.device("cpu")


def _call(model: Callable, x: Tensor, t: Tensor, cond: Any) -> Tensor:
    out = model(x, t) if cond is None else model(x, t, cond)
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):  # diffusers output classes
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the model must return the velocity tensor, got {type(out).__name__}")


@torch.no_grad()
def euler_sample(model: Callable, noise: Tensor, cond: Any = None, *, steps: int = 25,
                 timestep_scale: float = 1.0, shift: float = 1.0) -> Tensor:
    """Integrate ``dx/dt = model(x, t, cond)`` from t = 1 (``noise``) to t = 0 with Euler steps.

    The model is called as ``model(x, t * timestep_scale, cond)`` (``model(x, t)`` when cond is
    None) with ``t`` of shape (B,). ``shift`` warps the uniform time grid as in
    :func:`logit_normal_timesteps`. Returns the sample x0 (same shape and dtype as noise).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        ts = shift * ts / (1 + (shift - 1) * ts)
    x = noise
    b = noise.shape[0]
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        tt = torch.full((b,), t * timestep_scale, device=noise.device, dtype=noise.dtype)
        v = _call(model, x, tt, cond)
        x = x + (t_next - t) * v.to(x.dtype)
    return x
