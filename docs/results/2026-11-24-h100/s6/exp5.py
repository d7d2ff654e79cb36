"""Session 6, experiment 5 (GPU): dK/dV query-slice height and warps at 95%, 32768x128 bf16
(128-row slices on 8 warps: one slice per kept query block). Writes $OUT/exp5.json."""
from __future__ import annotations

import json
import os

import torch

import sparge_compile as sc
from bench import common as C
from bench.kernels import tune_config
from sparge_compile.kernels import backward as B_
from sparge_compile.kernels import forward as F_

dev = torch.device("cuda")
res: dict = {}
q, k, v = C.random_qkv(1, 12, 32768, 128, dev, torch.bfloat16, seed=0)
dout = torch.randn_like(q)
base = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=128, block_k=64, mode="topk", min_seq_len=0)
cfg, mask = tune_config(q, k, 0.95, base)
num, idx = mask.kv_num_blocks, mask.kv_indices
scale = 128 ** -0.5
out, lse = F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64, num_warps=4, num_stages=2)
ref = B_.attention_bwd_triton(dout, q, k, v, out, lse, num, idx, scale, False, 128, 64,
                              dkdv_warps=4, dkdv_stages=2)
for var in (dict(dkdv_warps=4, dkdv_stages=2), dict(sub_m=128, dkdv_warps=8, dkdv_stages=2),
            dict(sub_m=128, dkdv_warps=8, dkdv_stages=3), dict(sub_m=128, dkdv_warps=4, dkdv_stages=2),
            dict(sub_m=32, dkdv_warps=4, dkdv_stages=3), dict(dkdv_warps=8, dkdv_stages=2),
            dict(dkdv_warps=4, dkdv_stages=3)):
    name = "_".join(f"{a}{b}" for a, b in var.items())
    try:
        got = B_.attention_bwd_triton(dout, q, k, v, out, lse, num, idx, scale, False, 128, 64, **var)
        err = max(C.rel_l2(a.float(), b.float()) for a, b in zip(got, ref))
        ms = C.time_fn(lambda: B_.attention_bwd_triton(dout, q, k, v, out, lse, num, idx, scale, False, 128, 64,
                                                       **var), dev)
        res[name] = dict(ms=ms, rel_diff_vs_default=err)
    except Exception as e:  # noqa: BLE001
        res[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(name, res[name], flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "exp5.json"), "w") as f:
    json.dump(res, f, indent=1)
