"""The native path on a GPU: correctness under Inductor, host time per call, prediction time.

    PYTHONPATH=. python -m bench.tools.native_check --out $OUT

1. A small attention stack compiled with backend="sparge" (Inductor) on the native path and
   on the Python-op path (SPARGE_NATIVE's switch, site_ops.NATIVE_DEVICES): outputs, gradients
   and reports compared; the same under mode="reduce-overhead" (CUDA graphs).
2. Host time per sparse attention call: a deep stack at a tiny size (the GPU idle-waits on the
   host), host wall time per step / attention calls, native vs Python ops vs dense inductor.
3. Prediction GPU time at B=1, H=12, N=32768, D=128, ~95%: the eager op (3 launches), the
   native op on pooled inputs, and pooling fused into a RoPE-like producer under Inductor.
Writes native_check.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

import sparge_compile as sc
from sparge_compile import native_ops, ops, site_ops


class Attn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def stack(depth, dim, heads):
    return nn.Sequential(*[Attn(dim, heads) for _ in range(depth)]).cuda().to(torch.bfloat16)


def compiled(model, native: bool, mode=None, cfg=None):
    site_ops.NATIVE_DEVICES = {"cuda"} if native else set()
    torch._dynamo.reset()
    be = sc.backend(config=cfg or sc.SpargeConfig(topk=0.05, topp=0.0, min_seq_len=0))
    return torch.compile(model, backend=be, mode=mode), be


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(res):
    torch.manual_seed(0)
    m = stack(2, 256, 2)
    x = torch.randn(2, 4096, 256, device="cuda", dtype=torch.bfloat16)
    outs, grads, sp = {}, {}, {}
    for native in (True, False):
        cm, be = compiled(m, native)
        xg = x.clone().requires_grad_()
        y = cm(xg)
        y.float().square().mean().backward()
        outs[native], grads[native] = y.detach(), xg.grad
        sites = [s for g in be.graphs for s in g.sites if s.rewritten]
        sp[native] = [s.sparsity for s in sites]
        res[f"native={native}"] = dict(sites=len(sites), sparsity=sp[native],
                                       states_native=[bool(s.state.native) for s in sites])
    res["out_rel_native_vs_ops"] = rel(outs[True], outs[False])
    res["grad_rel_native_vs_ops"] = rel(grads[True], grads[False])
    cm, be = compiled(m, True, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            y = cm(x)
    res["cudagraph_out_rel"] = rel(y, outs[True])
    res["cudagraph_sparsity"] = [s.sparsity for g in be.graphs for s in g.sites if s.rewritten]
    res["cudagraph_calls"] = [s.calls for g in be.graphs for s in g.sites if s.rewritten]
    ok = res["out_rel_native_vs_ops"] < 2e-2 and res["grad_rel_native_vs_ops"] < 5e-2
    res["ok"] = bool(ok and all(res["native=True"]["states_native"]))


def host_time(res, depth=32):
    torch.manual_seed(0)
    m = stack(depth, 64, 1)
    x = torch.randn(1, 1024, 64, device="cuda", dtype=torch.bfloat16)
    variants = {"inductor dense": None, "sparge native": True, "sparge python ops": False}
    for name, native in variants.items():
        if native is None:
            torch._dynamo.reset()
            cm = torch.compile(m, backend="inductor")
        else:
            cm, _ = compiled(m, native)
        with torch.no_grad():
            for _ in range(5):
                cm(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 50
            for _ in range(n):
                cm(x)
            host = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n
        res[name] = dict(host_us_per_step=host * 1e6, wall_us_per_step=wall * 1e6,
                         host_us_per_layer=host * 1e6 / depth)
    d = res["inductor dense"]["host_us_per_layer"]
    for name in ("sparge native", "sparge python ops"):
        res[name]["extra_host_us_per_attention_call"] = res[name]["host_us_per_layer"] - d


def prediction(res, N=32768, H=12, D=128):
    torch.manual_seed(0)
    q = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5
    res["eager_op_ms"] = triton.testing.do_bench(
        lambda: ops.predict_block_mask_op(q, k, scale, False, 0.05, 0.0, "hybrid", 128, 64))
    knobs, _ = native_ops.device_buffers(0.05, 0.0, "cuda")
    qb, kb = native_ops.pool_blocks(q, 128, D), native_ops.pool_blocks(k, 64, D)
    res["native_scores_select_ms"] = triton.testing.do_bench(
        lambda: native_ops.native_block_mask(qb, kb, N, N, scale, False, "hybrid", 128, 64, None, knobs))
    _select_sweep(res, qb, kb, scale, N)
    cos = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)

    def rope(x):
        return x * cos + x.flip(-1) * cos

    def producer_only(a, b):
        return rope(a), rope(b)

    def producer_and_mask(a, b):
        qa, kb_ = rope(a), rope(b)
        pooled = native_ops.pool_blocks(qa, 128, D), native_ops.pool_blocks(kb_, 64, D)
        m = native_ops.native_block_mask(*pooled, N, N, scale, False, "hybrid", 128, 64, None, knobs)
        return qa, kb_, m

    f1, f2 = torch.compile(producer_only), torch.compile(producer_and_mask)
    res["compiled_producer_ms"] = triton.testing.do_bench(lambda: f1(q, k))
    res["compiled_producer_and_mask_ms"] = triton.testing.do_bench(lambda: f2(q, k))
    res["fused_prediction_ms"] = res["compiled_producer_and_mask_ms"] - res["compiled_producer_ms"]
    num, idx = f2(q, k)[2]
    ref = ops.predict_block_mask_op(rope(q), rope(k), scale, False, 0.05, 0.0, "hybrid", 128, 64)
    res["mask_kept_native"], res["mask_kept_ops"] = int(num.sum()), int(ref[0].sum())


def _select_sweep(res, qb, kb, scale, N):
    """The two launches apart, and the selection over its launch settings."""
    from sparge_compile.kernels.mask import block_scores_triton, select_triton

    res["scores_ms"] = triton.testing.do_bench(lambda: block_scores_triton(qb, kb, scale))
    s = block_scores_triton(qb, kb, scale)
    sweep = {}
    for bm in (1, 2, 4, 8, 16):
        for w in (1, 2, 4, 8):
            try:
                sweep[f"m{bm} w{w}"] = triton.testing.do_bench(lambda: select_triton(
                    s, N, N, False, 0.05, 0.0, "hybrid", 128, 64, block_m=bm, num_warps=w))
            except Exception as e:  # noqa: BLE001
                sweep[f"m{bm} w{w}"] = repr(e)[:200]
    res["select_default_ms"] = triton.testing.do_bench(
        lambda: select_triton(s, N, N, False, 0.05, 0.0, "hybrid", 128, 64))
    res["select_hybrid_topp0.2_ms"] = triton.testing.do_bench(
        lambda: select_triton(s, N, N, False, 0.03, 0.2, "hybrid", 128, 64))
    res["select_sweep_ms"] = sweep


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out")
    p.add_argument("--parts", default="check,host,prediction")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for part, fn in (("check", check), ("host", host_time), ("prediction", prediction)):
        if part not in a.parts.split(","):
            continue
        res[part] = {}
        try:
            fn(res[part])
        except Exception:  # noqa: BLE001 - the JSON says what failed
            import traceback
            res[part]["error"] = traceback.format_exc()[-3000:]
        print(part, json.dumps(res[part], indent=1, default=str)[:4000], flush=True)
        (out / "native_check.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if res.get("check", {}).get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
