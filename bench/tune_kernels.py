"""Kernel tuning run (GPU): time the parts and variants of the sparse kernels against SDPA and
FlexAttention on the same mask, at the Wan2.1-1.3B attention shape (B=1, H=12, N=32768, D=128).

    PYTHONPATH=. python bench/tune_kernels.py   # writes $OUT/tune.json (or ./out/tune.json)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton

import sparge_compile as sc
from sparge_compile.kernels import backward as bwd_mod
from sparge_compile.kernels import forward as fwd_mod
from sparge_compile.kernels import mask as mask_mod
from sparge_compile.kernels import torch_impl


def bench(fn, rep=100):
    try:
        return round(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), 4)
    except Exception as e:  # record, don't die
        return f"error: {type(e).__name__}: {str(e)[:160]}"


def main():
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    B, H, N, D = 1, 12, int(os.environ.get("TUNE_N", 32768)), 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = D ** -0.5
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)

    # mask prediction parts
    qb = mask_mod.pool_blocks_triton(q, 128)
    res["pool_q"] = bench(lambda: mask_mod.pool_blocks_triton(q, 128))
    res["pool_k"] = bench(lambda: mask_mod.pool_blocks_triton(k, 64))
    for bm in (2, 8):
        for nw in (4,):
            res[f"predict_bm{bm}_w{nw}"] = bench(lambda: mask_mod.predict_mask_triton(
                q, k, scale, False, 0.05, 0.2, "hybrid", 128, 64, block_m=bm, num_warps=nw))
    res["predict_default"] = bench(lambda: sc.predict_block_mask(q, k, config=sc.SpargeConfig()))
    print(json.dumps(res), flush=True)

    rows = []
    for sp_target, topk in [(0.95, 0.05)]:
        cfg = sc.SpargeConfig(topk=topk, topp=0.0, mode="topk")
        m = sc.predict_block_mask(q, k, config=cfg)
        num, idx = m.kv_num_blocks, m.kv_indices
        r = {"target": sp_target, "sparsity": m.sparsity()}
        o, lse = fwd_mod.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
        ref, _ = torch_impl.attention_fwd(q[:, :2].float(), k[:, :2].float(), v[:, :2].float(),
                                          num[:, :2], idx[:, :2], scale, False, 128, 64)
        r["rel_err"] = float((o[:, :2].float() - ref).norm() / ref.norm())
        for nw, ns in [(4, 2), (4, 3)]:
            r[f"fwd_w{nw}_s{ns}"] = bench(lambda: fwd_mod.attention_fwd_triton(
                q, k, v, num, idx, scale, False, 128, 64, nw, ns))
        bm = m.to_flex()
        r["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm))
        do = torch.randn_like(q)
        r["bwd_transpose"] = bench(lambda: torch_impl.transpose_indices(num, idx, idx.shape[-1]))
        r["bwd_delta"] = bench(lambda: (do.float() * o.float()).sum(-1))
        for sub in (32, 64, 128):
            for nw, ns in [(4, 2), (8, 2), (4, 3), (8, 1)]:
                r[f"bwd_dkdv_sub{sub}_w{nw}_s{ns}"] = bench(lambda: bwd_mod.attention_bwd_triton(
                    do, q, k, v, o, lse, num, idx, scale, False, 128, 64, sub_m=sub, dkdv_warps=nw,
                    dkdv_stages=ns))
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fb():
            sc.sparse_attention(qg, kg, vg, config=cfg).backward(do)
        r["sparge_fwdbwd_total"] = bench(fb)
        r["sparge_fwd_total"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
        cfg128 = sc.SpargeConfig(topk=topk, topp=0.0, mode="topk", block_k=128)
        bm128 = sc.predict_block_mask(q, k, config=cfg128).to_flex()

        def ffb():
            flex(qg, kg, vg, block_mask=bm128).backward(do)
        r["flex128_fwdbwd"] = bench(ffb)
        rows.append(r)
        print(json.dumps(r), flush=True)
    res["rows"] = rows
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
