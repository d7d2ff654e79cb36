# ruff: noqa: E501, E731, E702
"""The sparse forward at 32768 vs 32760 tokens (a partial last key block), contiguous vs Wan's
strided layout, pointer vs TMA loads, three (warps, stages) settings, and the compiled total.
    PYTHONPATH=. python bench/tools/fwd_configs_probe.py   (H200: docs/results/2026-12-02-h200-fwd-stages)"""

import json
import os

import torch
import torch.nn.functional as F
import triton

import sparge_compile as sc
from sparge_compile.kernels import forward as FW

res = {}


def mask(q, k):
    m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=0.05, topp=0.0))
    return m


for N in (32768, 32760):
    for layout in ("contig", "strided"):
        g = torch.Generator(device="cuda").manual_seed(0)
        if layout == "contig":
            q, k, v = (
                torch.randn(1, 12, N, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
            )
        else:
            q, k, v = (
                torch.randn(1, N, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                for _ in range(3)
            )
        m = mask(q, k)
        num, idx = m.kv_num_blocks, m.kv_indices
        for tma in (False, True):
            for w, s in ((4, 2), (4, 3), (8, 2)):
                f = lambda: FW.attention_fwd_triton(
                    q,
                    k,
                    v,
                    num,
                    idx,
                    128**-0.5,
                    False,
                    m.block_q,
                    m.block_k,
                    num_warps=w,
                    num_stages=s,
                    use_tma=tma,
                )
                try:
                    res[f"N{N} {layout} tma{int(tma)} w{w}s{s}"] = triton.testing.do_bench(
                        f, warmup=50, rep=200
                    )
                except Exception as e:
                    res[f"N{N} {layout} tma{int(tma)} w{w}s{s}"] = repr(e)[:100]
        be = sc.backend(config=sc.SpargeConfig(topk=0.05, topp=0.0, min_seq_len=0))
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=be)
        res[f"N{N} {layout} compiled sparge total"] = triton.testing.do_bench(
            lambda: fn(q, k, v), warmup=50, rep=200
        )
        res[f"N{N} {layout} sparsity {m.block_q}x{m.block_k}"] = m.sparsity()
        print(
            json.dumps({k_: v_ for k_, v_ in res.items() if k_.startswith(f"N{N} {layout}")}, indent=0),
            flush=True,
        )
out = os.environ.get("OUT", "/tmp")
json.dump(res, open(f"{out}/fwd_probe.json", "w"), indent=1)
