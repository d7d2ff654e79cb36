"""Session 7, experiment 3 (GPU, H200): where mask prediction's time goes (pool, score, select)
and pooling variants against a pure-read ceiling, 95% top-k, 32768x128 bf16.
    PYTHONPATH=. python docs/results/2026-12-01-h200/s7/exp3.py   # writes $OUT/exp3.json
"""
import json
import os

import torch
import triton
import triton.language as tl

from bench import common as C
from sparge_compile.kernels import forward as F_
from sparge_compile.kernels import mask as M
from sparge_compile.reference import cdiv

dev = torch.device("cuda")


@triton.jit
def _read_sum(X, Out, n, BLOCK: tl.constexpr):
    """Pure-read ceiling: each program sums BLOCK contiguous bf16 values."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(x, 0))


@triton.jit
def _pool_tiles(XD, Out, n_tiles, H, N, nb, pid, nprog, BLOCK: tl.constexpr, D: tl.constexpr,
                STAGES: tl.constexpr):
    for t in tl.range(pid, n_tiles, nprog, num_stages=STAGES):
        bh = t // nb
        blk = t % nb
        x = XD.load([bh // H, bh % H, blk * BLOCK, 0]).reshape(BLOCK, D).to(tl.float32)
        cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        tl.store(Out + t * D + tl.arange(0, D), tl.sum(x, 0) / cnt)


@triton.jit
def _pool_tma(QD, KD, QB, KB, B, Hq, Hk, Nq, Nk, nq, nk,
              BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _pool_tiles(QD, QB, B * Hq * nq, Hq, Nq, nq, pid, nprog, BQ, D, STAGES)
    _pool_tiles(KD, KB, B * Hk * nk, Hk, Nk, nk, pid, nprog, BK, D, STAGES)


def pool_tma(q, k, per_sm, stages, warps):
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    nq, nk = cdiv(Nq, 128), cdiv(Nk, 64)
    qb = torch.empty((B, Hq, nq, D), dtype=torch.float32, device=q.device)
    kb = torch.empty((B, Hk, nk, D), dtype=torch.float32, device=q.device)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    _pool_tma[(sms * per_sm,)](F_.descriptor(q, 128), F_.descriptor(k, 64), qb, kb, B, Hq, Hk, Nq, Nk, nq, nk,
                               BQ=128, BK=64, D=D, STAGES=stages, num_warps=warps)
    return qb, kb


def pool_warps(q, k, warps):
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    nq, nk = cdiv(Nq, 128), cdiv(Nk, 64)
    qb = torch.empty((B, Hq, nq, D), dtype=torch.float32, device=q.device)
    kb = torch.empty((B, Hk, nk, D), dtype=torch.float32, device=q.device)
    M._pool_qk_kernel[(nq + nk, B * max(Hq, Hk))](q, k, qb, kb, *q.stride(), *k.stride(), B, Hq, Hk, Nq, Nk,
                                                  nq, nk, D, BQ=128, BK=64, BLOCK_D=D, num_warps=warps)
    return qb, kb


def main():
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    N, D = 32768, 128
    q, k, v = C.random_qkv(1, 12, N, D, dev, torch.bfloat16, seed=0)
    gb = 2 * q.numel() * 2 / 1e9
    res["bytes_GB"] = gb
    g = lambda fn: round(C.time_graph(fn, dev), 4)  # noqa: E731
    res["copy_q_k"] = g(lambda: (q.clone(), k.clone()))
    flat = torch.cat([q.reshape(-1), k.reshape(-1)])
    for blk in (8192, 16384, 32768):
        o = torch.empty(cdiv(flat.numel(), blk), device=dev)
        for w in (4, 8):
            res[f"read_sum_b{blk}_w{w}"] = g(lambda: _read_sum[(o.numel(),)](flat, o, flat.numel(), BLOCK=blk, num_warps=w))
    ref = M.pool_qk_triton(q, k, 128, 64)
    for w in (1, 2, 4, 8):
        got = pool_warps(q, k, w)
        res[f"pool_w{w}"] = dict(ms=g(lambda: pool_warps(q, k, w)),
                                 ok=all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, ref)))
    for per_sm in (2, 4, 8):
        for stages in (2, 3, 4):
            for w in (4, 8):
                try:
                    got = pool_tma(q, k, per_sm, stages, w)
                    ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, ref))
                    res[f"tma_p{per_sm}_s{stages}_w{w}"] = dict(ms=g(lambda: pool_tma(q, k, per_sm, stages, w)), ok=ok)
                except Exception as e:  # noqa: BLE001
                    res[f"tma_p{per_sm}_s{stages}_w{w}"] = f"{type(e).__name__}: {str(e)[:200]}"
    import sparge_compile as sc
    cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk")
    res["predict_graph"] = g(lambda: sc.predict_block_mask(q, k, config=cfg))
    qb, kb = ref
    scores = torch.empty((1, 12, 256, 512), device=dev)
    res["score"] = g(lambda: M._score_kernel[(4, 8, 12)](qb, kb, scores, 0.1, 12, 1, 256, 512, TILE=64, BLOCK_D=128,
                                                         PREC="tf32x3", num_warps=4))
    res["select_topk"] = g(lambda: M.select_triton(scores, N, N, False, 0.05, 0.0, "topk", 128, 64))
    res["select_hybrid"] = g(lambda: M.select_triton(scores, N, N, False, 0.05, 0.9, "hybrid", 128, 64))
    for kk, vv in res.items():
        print(kk, vv, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp3.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
