"""Per-kernel GPU times (torch.profiler) of mask prediction, forward and backward at 95% sparsity
on the Wan2.1-1.3B attention shape, CUDA-graph timings that exclude launch overhead, and the
compiler's report per kernel (registers, spills, shared memory, programs per SM), and the host
cost of each layer of one call at a small shape.

    python -m bench profile --out results         # writes results/profile.txt
    python -m bench profile --n 75600 --d 64 --out results
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparge_compile as sc
from bench.cli import module_entry
from bench.tools import require_cuda

COMMON_ARGS = False  # no --quick: a GPU tool


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--n", type=int, default=32768, help="sequence length of the profile (default 32768)")
    p.add_argument("--d", type=int, default=128, help="head dim of the profile (default 128)")


def compiler_report() -> list[dict]:
    """Registers per thread, spilled registers, shared memory and the resulting programs per SM
    (register file 64K, 228 KB shared memory on Hopper) of every compiled sparge kernel."""
    from sparge_compile.kernels import backward, forward, mask, transpose

    rows = []
    for mod in (forward, backward, mask, transpose):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for dev_cache in caches.values():
                kernels = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for kern in kernels.values():
                    try:
                        kern._init_handles()
                        warps, shared = kern.metadata.num_warps, kern.metadata.shared
                        regs, spills = kern.n_regs, kern.n_spills
                    except Exception as e:  # a Triton without these fields: skip
                        rows.append({"kernel": name, "error": str(e)[:120]})
                        continue
                    by_regs = 65536 // max(1, regs * 32 * warps)
                    by_smem = (228 * 1024) // shared if shared else 32
                    rows.append({"kernel": name, "warps": warps, "stages": kern.metadata.num_stages,
                                 "regs": regs, "spills": spills, "shared_kb": round(shared / 1024, 1),
                                 "programs_per_sm": min(by_regs, by_smem, 64 // warps)})
    return rows


def host_us(fn, iters: int = 200) -> float:
    """Microseconds per call with no sync inside the loop: on a tiny problem the GPU is idle
    most of the time, so this is the host (Python, dispatch, launch) cost of one call."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / iters * 1e6, 1)


def host_report() -> dict:
    """Host cost of each layer of one call, at a shape whose GPU time is small (N = 8192, 97%)."""
    from sparge_compile import ops
    from sparge_compile.kernels import forward as fwd
    from sparge_compile.kernels import mask
    from sparge_compile.validate import check_qkv

    B, H, N, D = 1, 12, 8192, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    cfg = sc.SpargeConfig(topk=0.03, topp=0.0, mode="topk")
    m = sc.predict_block_mask(q, k, config=cfg)
    num, idx, scale = m.kv_num_blocks, m.kv_indices, D ** -0.5
    rule = (0.03, 0.0, "topk", 128, 64)
    res = {
        "check_qkv": host_us(lambda: check_qkv(q, k, v, None)),
        "predict_block_mask": host_us(lambda: sc.predict_block_mask(q, k, config=cfg)),
        "predict_op": host_us(lambda: ops.predict_block_mask_op(q, k, scale, False, *rule)),
        "predict_triton": host_us(lambda: mask.predict_mask_triton(q, k, scale, False, *rule)),
        "pool_qk_triton": host_us(lambda: mask.pool_qk_triton(q, k, 128, 64)),
        "sparse_attention_mask_given": host_us(lambda: sc.sparse_attention(q, k, v, block_mask=m)),
        "fwd_op": host_us(lambda: ops.block_sparse_attention_op(q, k, v, num, idx, scale, False, 128, 64)),
        "fwd_triton_tma": host_us(lambda: fwd.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)),
        "fwd_triton_ptr": host_us(lambda: fwd.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64,
                                                                   use_tma=False)),
        "tma_descriptors_x2": host_us(lambda: (fwd.descriptor(k, 64), fwd.descriptor(v, 64))),
        "sparse_attention_total": host_us(lambda: sc.sparse_attention(q, k, v, config=cfg)),
        "fwd_bwd_total": host_us(lambda: sc.sparse_attention(qg, kg, vg, config=cfg).backward(do), iters=100),
    }
    return res


def timings(q, k, v, do, cfg) -> dict:
    """Prediction and forward from CUDA graphs (no launch cost) and eager; eager fwd+bwd."""
    import triton

    res = {}
    with torch.no_grad():
        res["predict_graph"] = triton.testing.do_bench_cudagraph(
            lambda: sc.predict_block_mask(q, k, config=cfg))
        res["fwd_total_graph"] = triton.testing.do_bench_cudagraph(
            lambda: sc.sparse_attention(q, k, v, config=cfg))
        res["predict_eager"] = triton.testing.do_bench(lambda: sc.predict_block_mask(q, k, config=cfg),
                                                       return_mode="median")
        res["fwd_total_eager"] = triton.testing.do_bench(lambda: sc.sparse_attention(q, k, v, config=cfg),
                                                         return_mode="median")
    res["fwdbwd_eager"] = triton.testing.do_bench(
        lambda: sc.sparse_attention(q, k, v, config=cfg).backward(do), return_mode="median")
    return res


def kernel_table(q, k, v, do, cfg) -> str:
    """torch.profiler's per-kernel table of 5 forward+backward calls (after 3 warm-up calls)."""
    for _ in range(3):
        sc.sparse_attention(q, k, v, config=cfg).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            sc.sparse_attention(q, k, v, config=cfg).backward(do)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=40)


def run(args) -> dict:
    require_cuda("profile")
    B, H, N, D = 1, 12, args.n, args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk")
    do = torch.randn_like(q)
    res = timings(q, k, v, do, cfg)
    print(json.dumps(res), flush=True)
    table = kernel_table(q, k, v, do, cfg)
    print(table)
    res["host_us"] = host_report()
    print("host_us", json.dumps(res["host_us"]), flush=True)
    res["compiler"] = compiler_report()
    for row in res["compiler"]:
        print(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(json.dumps(res) + "\n" + table)
    return res


main = module_entry(__spec__.name)  # python -m bench.tools.profile_kernels [options]

if __name__ == "__main__":
    raise SystemExit(main())
