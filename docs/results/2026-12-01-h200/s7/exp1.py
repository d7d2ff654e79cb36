"""Session 7, experiment 1 (scratch, GPU): the backward's dS cache (dK/dV stores dS of kept
pairs, dQ = dS · K from it) vs recomputing in the dQ kernel; correctness against float32 torch
on 2 heads; bwd alone and fwd+bwd through the public API vs FlexAttention 128x128.
    PYTHONPATH=. python docs/results/2026-12-01-h200/s7/exp1.py   # writes $OUT/exp1.json
"""
import json
import os
import sys

import torch
import triton

import sparge_compile as sc
from sparge_compile.kernels import backward as bw
from sparge_compile.kernels import forward as fw
from sparge_compile.kernels import torch_impl
from sparge_compile.kernels.transpose import transpose_indices_triton


def bench(fn, rep=100):
    try:
        return round(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), 4)
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e)[:200]}"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    B, H, N, D = 1, 12, int(os.environ.get("N", 32768)), int(os.environ.get("D", 128))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale = D ** -0.5
    for sp in (0.95, 0.0):
        r = res[f"sp{sp}"] = {}
        cfg = sc.SpargeConfig(topk=round(1 - sp, 4), topp=0.0, mode="topk")
        m = sc.predict_block_mask(q, k, config=cfg)
        num, idx = m.kv_num_blocks, m.kv_indices
        total = int(num.sum())
        r["pairs"] = total
        o, lse = fw.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
        row_end = torch.cumsum(num.reshape(-1), 0, dtype=torch.int32)
        qn, qi, qp = transpose_indices_triton(num, idx, idx.shape[-1], row_end)
        qn2, qi2 = torch_impl.transpose_indices(num, idx, idx.shape[-1])
        qp2 = torch_impl.transpose_pids(num, idx, idx.shape[-1], qn2, qi2, row_end)
        valid = torch.arange(qi.shape[-1], device="cuda") < qn[..., None]
        r["pids_equal"] = bool(torch.equal(qn, qn2) and torch.equal(qi, qi2) and torch.equal(qp[valid], qp2[valid]))
        if sp > 0:
            qf, kf, vf = (x[:, :2].float() for x in (q, k, v))
            oref, lref = torch_impl.attention_fwd(qf, kf, vf, num[:, :2], idx[:, :2], scale, False, 128, 64)
            gref = torch_impl.attention_bwd(do[:, :2].float(), qf, kf, vf, oref, lref, num[:, :2], idx[:, :2],
                                            scale, False, 128, 64)
        variants = {"nocache": dict(ds_cap=0), "full": dict(ds_cap=total), "half": dict(ds_cap=total // 2),
                    "auto_budget": dict(ds_cap=min(total, bw.DS_CACHE_BYTES // (128 * 64 * 2)))}
        if sp > 0:
            for w, s in ((8, 3), (8, 2), (4, 2), (4, 3)):
                variants[f"full_dq_w{w}s{s}"] = dict(ds_cap=total, dq_warps=w, dq_stages=s)
            variants["full_dkdv_w4s3"] = dict(ds_cap=total, dkdv_warps=4, dkdv_stages=3)
            variants["full_notma"] = dict(ds_cap=total, use_tma=False)
        base = None
        for name, var in variants.items():
            try:
                gr = bw.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False, 128, 64, **var)
            except Exception as e:
                r[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
                print(name, r[name], flush=True)
                continue
            ent = {}
            if base is None:
                base = gr
            ent["vs_nocache"] = [rel(a, b) for a, b in zip(gr, base)]
            if sp > 0:
                ent["err"] = [rel(a[:, :2], b) for a, b in zip(gr, gref)]
            ent["ms"] = bench(lambda: bw.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False, 128, 64,
                                                              **var), rep=100 if sp > 0 else 300)
            r[name] = ent
            print(sp, name, ent, flush=True)
            del gr
        if sp > 0:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def fb():
                sc.sparse_attention(qg, kg, vg, config=cfg).backward(do)
            fb()
            r["fwdbwd_total_auto"] = bench(fb)
            old = bw.DS_CACHE_BYTES
            bw.DS_CACHE_BYTES = 0
            r["fwdbwd_total_nocache"] = bench(fb)
            bw.DS_CACHE_BYTES = old
            r["fwdbwd_total_auto_again"] = bench(fb)
            r["fwd_total"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention)
            bm = sc.predict_block_mask(q, k, config=cfg.replace(block_k=128)).to_flex()

            def ffb():
                flex(qg, kg, vg, block_mask=bm, scale=scale).backward(do)
            r["flex128_fwdbwd"] = bench(ffb)
            r["flex_fwd_128x64"] = bench(lambda: flex(q, k, v, block_mask=m.to_flex(), scale=scale))
            print(r, flush=True)
            del qg, kg, vg
        torch.cuda.empty_cache()
    json.dump(res, open(f"{out}/exp1.json", "w"), indent=1)


if __name__ == "__main__":
    main()
