"""Session 6, experiment 1 (GPU): sparge on a 128x128 block mask (the one Flex's backward
compiles for) vs 128x64, at 95% on 32768x128 bf16. Checks the 128x128 kernels against fp32
references, sweeps fwd/bwd launch settings at BLOCK_N=128, times autotuned totals and Flex.
Writes $OUT/exp1.json."""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

import sparge_compile as sc
from bench import common as C
from bench.kernels import _flex_fn, _fwd_bwd, tune_config
from sparge_compile.kernels import backward as B_
from sparge_compile.kernels import forward as F_

dev = torch.device("cuda")
res: dict = {"errors": {}}
OUT = os.environ.get("OUT", "/tmp")


def save():
    with open(os.path.join(OUT, "exp1.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def g(key, fn):
    try:
        res[key] = fn()
        print(key, res[key], flush=True)
    except Exception as e:  # noqa: BLE001
        res["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        print("ERR", key, res["errors"][key], flush=True)
        traceback.print_exc()
    save()


def tb(fn, grads=None):
    return C.time_fn(fn, dev, warmup=25, rep=100, grad_to_none=grads)


# ---- correctness at 128x128 (smaller shape, fp32 references) ----
def check(N=4096, D=128, bk=128):
    q, k, v = C.random_qkv(1, 4, N, D, dev, torch.bfloat16, seed=1)
    base = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=128, block_k=bk, mode="topk", min_seq_len=0)
    cfg, mask = tune_config(q, k, 0.9, base)
    dense = mask.to_dense()  # (B, H, nq, nk) bool
    allow = dense.repeat_interleave(128, 2).repeat_interleave(bk, 3)[..., :N, :N]
    qf, kf, vf = (x.float().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allow)
    dout = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (qf, kf, vf), dout)
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = sc.sparse_attention(qg, kg, vg, block_mask=mask)
    gs = torch.autograd.grad(out, (qg, kg, vg), dout.to(out.dtype))
    r = {"sparsity": mask.sparsity(), "out": C.rel_l2(out, ref)}
    for n, a, b in zip("qkv", gs, gr):
        r["d" + n] = C.rel_l2(a, b)
    return r


for bk in (64, 128):
    g(f"check_bk{bk}", lambda bk=bk: check(bk=bk))

q, k, v = C.random_qkv(1, 12, 32768, 128, dev, torch.bfloat16, seed=0)
qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
dout = torch.randn_like(q)
grads = [qg, kg, vg]
flex = _flex_fn(True)
masks = {}
for bk in (64, 128):
    base = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=128, block_k=bk, mode="topk", min_seq_len=0)
    cfg, mask = tune_config(q, k, 0.95, base)
    masks[bk] = (cfg, mask)
    res[f"sparsity_bk{bk}"] = mask.sparsity()
    bm = mask.to_flex()
    g(f"flex_fwd_bk{bk}", lambda bm=bm: tb(lambda: flex(q, k, v, block_mask=bm)))
    if bk == 128:
        g("flex_fwdbwd_bk128", lambda bm=bm: tb(_fwd_bwd(lambda: flex(qg, kg, vg, block_mask=bm), dout), grads))
    g(f"predict_bk{bk}", lambda cfg=cfg: tb(lambda: sc.predict_block_mask(q, k, config=cfg)))
    g(f"sparge_kernel_fwd_bk{bk}", lambda mask=mask: tb(lambda: sc.sparse_attention(q, k, v, block_mask=mask)))
    g(f"sparge_fwd_bk{bk}", lambda cfg=cfg: tb(lambda: sc.sparse_attention(q, k, v, config=cfg)))
    g(f"sparge_fwdbwd_bk{bk}", lambda cfg=cfg: tb(_fwd_bwd(lambda: sc.sparse_attention(qg, kg, vg, config=cfg), dout), grads))
    num, idx = mask.kv_num_blocks, mask.kv_indices
    scale = 128 ** -0.5
    for w, s in ((4, 2), (4, 3), (8, 2), (8, 3)):
        g(f"fwd_bk{bk}_w{w}s{s}", lambda w=w, s=s, num=num, idx=idx, bk=bk: tb(
            lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, bk, num_warps=w, num_stages=s)))
    out, lse = F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, bk)
    variants = [dict()]
    if bk == 128:
        variants = [dict(), dict(dkdv_warps=8, dkdv_stages=2), dict(dkdv_warps=8, dkdv_stages=3),
                    dict(dkdv_warps=4, dkdv_stages=2, sub_m=32), dict(dkdv_warps=8, dkdv_stages=2, sub_m=32),
                    dict(dkdv_warps=8, dkdv_stages=3, sub_m=32), dict(dq_warps=8, dq_stages=2),
                    dict(dq_warps=4, dq_stages=2)]
    for var in variants:
        name = "_".join(f"{a}{b}" for a, b in var.items()) or "auto"
        g(f"bwd_bk{bk}_{name}", lambda var=var, num=num, idx=idx, bk=bk, out=out, lse=lse: tb(
            lambda: B_.attention_bwd_triton(dout, q, k, v, out, lse, num, idx, scale, False, 128, bk, **var)))
    res["tuning"] = __import__("sparge_compile.kernels.tuning", fromlist=["x"]).best_configs()
    save()
print(json.dumps(res, indent=1, default=str))
