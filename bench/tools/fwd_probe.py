# ruff: noqa: E501, E731, E702
"""The compiled sparse forward (native path) at 32760 vs 32768 tokens, Wan's strided layout.
    PYTHONPATH=. python bench/tools/fwd_probe.py"""
import json
import os

import torch
import torch.nn.functional as F
import triton

import sparge_compile as sc

res = {}
for N in (32760, 32768):
    q, k, v = (torch.randn(1, N, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    torch._dynamo.reset()
    be = sc.backend(config=sc.SpargeConfig(topk=0.05, topp=0.0, min_seq_len=0))
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=be)
    ref = sc.sparse_attention(q, k, v, config=sc.SpargeConfig(topk=0.05, topp=0.0))
    res[f"N{N} rel diff compiled vs eager"] = ((fn(q, k, v).float() - ref.float()).norm() / ref.float().norm()).item()
    res[f"N{N} compiled total ms"] = triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=200)
    res[f"N{N} dense sdpa ms"] = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=100)
print(json.dumps(res, indent=0))
json.dump(res, open(f"{os.environ.get('OUT', '/tmp')}/fwd_probe2.json", "w"), indent=1)
