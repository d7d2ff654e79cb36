"""The demo: a small DiT compiled with backend="sparge"; prints the report, the output error
against the dense model and, on a GPU, the speed-up.

    python -m sparge_compile.demo            # CPU: a tiny DiT; GPU: 4096 tokens, bf16
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import sparge_compile as sc
from sparge_compile.models.dit import DiT


def _time(fn, device):
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    t = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t) / 3 * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--topp", type=float, default=0.2)
    ap.add_argument("--image-size", type=int, default=None, help="latent side (tokens = side^2)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    side = args.image_size or (64 if cuda else 16)
    block = dict(block_q=128, block_k=64) if cuda else dict(block_q=32, block_k=16)
    torch.manual_seed(0)
    dense = DiT(image_size=side, patch=1, in_ch=4, dim=384 if cuda else 64, depth=4 if cuda else 2,
                heads=6 if cuda else 2, zero_init=False).to(device=device, dtype=dtype).eval()
    model = copy.deepcopy(dense)
    opts = dict(topk=args.topk, topp=args.topp, min_seq_len=0, **block)
    if not cuda:
        opts["inner"] = "aot_eager"  # no C++ compiler needed on a CPU-only machine
    sparse = torch.compile(model, backend="sparge", options=opts)
    x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    t = torch.rand(2, device=device, dtype=dtype)
    print(f"sparge demo: DiT with {side * side} tokens, {len(dense.blocks)} blocks, {device}, {dtype}")
    with torch.no_grad():
        ref = dense(x, t)
        out = sparse(x, t)
    print(sc.explain(sparse))
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    print(f"\noutput relative L2 error vs the dense model: {err:.4f}")
    if cuda:
        dense_c = torch.compile(dense)
        with torch.no_grad():
            td = _time(lambda: dense_c(x, t), device)
            ts = _time(lambda: sparse(x, t), device)
        print(f"forward: dense (inductor) {td:.3f} ms, sparge {ts:.3f} ms, speed-up {td / ts:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
