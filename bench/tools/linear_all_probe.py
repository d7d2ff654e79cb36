# ruff: noqa: E501, E731
"""SLA's all-keys term (kernels/linear_all.py) on the H200: the states kernel's launch variants
(key rows per tile, warps, programs, stages) and the output kernel's (query rows, warps) at
B=1, H=12, N=32768, D=128, bf16, 95%: correctness against the fp32 definition first, then
do_bench medians in ms, the sparse forward alone in the same run. (The earlier sweep of a
transposed K load, S's columns split over programs and the term in the forward's epilogue is in
docs/results/2026-12-04d-h200/; none won.)

    PYTHONPATH=. python bench/tools/linear_all_probe.py     # CUDA; writes $OUT/linear_all_probe.json
"""
import itertools
import json
import os
from pathlib import Path

import torch
import triton

from bench import output as O
from sparge_compile import kernels
from sparge_compile import linear_branch as lb
from sparge_compile.kernels import forward, linear_all

B, H, N, D = 1, 12, 32768, 128


def bench(fn):
    return round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def sweep(rows, grid, run):
    for cfg in grid:
        try:
            row = {**cfg, **run(cfg)}
        except Exception as e:   # a launch that does not fit (shared memory, registers)
            row = {**cfg, "error": repr(e)[:200]}
        rows.append(row)
        print(row, flush=True)
    return min((r for r in rows if "ms" in r and r["rel"] < 1e-2), key=lambda r: r["ms"])


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    k = k + torch.randn(B, H, N, 1, device="cuda", generator=g).to(k.dtype)   # structured keys
    w = torch.randn(D, D, device="cuda", generator=g) * D ** -0.5
    bias = torch.randn(D, device="cuda", generator=g) * 0.1
    num, idx = kernels.predict_mask(q, k, D ** -0.5, False, 0.05, 0.0, "topk", 128, 64)
    res = {"sparsity": 1 - float(num.float().mean()) / idx.shape[-1], "states": [], "term": []}
    S_ref = (lb.feature_map(k.float(), "softmax").transpose(-1, -2) @ v.float()).reshape(B * H, D, D)
    grid = [dict(block_n=bn, num_warps=nw, programs=p, num_stages=st)
            for bn, nw, p, st in itertools.product((32, 64), (4, 8), (128, 256, 512), (2, 3))]

    def states(cfg):
        S, _ = linear_all.total_states(k, v, "softmax", **cfg)
        return {"rel": rel(S, S_ref), "ms": bench(lambda: linear_all.total_states(k, v, "softmax", **cfg))}

    res["best_states"] = sweep(res["states"], grid, states)
    linear_all.STATES_LAUNCH.update({c: res["best_states"][c] for c in ("block_n", "num_warps", "programs", "num_stages")})
    args = (q, k, v, num, idx, D ** -0.5, False, 128, 64)
    out_s, _ = forward.attention_fwd_triton(*args)
    want = lb.sla_all_output(out_s.float(), q.float(), k.float(), v.float(), w, bias, "softmax", 1e-5)
    folded = linear_all.folded_states(k, v, w, bias)

    def term(cfg):
        linear_all.OUT_LAUNCH.update(cfg)
        got = linear_all.add_term(out_s, q, *folded)
        return {"rel": rel(got, want), "ms": bench(lambda: linear_all.add_term(out_s, q, *folded))}

    res["best_term"] = sweep(res["term"], [dict(block_m=bm, num_warps=nw) for bm, nw in itertools.product((32, 64, 128), (4, 8))], term)
    linear_all.OUT_LAUNCH.update({c: res["best_term"][c] for c in ("block_m", "num_warps")})
    res["folded_states_ms"] = bench(lambda: linear_all.folded_states(k, v, w, bias))
    res["sparse_fwd_ms"] = bench(lambda: forward.attention_fwd_triton(*args))
    res["sparse_plus_term_ms"] = bench(lambda: linear_all.sla_all_fwd_triton(forward.attention_fwd_triton(*args)[0], q, k, v, w, bias))
    res["ratio"] = res["sparse_plus_term_ms"] / res["sparse_fwd_ms"]
    print(json.dumps({k_: v_ for k_, v_ in res.items() if k_ not in ("states", "term")}, indent=1), flush=True)
    O.write_json(Path(os.environ.get("OUT", "out")) / "linear_all_probe.json", res)


if __name__ == "__main__":
    main()
