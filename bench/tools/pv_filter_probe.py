# ruff: noqa: E501, E731
"""SpargeAttn's P·V filter (SpargeConfig.pv_threshold) in the forward kernel: time and error
against the unfiltered kernel on the same mask, model-like (structured) and random inputs,
12 heads x 32768 tokens x 128, at 90% / 95%.

    PYTHONPATH=. python bench/tools/pv_filter_probe.py      # CUDA; writes $OUT/pv_filter_probe.json
"""
import json
import os

import torch
import triton

import sparge_compile as sc
from bench.data import structured_qkv
from sparge_compile.kernels import forward


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    N = 32768
    data = {"structured": structured_qkv(1, 12, 12, N, 128, "cuda", torch.bfloat16, seed=1),
            "random": tuple(torch.randn(1, 12, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))}
    for kind, (q, k, v) in data.items():
        for target in (0.90, 0.95):
            m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=1 - target, topp=0.0))
            args = (m.kv_num_blocks, m.kv_indices, 128 ** -0.5, False, 128, 64)
            base, _ = forward.attention_fwd_triton(q, k, v, *args)
            res[f"{kind} {target:.0%} no filter ms"] = triton.testing.do_bench(lambda: forward.attention_fwd_triton(q, k, v, *args))
            for lam in (2.0, 4.0, 8.0):
                out, _ = forward.attention_fwd_triton(q, k, v, *args, pv_threshold=lam)
                res[f"{kind} {target:.0%} lambda {lam:g} rel diff vs unfiltered"] = ((out.float() - base.float()).norm() / base.float().norm()).item()
                res[f"{kind} {target:.0%} lambda {lam:g} ms"] = triton.testing.do_bench(
                    lambda: forward.attention_fwd_triton(q, k, v, *args, pv_threshold=lam))
            print(json.dumps(res, indent=0), flush=True)
    json.dump(res, open(f"{os.environ.get('OUT', '/tmp')}/pv_filter_probe.json", "w"), indent=1)


if __name__ == "__main__":
    main()
