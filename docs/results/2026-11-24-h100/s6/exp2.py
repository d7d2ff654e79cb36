"""Session 6, experiment 2 (GPU): mask prediction at long sequences (nk = 1182 key blocks at
75600 tokens): pooling, scores and selection timed apart; selection launch variants (query
blocks per program, warps) with the compiler's register/spill report. Writes $OUT/exp2.json.
EXP=exp3 (after the early-stopping top-k search) and EXP=exp4 (after the [min, max] start and the
warps rule) re-ran it with five launch variants, writing $OUT/exp3.json / exp4.json."""
from __future__ import annotations

import json
import os

import torch
import triton

from bench import common as C
from sparge_compile.kernels import mask as M
from sparge_compile.reference import cdiv

dev = torch.device("cuda")
OUT = os.environ.get("OUT", "/tmp")
EXP = os.environ.get("EXP", "exp2")
VARIANTS = (((1, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 4), (4, 8), (2, 1)) if EXP == "exp2"
            else ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2)))
res: dict = {}


def tb(fn):
    return C.time_fn(fn, dev, warmup=25, rep=100)


def select_variant(scores, topk, topp, mode, bm, w):
    B, H, nq, nk = scores.shape
    NK_P2 = max(16, triton.next_power_of_2(nk))
    num = torch.empty((B, H, nq), dtype=torch.int32, device=dev)
    idx = torch.empty((B, H, nq, nk), dtype=torch.int32, device=dev)

    def run():
        return M._select_kernel[(cdiv(nq, bm), B * H)](
            scores, num, idx, float(topk), float(topp), H, nq * 128, nk * 64, nq, nk,
            BQ=128, BK=64, BLOCK_M=bm, NK_P2=NK_P2, IS_CAUSAL=False, MODE=M.MODE_IDS[mode],
            PAIRWISE=False, num_warps=w)
    k = run()
    return run, k, (num, idx)


for N, D in ((75600, 64), (75600, 128), (32768, 128)):
    q, k, v = C.random_qkv(1, 12, N, D, dev, torch.bfloat16, seed=0)
    nq, nk = cdiv(N, 128), cdiv(N, 64)
    r = {}
    r["pool"] = tb(lambda: M.pool_qk_triton(q, k, 128, 64))
    for mode, topk, topp in (("topk", 0.05, 0.0), ("hybrid", 0.05, 0.9)):
        r[f"predict_{mode}"] = tb(lambda: M.predict_mask_triton(q, k, D ** -0.5, False, topk, topp, mode, 128, 64))
    qb, kb = M.pool_qk_triton(q, k, 128, 64)
    scores = (qb @ kb.transpose(-1, -2)) * D ** -0.5
    ref = {}
    for mode, topk, topp in (("topk", 0.05, 0.0), ("hybrid", 0.05, 0.9)):
        base = None
        for bm, w in VARIANTS:
            key = f"select_{mode}_bm{bm}_w{w}"
            try:
                run, kern, outs = select_variant(scores, topk, topp, mode, bm, w)
                same = None
                if base is None:
                    base = [o.clone() for o in outs]
                else:
                    same = all(torch.equal(a, b) for a, b in zip(base, outs))
                r[key] = dict(ms=tb(run), regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None),
                              same_as_first=same)
            except Exception as e:  # noqa: BLE001
                r[key] = f"{type(e).__name__}: {str(e)[:200]}"
            print(N, D, key, r[key], flush=True)
    res[f"{N}x{D}"] = r
    print(N, D, {k_: v_ for k_, v_ in r.items() if not k_.startswith("select")}, flush=True)
    with open(os.path.join(OUT, f"{EXP}.json"), "w") as f:
        json.dump(res, f, indent=1)
