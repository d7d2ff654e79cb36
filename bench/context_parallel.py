"""Context-parallel block-sparse attention: per-rank time of Ulysses, ring and both against one GPU.

    torchrun --nproc-per-node 8 -m bench.context_parallel                 # Wan2.1-14B attention
    torchrun --nproc-per-node 2 -m bench.context_parallel --device cpu --tokens 1024 --heads 4 --dim 32

Shape by default: B=1, 40 heads, D=128, 75600 tokens rounded up to a multiple of P x 128 (the ring
needs block-aligned shards), bf16 on CUDA; the top-k rule at ``--sparsity`` (uniform count per row).
Each rank times forward and forward+backward (CUDA events on GPUs, wall clock on the CPU; median
of ``--iters``); rank 0 also times the single-process op on the whole sequence and prints one JSON
line per method: per-rank medians, the slowest rank, and scaling efficiency t_1 / (P * t_P).
Not yet run on several GPUs (the device lends one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import sparge_compile as sc


def _timer(fn, iters: int, device) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fwd_bwd(attn, q, k, v):
    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def both():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attn(*leaves).backward(torch.ones_like(q))
    return fwd, both


def _methods(cfg, P: int):
    methods = {"ulysses": lambda q, k, v: sc.ulysses_attention(q, k, v, config=cfg),
               "ring": lambda q, k, v: sc.ring_attention(q, k, v, config=cfg)}
    if P >= 4 and P % 2 == 0:
        ug, rg = sc.usp_groups(2, P // 2)
        methods[f"usp-2x{P // 2}"] = lambda q, k, v: sc.usp_attention(q, k, v, ug, rg, config=cfg)
    return methods


def _single(args, cfg, device, dtype, N: int):
    """Forward and forward+backward seconds of the single-process op on the whole sequence."""
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, N, args.dim, device=device, dtype=dtype,
                           generator=g) for _ in range(3))
    fwd, both = _fwd_bwd(lambda *t: sc.sparse_attention(*t, config=cfg), q, k, v)
    return _timer(fwd, args.iters, device), _timer(both, args.iters, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=75600)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        os.environ["TRITON_INTERPRET"] = "0"   # the CPU user's PyTorch path
    dtype = torch.bfloat16 if cuda else torch.float32
    bq, bk = (128, 64) if cuda else (32, 32)
    N = -(-args.tokens // (P * bq)) * P * bq
    cfg = sc.SpargeConfig(topk=1 - args.sparsity, topp=0.0, mode="topk", block_q=bq, block_k=bk,
                          min_seq_len=0)
    g = torch.Generator(device).manual_seed(1 + rank)
    q, k, v = (torch.randn(1, args.heads, N // P, args.dim, device=device, dtype=dtype,
                           generator=g) for _ in range(3))
    rows = []
    for name, attn in _methods(cfg, P).items():
        fwd, both = _fwd_bwd(attn, q, k, v)
        mine = [_timer(fwd, args.iters, device), _timer(both, args.iters, device)]
        every = [None] * P
        dist.all_gather_object(every, mine)
        rows.append((name, every))
    single = _single(args, cfg, device, dtype, N) if rank == 0 else None
    if rank == 0:
        for name, every in rows:
            slow = [max(t[i] for t in every) for i in (0, 1)]
            print(json.dumps({"method": name, "ranks": P, "tokens": N, "heads": args.heads, "dim": args.dim,
                              "sparsity": args.sparsity, "per_rank_fwd_s": [t[0] for t in every],
                              "per_rank_fwd_bwd_s": [t[1] for t in every], "slowest_fwd_s": slow[0],
                              "slowest_fwd_bwd_s": slow[1], "single_fwd_s": single[0],
                              "single_fwd_bwd_s": single[1],
                              "efficiency_fwd": single[0] / (P * slow[0]),
                              "efficiency_fwd_bwd": single[1] / (P * slow[1])}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
