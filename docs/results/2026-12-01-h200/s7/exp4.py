"""Session 7, experiment 4 (GPU, H200): pooling warps by shape, score-kernel tiles/warps,
selection rows/warps, forward warps/stages, at 95% top-k, bf16.
    PYTHONPATH=. python docs/results/2026-12-01-h200/s7/exp4.py   # writes $OUT/exp4.json
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from exp3 import pool_warps  # noqa: E402

import sparge_compile as sc  # noqa: E402
from bench import common as C  # noqa: E402
from sparge_compile.kernels import forward as F_  # noqa: E402
from sparge_compile.kernels import mask as M  # noqa: E402
from sparge_compile.reference import cdiv  # noqa: E402

dev = torch.device("cuda")


def main():
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    g = lambda fn: round(C.time_graph(fn, dev), 4)  # noqa: E731
    for N, D in ((32768, 128), (32768, 64), (75600, 128), (75600, 64)):
        r = res[f"{N}x{D}"] = {}
        q, k, v = C.random_qkv(1, 12, N, D, dev, torch.bfloat16, seed=0)
        for w in (1, 2, 4):
            r[f"pool_w{w}"] = g(lambda: pool_warps(q, k, w))
        print(N, D, r, flush=True)
        if (N, D) != (32768, 128):
            continue
        qb, kb = M.pool_qk_triton(q, k, 128, 64)
        nq, nk = cdiv(N, 128), cdiv(N, 64)
        scores = torch.empty((1, 12, nq, nk), device=dev)
        ref = None
        for tile in (32, 64, 128):
            for w in (1, 2, 4, 8):
                try:
                    fn = lambda: M._score_kernel[(cdiv(nq, tile), cdiv(nk, tile), 12)](  # noqa: E731
                        qb, kb, scores, 0.1, 12, 1, nq, nk, TILE=tile, BLOCK_D=128, PREC="tf32x3", num_warps=w)
                    fn()
                    if ref is None:
                        ref = scores.clone()
                    r[f"score_t{tile}_w{w}"] = dict(ms=g(fn), same=bool(torch.equal(scores, ref)))
                except Exception as e:  # noqa: BLE001
                    r[f"score_t{tile}_w{w}"] = f"{type(e).__name__}: {str(e)[:120]}"
        ref = M.select_triton(scores, N, N, False, 0.05, 0.9, "hybrid", 128, 64)
        for bm in (1, 2, 4):
            for w in (1, 2, 4):
                for mode in ("topk", "hybrid"):
                    try:
                        fn = lambda: M.select_triton(scores, N, N, False, 0.05, 0.9, mode, 128, 64,  # noqa: E731
                                                     block_m=bm, num_warps=w)
                        out = fn()
                        same = mode == "topk" or all(torch.equal(a, b) for a, b in zip(out, ref))
                        r[f"select_{mode}_bm{bm}_w{w}"] = dict(ms=g(fn), same=same)
                    except Exception as e:  # noqa: BLE001
                        r[f"select_{mode}_bm{bm}_w{w}"] = f"{type(e).__name__}: {str(e)[:120]}"
        cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk")
        m = sc.predict_block_mask(q, k, config=cfg)
        num, idx = m.kv_num_blocks, m.kv_indices
        for w, s in ((4, 2), (4, 3), (8, 2), (8, 3)):
            fn = lambda: F_.attention_fwd_triton(q, k, v, num, idx, D ** -0.5, False, 128, 64,  # noqa: E731
                                                 num_warps=w, num_stages=s)
            r[f"fwd_w{w}s{s}"] = round(C.time_fn(fn, dev), 4)
            r[f"fwd_w{w}s{s}_graph"] = g(fn)
        for kk, vv in r.items():
            print(kk, vv, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp4.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
