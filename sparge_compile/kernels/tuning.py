"""Launch settings of the attention kernels: autotuned on CUDA, fixed defaults elsewhere.

On a CUDA device each kernel is autotuned (``triton.autotune``) over a small set of
(num_warps, num_stages) pairs, once per process and per key: the launch's compile-time
settings (head dim, mask block shape, causal, TMA, whole tiles), the dtype and the device.
The sequence length is not in the key, so a new length never re-tunes. The first call per key
with a grid of at least ``MIN_TUNE_PER_SM`` programs per SM (the 1.3B video shape, 32768 tokens
x 12 heads, has 23 in the forward; 8192 tokens has 6) compiles and times every config
(forward + backward at 32768 tokens, D = 128: ~10 s on the H100) and keeps the fastest, or the
fixed default where that timed within ``TIE`` of it; later calls launch the pick directly.
Smaller launches use the fixed defaults and record no pick: they are short or launch-bound
(their timings do not rank the configs), and a pick timed on one would be kept for the large
shapes (a 4-head, 4096-token first call picked 8 warps, 3 stages for the
forward: 0.88 ms at 32768 tokens vs 0.68 with the 4-warp default, H100).
``SPARGE_AUTOTUNE=0`` (or ``tuning.AUTOTUNE = False``) uses the fixed defaults instead (measured
on the H100; they are in each set), as do the interpreter and explicit settings passed by the
kernel-tuning benchmark. A padded head dim (D = 72 runs in a 128-wide tile) is keyed and given
defaults by its tile: the tile, not D, sets registers and shared memory.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import torch
import triton

AUTOTUNE = os.environ.get("SPARGE_AUTOTUNE", "1") == "1"

# (num_warps, num_stages)
FWD_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3))
DQ_CONFIGS = ((8, 3), (8, 2), (4, 2), (4, 3))
DKDV_CONFIGS = ((4, 2), (4, 3), (8, 2))
KEY = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "IS_CAUSAL", "USE_TMA"]
MIN_TUNE_PER_SM = 16  # tune only on grids of at least this many programs per SM
TIE = 0.05  # the fixed default stays unless a config times this much faster


def head_dim_tile(D: int) -> int:
    """The head-dim tile of every kernel: D rounded up to a power of two, at least 16 (tl.dot's
    smallest K). Columns past D are loaded as zeros and never stored; at a power-of-two D the
    kernels take their unmasked path (the tile is D)."""
    return max(16, triton.next_power_of_2(D))


@functools.lru_cache(maxsize=None)
def _shared_memory(index: int) -> int:
    """Bytes of shared memory a program may use on CUDA device ``index`` (Triton's own limit)."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


# Shared-memory bytes a program may use, where set (the tests set it to run the split tiles of
# fit_tiles on the CPU); None: the GPU's own limit (none on the CPU).
SMEM_LIMIT: int | None = None


def _smem_limit(x: torch.Tensor) -> int | None:
    if SMEM_LIMIT is not None:
        return SMEM_LIMIT
    return _shared_memory(x.device.index) - 1024 if x.is_cuda else None  # a little for Triton's scratch


def fit_stages(stages: int, fixed_bytes: int, stage_bytes: int, x: torch.Tensor) -> int:
    """The most pipelining stages, at most ``stages`` and at least 1, whose buffers fit the shared
    memory of x's GPU: ``fixed_bytes`` held for the whole program plus ``stage_bytes`` a stage.
    At bf16 and D <= 128 the H100 defaults fit as they are; wide rows (an fp32 tile of 128, a
    bf16 tile of 256, so also D = 160) get fewer stages instead of failing to launch."""
    limit = _smem_limit(x)
    while limit is not None and stages > 1 and fixed_bytes + stages * stage_bytes > limit:
        stages -= 1
    return stages


def wide_exact_fp32(x: torch.Tensor, block_d: int) -> bool:
    """fp32 inputs on CUDA get exact (ieee) products, which Triton emits as FMA loops: at a head-dim
    tile of 256 a kernel did not finish compiling within minutes (H200, 2026-12-04). Such calls
    take the PyTorch path (cuBLAS matmuls) instead."""
    return x.is_cuda and x.dtype == torch.float32 and block_d >= 256


def fit_tiles(block_m: int, block_n: int, fixed_row: int, stage_row: int, x: torch.Tensor):
    """(tile_m, tile_n) or None: the tiles a kernel runs a (block_m, block_n) mask block in, where
    it holds ``fixed_row`` bytes per tile_m row and ``stage_row`` bytes per tile_n row (one
    stage). The whole block where it fits (every bf16 shape up to D = 128); else the larger part
    halved (keys first), down to 16 each: an fp32 128 x 128 block at D = 128 did not fit the
    H200's 227 KiB even in one stage. None: not even 16 x 16 fits (the caller's fallback)."""
    limit = _smem_limit(x)
    tm, tn = block_m, block_n
    while limit is not None and tm * fixed_row + tn * stage_row > limit:
        if tn > 16 and (tn * stage_row >= tm * fixed_row or tm <= 16):
            tn //= 2
        elif tm > 16:
            tm //= 2
        else:
            return None
    return tm, tn


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_PICKED: dict = {}  # (kernel name, launch meta, dtype, device) -> triton.Config


def autotuned(kernel, pairs, extra_key=()):
    """``kernel`` wrapped in ``triton.autotune`` over ``pairs``, keyed as the module says."""
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]
    return triton.autotune(configs=configs, key=KEY + list(extra_key))(kernel)


_NATIVE = threading.local()   # .on: launches go through torch.library.wrap_triton (see native())


@contextlib.contextmanager
def native():
    """Within: every launch is recorded through ``torch.library.wrap_triton``, so a
    ``triton_op`` traced by torch.compile puts the launch itself into Inductor's generated code
    (no Python op at run time). No autotuner runs there (it cannot time fake tensors): the
    process's earlier pick for the key, else the fixed default."""
    prev = getattr(_NATIVE, "on", False)
    _NATIVE.on = True
    try:
        yield
    finally:
        _NATIVE.on = prev


def is_native() -> bool:
    return getattr(_NATIVE, "on", False)


def run(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, through ``wrap_triton`` inside :func:`native`."""
    if is_native():
        from torch.library import wrap_triton

        return wrap_triton(kernel)[grid](*args, **meta)
    return kernel[grid](*args, **meta)


def launch(kernel, tuner, grid, x, args, meta, warps=None, stages=None, fixed=(4, 2)):
    """Launch ``kernel`` on ``grid``. On CUDA (unless AUTOTUNE is off or warps/stages are given)
    the first launch per key on a large enough grid goes through ``tuner`` (timing every
    config); later ones launch the picked config directly, without the autotuner's per-call
    Python work (it showed in host-bound calls). Otherwise: the given warps/stages, or
    ``fixed``."""
    if AUTOTUNE and x.is_cuda and warps is None and stages is None:
        key = (kernel.__name__, tuple(meta.items()), x.dtype, x.device)
        cfg = _PICKED.get(key)
        if cfg is not None:
            run(kernel, grid, *args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        if not is_native() and math.prod(grid) >= MIN_TUNE_PER_SM * _sm_count(x.device):
            tuner[grid](*args, **meta)
            _PICKED[key] = _prefer_fixed(tuner, fixed)
            return
    run(kernel, grid, *args, **meta, num_warps=warps or fixed[0], num_stages=stages or fixed[1])


def _prefer_fixed(tuner, fixed):
    """The tuner's pick, unless the fixed default timed within ``TIE`` of it: the timing is of
    one call's mask, and near-ties flip with it (tuned on a dense mask at 32768x128, the
    forward picked 3 stages over the default 2 by noise: 0.755 vs 0.68 ms at 95% sparsity)."""
    best = tuner.best_config
    timings = getattr(tuner, "configs_timings", None) or {}
    default = next((c for c in timings if (c.num_warps, c.num_stages) == tuple(fixed)), None)
    if default is None or best not in timings:
        return best

    def ms(cfg):  # the autotuner stores [median, p20, p80]
        t = timings[cfg]
        return t[0] if isinstance(t, (list, tuple)) else t

    return default if ms(default) <= (1 + TIE) * ms(best) else best


def best_configs() -> dict:
    """{kernel: {launch key: "w<warps> s<stages>"}} picked so far in this process."""
    out: dict = {}
    for (name, meta, dtype, device), cfg in _PICKED.items():
        key = ", ".join(f"{k}={v}" for k, v in meta if k != "PREC") + f", {str(dtype).replace('torch.', '')}"
        out.setdefault(name, {})[key] = f"w{cfg.num_warps} s{cfg.num_stages}"
    return out


__all__ = ["AUTOTUNE", "autotuned", "launch", "native", "is_native", "run", "best_configs", "fit_stages",
           "fit_tiles", "head_dim_tile", "wide_exact_fp32"]
