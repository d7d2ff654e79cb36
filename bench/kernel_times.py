"""GPU kernel times of one call, by kernel name and category (torch.profiler, CUDA activity).

Read by ``bench models`` (the dense attention's own GPU time, for the limit the mask allows) and
``bench.tools.step_profile`` (where a step's time goes). Inductor names its fused kernels after
the ops they hold, so a norm or RoPE kernel that feeds SDPA carries "scaled_dot_product" in its
name: kernels named ``triton_*`` never count as dense attention.
"""
from __future__ import annotations

from collections import defaultdict

import torch

CATEGORIES = [("mask prediction", ("_pool", "_scores", "_select", "block_mask", "pool_blocks")),
              ("sparse attention", ("_fwd_kernel", "_attn_fwd", "sparse_attn", "_forward")),
              ("dense attention", ("flash", "fmha", "attention", "sdpa")),
              ("matmul", ("gemm", "sm90", "cutlass", "nvjet", "mm_", "_mm", "matmul", "scaled_mm")),
              ("copy / layout", ("copy", "clone", "transpose", "contiguous"))]
OTHER = "other (inductor fused pointwise/norm)"


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            if cat == "dense attention" and low.startswith("triton_"):
                return OTHER   # an inductor kernel feeding SDPA (its name lists the ops it fuses)
            return cat
    return OTHER


def kernel_ms(fn) -> dict[str, list]:
    """name -> [GPU ms, launches] of the CUDA kernels ``fn()`` runs (one profiled call, synced)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name][0] += e.device_time / 1e3
            kernels[e.name][1] += 1
    return dict(kernels)


def by_category(kernels: dict[str, list]) -> dict[str, float]:
    cats = defaultdict(float)
    for name, (ms, _) in kernels.items():
        cats[category(name)] += ms
    return dict(cats)


def dense_attention_ms(fn) -> float:
    """The GPU ms of the dense attention kernels (SDPA's flash / cuDNN / efficient ones) in ``fn()``."""
    return by_category(kernel_ms(fn)).get("dense attention", 0.0)
