"""Per-kernel GPU times (torch.profiler) of mask prediction, forward and backward at 95% sparsity
on the Wan2.1-1.3B attention shape, CUDA-graph timings that exclude launch overhead, and the
compiler's report per kernel (registers, spills, shared memory, programs per SM).

    PYTHONPATH=. python bench/profile_kernels.py
"""
from __future__ import annotations

import json
import os

import torch
import triton

import sparge_compile as sc


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
                    rows.append({"kernel": name, "warps": warps, "stages": kern.metadata.num_stages, "regs": regs, "spills": spills,
                                 "shared_kb": round(shared / 1024, 1),
                                 "programs_per_sm": min(by_regs, by_smem, 64 // warps)})
    return rows


def main():
    B, H, N, D = 1, 12, 32768, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.05, topp=0.0, mode="topk")
    do = torch.randn_like(q)
    res = {}
    with torch.no_grad():
        res["predict_graph"] = triton.testing.do_bench_cudagraph(lambda: sc.predict_block_mask(q, k, config=cfg))
        res["fwd_total_graph"] = triton.testing.do_bench_cudagraph(lambda: sc.sparse_attention(q, k, v, config=cfg))
        res["predict_eager"] = triton.testing.do_bench(lambda: sc.predict_block_mask(q, k, config=cfg),
                                                       return_mode="median")
        res["fwd_total_eager"] = triton.testing.do_bench(lambda: sc.sparse_attention(q, k, v, config=cfg),
                                                         return_mode="median")
    res["fwdbwd_eager"] = triton.testing.do_bench(
        lambda: sc.sparse_attention(q, k, v, config=cfg).backward(do), return_mode="median")
    print(json.dumps(res), flush=True)
    for _ in range(3):
        sc.sparse_attention(q, k, v, config=cfg).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            sc.sparse_attention(q, k, v, config=cfg).backward(do)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=40)
    print(table)
    res["compiler"] = compiler_report()
    for row in res["compiler"]:
        print(row)
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile.txt"), "w") as f:
        f.write(json.dumps(res) + "\n" + table)


if __name__ == "__main__":
    main()
