"""Kernel tuning run (GPU): time the parts and variants of the sparse kernels against
FlexAttention on the same mask, at the Wan2.1-1.3B attention shape (B=1, H=12, N=32768, D=128,
bf16, 95% sparsity). Every variant is checked against the float32 PyTorch path first.

    PYTHONPATH=. python bench/tune_kernels.py   # writes $OUT/tune.json (or ./out/tune.json)
    TUNE_D=64 TUNE_SPARSITY=0.9 ...             # other shapes
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton

import sparge_compile as sc
from sparge_compile import reference as R
from sparge_compile.kernels import backward as bwd_mod
from sparge_compile.kernels import forward as fwd_mod
from sparge_compile.kernels import mask as mask_mod
from sparge_compile.kernels import torch_impl


def bench(fn, rep=100):
    try:
        return round(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), 4)
    except Exception as e:  # record, don't die
        return f"error: {type(e).__name__}: {str(e)[:160]}"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def sort_transpose(num, idx, nk):
    """The previous transposed-index builder (torch sort), for comparison."""
    dense = torch_impl.indices_to_dense(num, idx, nk).transpose(-2, -1).contiguous()
    return dense.sum(-1, dtype=torch.int32), torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices


def main():
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    B, H, N, D = 1, 12, int(os.environ.get("TUNE_N", 32768)), int(os.environ.get("TUNE_D", 128))
    sparsity = float(os.environ.get("TUNE_SPARSITY", 0.95))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale = D ** -0.5
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)
    res["shape"] = [B, H, N, D]
    res["pool_qk_fused"] = bench(lambda: mask_mod.pool_qk_triton(q, k, 128, 64))
    qb1, kb1 = mask_mod.pool_qk_triton(q, k, 128, 64)
    res["pool_qk_equal"] = bool(torch.allclose(qb1, R.pool_blocks(q.float(), 128), atol=1e-5)
                                and torch.allclose(kb1, R.pool_blocks(k.float(), 64), atol=1e-5))
    res["predict_default"] = bench(lambda: sc.predict_block_mask(q, k, config=sc.SpargeConfig()))
    cfg = sc.SpargeConfig(topk=round(1 - sparsity, 4), topp=0.0, mode="topk")
    m = sc.predict_block_mask(q, k, config=cfg)
    num, idx = m.kv_num_blocks, m.kv_indices
    res["sparsity"] = m.sparsity()
    res["predict_topk"] = bench(lambda: sc.predict_block_mask(q, k, config=cfg))
    # the selection kernel alone, by (query blocks per program, warps), on the hybrid default
    qb, kb = mask_mod.pool_qk_triton(q, k, 128, 64)
    scores = torch.empty(B, H, N // 128, N // 64, device="cuda")
    mask_mod._score_kernel[(N // 128 // 64 or 1, N // 64 // 64, B * H)](
        qb, kb, scores, D ** -0.5, H, 1, N // 128, N // 64, TILE=64, BLOCK_D=D, PREC="tf32x3", num_warps=4)
    res["score_kernel"] = bench(lambda: mask_mod._score_kernel[(N // 128 // 64 or 1, N // 64 // 64, B * H)](
        qb, kb, scores, D ** -0.5, H, 1, N // 128, N // 64, TILE=64, BLOCK_D=D, PREC="tf32x3", num_warps=4))
    dc = sc.SpargeConfig()
    base_sel = mask_mod.select_triton(scores, N, N, False, dc.topk, dc.topp, "hybrid", 128, 64)
    sel = {}
    for bm, w in ((8, 4), (8, 2), (4, 2), (4, 1), (2, 1), (16, 4), (16, 8), (1, 1)):
        got = mask_mod.select_triton(scores, N, N, False, dc.topk, dc.topp, "hybrid", 128, 64, bm, w)
        same = bool(torch.equal(got[0], base_sel[0]) and torch.equal(got[1], base_sel[1]))
        sel[f"bm{bm}_w{w}"] = {"ms": bench(lambda: mask_mod.select_triton(
            scores, N, N, False, dc.topk, dc.topp, "hybrid", 128, 64, bm, w)), "same": same}
    res["select"] = sel
    print("select", sel, flush=True)
    ref, ref_lse = torch_impl.attention_fwd(q[:, :2].float(), k[:, :2].float(), v[:, :2].float(),
                                            num[:, :2], idx[:, :2], scale, False, 128, 64)
    print(json.dumps(res), flush=True)

    fwd = {}
    variants = [dict(num_warps=w, num_stages=s, use_tma=t)
                for t in (False, True) for (w, s) in ((4, 2), (8, 2), (4, 3), (8, 3), (4, 4))]
    if os.environ.get("TUNE_FWD", "1") != "1":  # only the default
        variants = [dict()]
    for var in variants:
        name = "fwd_" + "_".join(f"{a}{int(b)}" for a, b in var.items())
        try:
            o, lse = fwd_mod.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64, **var)
            err = rel(o[:, :2], ref)
        except Exception as e:
            fwd[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
            continue
        fwd[name] = {"ms": bench(lambda: fwd_mod.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64,
                                                                       **var)), "err": err}
        print(name, fwd[name], flush=True)
    res["fwd"] = fwd
    bm = m.to_flex()
    res["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm))
    # fully dense mask: the best pointer and TMA variants against Flex dense
    dcfg = sc.SpargeConfig(topk=1.0, topp=0.0, mode="topk")
    dm = sc.predict_block_mask(q, k, config=dcfg)
    dense = {}
    for t in (False, True):
        dense[f"fwd_tma{int(t)}"] = bench(lambda: fwd_mod.attention_fwd_triton(
            q, k, v, dm.kv_num_blocks, dm.kv_indices, scale, False, 128, 64, use_tma=t), rep=50)
    dbm = dm.to_flex()
    dense["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=dbm), rep=50)
    res["dense"] = dense
    print("dense", dense, flush=True)

    o, lse = fwd_mod.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
    res["transpose_sort"] = bench(lambda: sort_transpose(num, idx, idx.shape[-1]))
    res["transpose_new"] = bench(lambda: torch_impl.transpose_indices(num, idx, idx.shape[-1]))
    qn1, qi1 = sort_transpose(num, idx, idx.shape[-1])
    qn2, qi2 = torch_impl.transpose_indices(num, idx, idx.shape[-1])
    res["transpose_equal"] = bool(torch.equal(qn1, qn2) and torch.equal(qi1.int(), qi2))
    # gradient reference on 2 heads
    qf, kf, vf = (x[:, :2].float() for x in (q, k, v))
    gref = torch_impl.attention_bwd(do[:, :2].float(), qf, kf, vf, ref, ref_lse, num[:, :2], idx[:, :2],
                                    scale, False, 128, 64)
    bwd = {}
    bvars = [dict()]
    if os.environ.get("TUNE_BWD", "all") == "all":
        for t in (False, True):
            bvars += [dict(use_tma=t, dq_warps=w, dq_stages=s) for (w, s) in ((8, 2), (8, 3), (4, 2), (4, 3))]
            bvars += [dict(use_tma=t, dkdv_warps=4, dkdv_stages=3), dict(use_tma=t, dkdv_warps=8, dkdv_stages=2),
                      dict(use_tma=t, sub_m=32, dkdv_warps=4, dkdv_stages=3),
                      dict(use_tma=t, sub_m=128, dkdv_warps=8)]
    # dK/dV stages and slice rows
    bvars += [dict(dkdv_stages=3), dict(sub_m=32, dkdv_stages=3)]
    for var in bvars:
        name = "bwd_" + ("_".join(f"{a}{int(b)}" for a, b in var.items()) or "default")
        try:
            gr = bwd_mod.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False, 128, 64, **var)
            errs = [rel(a[:, :2], b) for a, b in zip(gr, gref)]
        except Exception as e:
            bwd[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
            continue
        bwd[name] = {"ms": bench(lambda: bwd_mod.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False,
                                                                       128, 64, **var)), "err": errs}
        print(name, bwd[name], flush=True)
    res["bwd"] = bwd
    from bench.profile_kernels import compiler_report
    res["compiler"] = compiler_report()
    for row in res["compiler"]:
        print(row, flush=True)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fb():
        sc.sparse_attention(qg, kg, vg, config=cfg).backward(do)
    res["sparge_fwdbwd_total"] = bench(fb)
    res["sparge_fwd_total"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
    bm128 = sc.predict_block_mask(q, k, config=cfg.replace(block_k=128)).to_flex()

    def ffb():
        flex(qg, kg, vg, block_mask=bm128).backward(do)
    res["flex128_fwdbwd"] = bench(ffb)
    res["flex128_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm128))
    print(json.dumps({k: v for k, v in res.items() if k not in ("fwd", "bwd")}), flush=True)
    name = f"tune_{N}x{D}_{int(round(sparsity * 100))}.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
