"""Where a model step's GPU time goes: torch.profiler over one compiled step, kernels grouped.

    PYTHONPATH=. python -m bench.tools.step_profile --model wan --target 0.95 --out $OUT

Builds the model of ``bench models`` (real config, random weights), compiles it block-wise with
inductor (dense) and with sparge at the target, profiles one step of each after warm-up and
writes step_profile.json: per variant the step's wall ms, summed GPU kernel ms, kernel launches,
and the top kernels by GPU time with their category (attention, mask prediction, matmul, other).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

import sparge_compile as sc
from bench import model_steps as M
from bench.common import allow_broken_torchvision

CATEGORIES = [("mask prediction", ("_pool", "_scores", "_select", "block_mask", "pool_blocks")),
              ("sparse attention", ("_fwd_kernel", "_attn_fwd", "sparse_attn", "_forward")),
              ("dense attention", ("flash", "fmha", "attention", "sdpa")),
              ("matmul", ("gemm", "sm90", "cutlass", "nvjet", "mm_", "_mm", "matmul", "scaled_mm")),
              ("copy / layout", ("copy", "clone", "transpose", "contiguous"))]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (inductor fused pointwise/norm)"


def profile_step(model, inp) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(**inp)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inp)
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inp)
            torch.cuda.synchronize()
    kernels, cats = defaultdict(lambda: [0.0, 0]), defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms = e.device_time / 1e3
            kernels[e.name][0] += ms
            kernels[e.name][1] += 1
            cats[category(e.name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(step_ms=wall, gpu_ms=sum(v[0] for v in kernels.values()),
                launches=sum(v[1] for v in kernels.values()), by_category=dict(cats),
                top=[dict(name=n[:120], ms=v[0], calls=v[1], category=category(n)) for n, v in top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan", choices=sorted(M.FULL))
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--out", default="/tmp/step_profile")
    a = p.parse_args()
    allow_broken_torchvision()
    dev, dt = torch.device("cuda"), torch.bfloat16
    kw = M.build(a.model, False, "cpu", torch.float32)[1]
    inp = M.inputs(a.model, kw, False, dev, dt)
    res = {}
    for variant in ("inductor", "sparge"):
        be = variant if variant == "inductor" else sc.backend(
            config=sc.SpargeConfig(topk=1 - a.target, topp=0.0, min_seq_len=1024))
        torch._dynamo.reset()
        model = M.compile_blockwise(M.build(a.model, False, dev, dt)[0], be)
        res[variant] = profile_step(model, inp)
        summary = {k: v for k, v in res[variant].items() if k != "top"}
        print(variant, json.dumps(summary, indent=1), flush=True)
        for row in res[variant]["top"][:12]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:5d}x {row['category']:<22} {row['name'][:70]}")
        del model
        torch.cuda.empty_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = dict(model=a.model, target=a.target, **res)
    (Path(a.out) / "step_profile.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
