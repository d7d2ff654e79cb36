"""Session 7, experiment 5 (GPU machine): host (Python) cost of one eager forward call, by part,
at a small shape where the GPU waits on the host (B=1, H=12, N=1024, D=128, bf16, 95% top-k).
    PYTHONPATH=. python docs/results/2026-12-01-h200/s7/exp5.py   # writes $OUT/exp5.json, exp5_prof.txt
"""
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton

import sparge_compile as sc
from bench import common as C
from sparge_compile import kernels
from sparge_compile.kernels import forward as F_
from sparge_compile.kernels import mask as M

dev = torch.device("cuda")


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(host, 1)


def main():
    out = os.environ.get("OUT", "/tmp")
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}
    q, k, v = C.random_qkv(1, 12, int(os.environ.get("N", 1024)), 128, dev, torch.bfloat16, seed=0)
    cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk", min_seq_len=0)
    m = sc.predict_block_mask(q, k, config=cfg)
    num, idx = m.kv_num_blocks, m.kv_indices
    scale = 128 ** -0.5
    qb, kb = M.pool_qk_triton(q, k, 128, 64)
    scores = torch.empty((1, 12, qb.shape[2], kb.shape[2]), device=dev)
    parts = {
        "sparse_attention": lambda: sc.sparse_attention(q, k, v, config=cfg),
        "predict_block_mask": lambda: sc.predict_block_mask(q, k, config=cfg),
        "kernels.predict_mask": lambda: kernels.predict_mask(q, k, scale, False, 0.05, 0.0, "topk", 128, 64),
        "pool_qk_triton": lambda: M.pool_qk_triton(q, k, 128, 64),
        "select_triton": lambda: M.select_triton(scores, 1024, 1024, False, 0.05, 0.0, "topk", 128, 64),
        "attention_fwd_triton": lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64),
        "attention_fwd_triton_notma": lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64,
                                                                      use_tma=False),
        "fwd_fixed_w4s2": lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64,
                                                          num_warps=4, num_stages=2),
        "descriptor_x2": lambda: (F_.descriptor(k, 64), F_.descriptor(v, 64)),
        "torch_empty_x2": lambda: (torch.empty_like(q), torch.empty((1, 12, 1024), device=dev)),
    }
    for name, fn in parts.items():
        res[name] = per_call_us(fn)
        print(name, res[name], "us/call host", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        sc.sparse_attention(q, k, v, config=cfg)
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    open(os.path.join(out, "exp5_prof.txt"), "w").write(s.getvalue())
    print(s.getvalue()[:6000])
    json.dump(res, open(os.path.join(out, "exp5.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
