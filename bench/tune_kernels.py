"""Kernel tuning run (GPU): correctness spot-check, then time variants of the sparse kernels
against SDPA and FlexAttention on the same mask, at the Wan2.1-1.3B attention shape.

    PYTHONPATH=. python bench/tune_kernels.py   # writes $OUT/tune.json (or ./out/tune.json)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

import sparge_compile as sc
from sparge_compile.kernels import forward as fwd_mod
from sparge_compile.kernels import torch_impl


def bench(fn, rep=200):
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    except Exception as e:  # record, don't die
        return f"error: {type(e).__name__}: {str(e)[:200]}"


def main():
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    B, H, N, D = 1, 12, int(os.environ.get("TUNE_N", 32768)), 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = []

    # dense baselines
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["sdpa_cudnn_fwd"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        res["sdpa_flash_fwd"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))

    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)

    for sp_target, topk in [(0.0, 1.0), (0.9, 0.1), (0.95, 0.05), (0.97, 0.03)]:
        cfg = sc.SpargeConfig(topk=topk, topp=0.0, mode="topk")
        m = sc.predict_block_mask(q, k, config=cfg)
        r = {"target": sp_target, "sparsity": m.sparsity()}
        r["predict"] = bench(lambda: sc.predict_block_mask(q, k, config=cfg))
        # correctness vs fp32 chunked reference (2 heads to save time)
        o = sc.sparse_attention(q, k, v, block_mask=m)
        ref, _ = torch_impl.attention_fwd(q[:, :2].float(), k[:, :2].float(), v[:, :2].float(),
                                          m.kv_num_blocks[:, :2], m.kv_indices[:, :2], D ** -0.5, False, 128, 64)
        r["rel_err"] = float((o[:, :2].float() - ref).norm() / ref.norm())
        for nw in (4, 8):
            for ns in (1, 2, 3, 4):
                r[f"fwd_w{nw}_s{ns}"] = bench(lambda: fwd_mod.attention_fwd_triton(
                    q, k, v, m.kv_num_blocks, m.kv_indices, D ** -0.5, False, 128, 64, nw, ns))
        try:
            bm = m.to_flex()
            r["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm))
        except Exception as e:
            r["flex_fwd"] = f"error: {e}"[:200]
        # forward + backward
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def fb():
            o = sc.sparse_attention(qg, kg, vg, config=cfg)
            o.backward(do)
        r["sparge_fwdbwd_total"] = bench(fb, rep=100)
        r["sparge_fwd_total"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
        try:
            cfg128 = sc.SpargeConfig(topk=topk, topp=0.0, mode="topk", block_k=128)
            bm128 = sc.predict_block_mask(q, k, config=cfg128).to_flex()

            def ffb():
                o = flex(qg, kg, vg, block_mask=bm128)
                o.backward(do)
            r["flex128_fwdbwd"] = bench(ffb, rep=100)
        except Exception as e:
            r["flex128_fwdbwd"] = f"error: {e}"[:200]
        rows.append(r)
        print(json.dumps(r), flush=True)
    res["rows"] = rows
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))


if __name__ == "__main__":
    sys.exit(main())
