"""Head-dim timing (GPU): the sparse kernels at B=1, H=12, N=32768, bf16, random data, for the
power-of-two head dims 64 and 128 and the padded 72 and 80 (run in a 128-wide tile).

Per head dim: SDPA's dense attention; the sparse forward with a dense block mask (every block
kept: the kernel against SDPA) and with the predicted mask (default config), K/V through TMA
and through pointer loads; the backward on the predicted mask, both ways; the mask prediction.
Fixed launch settings (no autotune), ``triton.testing.do_bench`` medians in ms.

    PYTHONPATH=. python -m bench headdim --out OUT [--dims 64,128,72,80]   (writes OUT/headdim.json)
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from bench.cli import module_entry
from bench.tools import require_cuda

B, H, N = 1, 12, 32768
BLOCK_Q, BLOCK_K = 128, 64


def time_ms(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def dense_mask(nq: int, nk: int, device):
    num = torch.full((B, H, nq), nk, dtype=torch.int32, device=device)
    idx = torch.arange(nk, dtype=torch.int32, device=device).expand(B, H, nq, nk).contiguous()
    return num, idx


def run_head_dim(D: int) -> dict:
    """Timings and errors at one head dim (see the module docstring)."""
    from sparge_compile import kernels
    from sparge_compile.kernels import backward, forward

    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    scale = D ** -0.5
    nq, nk = triton.cdiv(N, BLOCK_Q), triton.cdiv(N, BLOCK_K)
    ref = F.scaled_dot_product_attention(q, k, v)
    res = {"sdpa_ms": time_ms(lambda: F.scaled_dot_product_attention(q, k, v))}
    predict = partial(kernels.predict_mask, q, k, scale, False, 0.03, 0.2, "hybrid", BLOCK_Q, BLOCK_K)
    res["predict_ms"] = time_ms(predict)
    masks = {"dense": dense_mask(nq, nk, q.device), "predicted": predict()}
    res["predicted_sparsity"] = round(1 - float(masks["predicted"][0].float().mean()) / nk, 4)
    for tma in (True, False):
        for name, (num, idx) in masks.items():
            fwd_args = (q, k, v, num, idx, scale, False, BLOCK_Q, BLOCK_K)
            out, lse = forward.attention_fwd_triton(*fwd_args, use_tma=tma)
            res[f"fwd_{name}_tma{int(tma)}_ms"] = time_ms(partial(forward.attention_fwd_triton, *fwd_args,
                                                                  use_tma=tma))
            if name == "dense":
                res[f"fwd_dense_tma{int(tma)}_err_vs_sdpa"] = round(rel(out, ref), 5)
            else:
                bwd_args = (dout, q, k, v, out, lse, num, idx, scale, False, BLOCK_Q, BLOCK_K)
                bwd = partial(backward.attention_bwd_triton, *bwd_args, use_tma=tma)
                res[f"bwd_predicted_tma{int(tma)}_ms"] = time_ms(bwd)
    res["fwd_dense_over_sdpa"] = round(res["fwd_dense_tma1_ms"] / res["sdpa_ms"], 3)
    return res


COMMON_ARGS = False  # no --quick: a GPU tool


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-results", help="folder for headdim.json")
    p.add_argument("--dims", default="64,128,72,80", help="head dims, comma-separated")


def run(args) -> dict:
    require_cuda("headdim")
    from sparge_compile.kernels import tuning

    tuning.AUTOTUNE = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": {"B": B, "H": H, "N": N, "dtype": "bfloat16", "block_q": BLOCK_Q, "block_k": BLOCK_K},
           "dims": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for D in (int(d) for d in args.dims.split(",")):
        res["dims"][D] = run_head_dim(D)
        print(D, json.dumps(res["dims"][D]), flush=True)
        # after every head dim: a run cut short keeps what it measured
        (out / "headdim.json").write_text(json.dumps(res, indent=1))
    return res


main = module_entry(__spec__.name)  # python -m bench.tools.headdim [options]

if __name__ == "__main__":
    raise SystemExit(main())
