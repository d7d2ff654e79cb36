"""Session 7, experiment 2 (scratch, GPU): per-kernel times of the backward with and without the
dS cache (torch profiler, 95%, 32768x128 bf16).
    PYTHONPATH=. python docs/results/2026-12-01-h200/s7/exp2.py   # writes $OUT/exp2.json
(first run: pointer dS stores/loads, exp2.json; second: TMA, exp2_tma.json)
"""
import json
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import sparge_compile as sc
from sparge_compile.kernels import backward as bw
from sparge_compile.kernels import forward as fw


def main():
    out = os.environ.get("OUT", "out")
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    B, H, N, D = 1, 12, 32768, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale = D ** -0.5
    cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk")
    m = sc.predict_block_mask(q, k, config=cfg)
    num, idx = m.kv_num_blocks, m.kv_indices
    total = int(num.sum())
    o, lse = fw.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
    for name, var in {"nocache": dict(ds_cap=0), "full": dict(ds_cap=total),
                      "full_dkdv_w4s3": dict(ds_cap=total, dkdv_warps=4, dkdv_stages=3),
                      "full_dq_w8s2": dict(ds_cap=total, dq_warps=8, dq_stages=2),
                      "full_dq_w4s3": dict(ds_cap=total, dq_warps=4, dq_stages=3)}.items():
        fn = lambda: bw.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False, 128, 64, **var)  # noqa
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                cache.zero_()
                fn()
            torch.cuda.synchronize()
        rows = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
                t = getattr(e, "self_device_time_total", 0) / max(1, e.count)
                if t > 0:
                    rows[e.key[:60]] = round(t, 1)
        res[name] = rows
        print(name, rows, flush=True)
    json.dump(res, open(f"{out}/exp2_tma.json", "w"), indent=1)


if __name__ == "__main__":
    main()
