"""Kernel tuning run (GPU): time the parts and variants of the sparse kernels against
FlexAttention on the same mask, at the Wan2.1-1.3B attention shape (B=1, H=12, N=32768, D=128,
bf16, 95% sparsity). Every variant is checked against the float32 PyTorch path first.

    python -m bench tune --out results                      # writes results/tune_32768x128_95.json
    python -m bench tune --d 64 --sparsity 0.9 --out results
    python -m bench tune --fwd-variants default --bwd-variants default --out results   # quick
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparge_compile as sc
from bench import output as O
from bench.cli import module_entry
from bench.tools import require_cuda
from bench.tools.profile_kernels import compiler_report


class _Modules:
    """The library's kernel modules, imported on first use (after the CUDA check): importing
    them fixes Triton's interpreter mode (TRITON_INTERPRET) for the process, and the CPU tests
    build this tool's parser."""

    def __getattr__(self, name):
        import importlib

        return importlib.import_module("sparge_compile." + ("" if name == "reference" else "kernels.") + name)


K = _Modules()

COMMON_ARGS = False  # no --quick: a GPU tool
SELECT_LAUNCHES = ((8, 4), (8, 2), (4, 2), (4, 1), (2, 1), (16, 4), (16, 8), (1, 1))  # (rows, warps)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--n", type=int, default=32768, help="sequence length (default 32768)")
    p.add_argument("--d", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--sparsity", type=float, default=0.95, help="top-k mask sparsity (default 0.95)")
    p.add_argument("--fwd-variants", choices=["all", "default"], default="all",
                   help="forward launch settings to time: every (warps, stages, TMA) or the default only")
    p.add_argument("--bwd-variants", choices=["all", "default"], default="all",
                   help="backward settings: the full sweep or the default and two dK/dV variants")


def bench(fn, rep=100):
    import triton

    try:
        return round(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), 4)
    except Exception as e:  # noqa: BLE001 - record, don't die
        return f"error: {type(e).__name__}: {str(e)[:160]}"


def checked_time(call, error_of):
    """{"ms", "err"} of one variant: its error (``error_of(call())``) first, then its time; the
    error message if it fails to compile or run."""
    try:
        err = error_of(call())
    except Exception as e:  # noqa: BLE001 - record, don't die
        return f"error: {type(e).__name__}: {str(e)[:160]}"
    return {"ms": bench(call), "err": err}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def sort_transpose(num, idx, nk):
    """The previous transposed-index builder (torch sort), for comparison."""
    dense = K.torch_impl.indices_to_dense(num, idx, nk).transpose(-2, -1).contiguous()
    return dense.sum(-1, dtype=torch.int32), torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices


def prediction(res, q, k, cfg, N, D) -> None:
    """Pooling, prediction and the score / selection kernels alone."""
    B, H = q.shape[:2]
    res["pool_qk_fused"] = bench(lambda: K.mask.pool_qk_triton(q, k, 128, 64))
    qb, kb = K.mask.pool_qk_triton(q, k, 128, 64)
    res["pool_qk_equal"] = bool(torch.allclose(qb, K.reference.pool_blocks(q.float(), 128), atol=1e-5)
                                and torch.allclose(kb, K.reference.pool_blocks(k.float(), 64), atol=1e-5))
    res["predict_default"] = bench(lambda: sc.predict_block_mask(q, k, config=sc.SpargeConfig()))
    res["predict_topk"] = bench(lambda: sc.predict_block_mask(q, k, config=cfg))
    # the selection kernel alone, by (query blocks per program, warps), on the hybrid default
    scores = torch.empty(B, H, N // 128, N // 64, device="cuda")

    def score():
        K.mask._score_kernel[(N // 128 // 64 or 1, N // 64 // 64, B * H)](
            qb, kb, scores, D ** -0.5, H, 1, N // 128, N // 64, TILE=64, BLOCK_D=D, PREC="tf32x3",
            num_warps=4)
    score()
    res["score_kernel"] = bench(score)
    dc = sc.SpargeConfig()

    def select(*launch):
        return K.mask.select_triton(scores, N, N, False, dc.topk, dc.topp, "hybrid", 128, 64, *launch)
    base_sel, sel = select(), {}
    for bm, w in SELECT_LAUNCHES:
        got = select(bm, w)
        same = bool(torch.equal(got[0], base_sel[0]) and torch.equal(got[1], base_sel[1]))
        sel[f"bm{bm}_w{w}"] = {"ms": bench(lambda bm=bm, w=w: select(bm, w)), "same": same}
    res["select"] = sel
    print("select", sel, flush=True)


def forward_variants(q, k, v, num, idx, scale, ref, which: str) -> dict:
    """Forward time and error (first 2 heads, vs float32) per launch setting."""
    variants = [dict(num_warps=w, num_stages=s, use_tma=t)
                for t in (False, True) for (w, s) in ((4, 2), (8, 2), (4, 3), (8, 3), (4, 4))]
    if which != "all":  # only the default
        variants = [dict()]
    fwd = {}
    for var in variants:
        name = "fwd_" + "_".join(f"{a}{int(b)}" for a, b in var.items())
        fwd[name] = checked_time(
            lambda var=var: K.forward.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64, **var),
            lambda out: rel(out[0][:, :2], ref))
        print(name, fwd[name], flush=True)
    return fwd


def dense_mask(q, k, v, scale, flex) -> dict:
    """A fully dense mask: the pointer and TMA forwards against Flex dense."""
    dm = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=1.0, topp=0.0, mode="topk"))
    dense = {}
    for t in (False, True):
        dense[f"fwd_tma{int(t)}"] = bench(lambda t=t: K.forward.attention_fwd_triton(
            q, k, v, dm.kv_num_blocks, dm.kv_indices, scale, False, 128, 64, use_tma=t), rep=50)
    dbm = dm.to_flex()
    dense["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=dbm), rep=50)
    print("dense", dense, flush=True)
    return dense


def transpose(res, num, idx) -> None:
    """The backward's transposed index: the Triton builder vs the previous torch sort."""
    res["transpose_sort"] = bench(lambda: sort_transpose(num, idx, idx.shape[-1]))
    res["transpose_new"] = bench(lambda: K.torch_impl.transpose_indices(num, idx, idx.shape[-1]))
    qn1, qi1 = sort_transpose(num, idx, idx.shape[-1])
    qn2, qi2 = K.torch_impl.transpose_indices(num, idx, idx.shape[-1])
    res["transpose_equal"] = bool(torch.equal(qn1, qn2) and torch.equal(qi1.int(), qi2))


def backward_settings(which: str) -> list[dict]:
    bvars = [dict()]
    if which == "all":
        for t in (False, True):
            bvars += [dict(use_tma=t, dq_warps=w, dq_stages=s) for (w, s) in ((8, 2), (8, 3), (4, 2), (4, 3))]
            bvars += [dict(use_tma=t, dkdv_warps=4, dkdv_stages=3),
                      dict(use_tma=t, dkdv_warps=8, dkdv_stages=2),
                      dict(use_tma=t, sub_m=32, dkdv_warps=4, dkdv_stages=3),
                      dict(use_tma=t, sub_m=128, dkdv_warps=8)]
    return bvars + [dict(dkdv_stages=3), dict(sub_m=32, dkdv_stages=3)]  # dK/dV stages and slice rows


def backward_variants(do, q, k, v, num, idx, scale, ref, ref_lse, which: str) -> dict:
    """Backward time and gradient errors (first 2 heads, vs float32) per setting."""
    o, lse = K.forward.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
    qf, kf, vf = (x[:, :2].float() for x in (q, k, v))
    gref = K.torch_impl.attention_bwd(do[:, :2].float(), qf, kf, vf, ref, ref_lse, num[:, :2], idx[:, :2],
                                    scale, False, 128, 64)
    bwd = {}
    for var in backward_settings(which):
        name = "bwd_" + ("_".join(f"{a}{int(b)}" for a, b in var.items()) or "default")
        bwd[name] = checked_time(
            lambda var=var: K.backward.attention_bwd_triton(do, q, k, v, o, lse, num, idx, scale, False,
                                                            128, 64, **var),
            lambda grads: [rel(a[:, :2], b) for a, b in zip(grads, gref)])
        print(name, bwd[name], flush=True)
    return bwd


def totals(res, q, k, v, do, cfg, flex) -> None:
    """The whole op, forward and forward+backward, against Flex at 128x128 blocks."""
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    res["sparge_fwdbwd_total"] = bench(lambda: sc.sparse_attention(qg, kg, vg, config=cfg).backward(do))
    res["sparge_fwd_total"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
    bm128 = sc.predict_block_mask(q, k, config=cfg.replace(block_k=128)).to_flex()
    res["flex128_fwdbwd"] = bench(lambda: flex(qg, kg, vg, block_mask=bm128).backward(do))
    res["flex128_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm128))


def run(args) -> dict:
    require_cuda("tune")
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    B, H, N, D = 1, 12, args.n, args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    scale = D ** -0.5
    flex = torch.compile(flex_attention)
    res["shape"] = [B, H, N, D]
    cfg = sc.SpargeConfig(topk=round(1 - args.sparsity, 4), topp=0.0, mode="topk")
    m = sc.predict_block_mask(q, k, config=cfg)
    num, idx = m.kv_num_blocks, m.kv_indices
    res["sparsity"] = m.sparsity()
    prediction(res, q, k, cfg, N, D)
    ref, ref_lse = K.torch_impl.attention_fwd(q[:, :2].float(), k[:, :2].float(), v[:, :2].float(),
                                            num[:, :2], idx[:, :2], scale, False, 128, 64)
    print(json.dumps(res), flush=True)
    res["fwd"] = forward_variants(q, k, v, num, idx, scale, ref, args.fwd_variants)
    bm = m.to_flex()
    res["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm))
    res["dense"] = dense_mask(q, k, v, scale, flex)
    transpose(res, num, idx)
    res["bwd"] = backward_variants(do, q, k, v, num, idx, scale, ref, ref_lse, args.bwd_variants)
    res["compiler"] = compiler_report()
    for row in res["compiler"]:
        print(row, flush=True)
    totals(res, q, k, v, do, cfg, flex)
    print(json.dumps({k: v for k, v in res.items() if k not in ("fwd", "bwd")}), flush=True)
    O.write_json(Path(args.out) / f"tune_{N}x{D}_{int(round(args.sparsity * 100))}.json", res)
    return res


main = module_entry(__spec__.name)  # python -m bench.tools.tune_kernels [options]

if __name__ == "__main__":
    raise SystemExit(main())
