"""Session 6, experiment 7 (GPU): why sparge total (0.786 ms) > predict GPU (0.100) + kernel
alone (0.625) at 95%, 32768x128: per-kernel GPU times under the profiler in both paths, and
do_bench of the pieces composed. Writes $OUT/exp7.json."""
from __future__ import annotations

import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

import sparge_compile as sc
from bench import common as C
from bench.kernels import tune_config

dev = torch.device("cuda")
q, k, v = C.random_qkv(1, 12, 32768, 128, dev, torch.bfloat16, seed=0)
base = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=128, block_k=64, mode="topk", min_seq_len=0)
cfg, mask = tune_config(q, k, 0.95, base)
res: dict = {}
flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=dev)


def total():
    return sc.sparse_attention(q, k, v, config=cfg)


def alone():
    return sc.sparse_attention(q, k, v, block_mask=mask)


def pred():
    return sc.predict_block_mask(q, k, config=cfg)


def composed():
    m = sc.predict_block_mask(q, k, config=cfg)
    return sc.sparse_attention(q, k, v, block_mask=m)


for name, fn in (("total", total), ("alone", alone), ("predict", pred), ("composed", composed)):
    fn()
    res[f"{name}_ms"] = C.time_fn(fn, dev)
    res[f"{name}_graph_ms"] = C.guarded(lambda: C.time_graph(fn, dev), res.setdefault("errors", {}), name)
for name, fn in (("total", total), ("alone", alone)):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.count:
            rows[e.key[:60]] = dict(count=e.count, avg_us=t / e.count)
    res[f"profile_{name}"] = rows
print(json.dumps(res, indent=1))
with open(os.path.join(os.environ.get("OUT", "/tmp"), "exp7.json"), "w") as f:
    json.dump(res, f, indent=1)
