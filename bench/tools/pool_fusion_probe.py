"""Does Inductor fuse a block mean of q into the kernel that produces q (issue 21: a mask
prediction that reads no extra bytes)? A Wan-like producer (projection, RMS norm over the head
dim, RoPE) followed by the pooling the mask needs (mean over each block of 128 tokens, fp32),
compiled with Inductor on this device: the generated kernels, and on CUDA the producer's time
with and without the pooled output against pooling alone.

    PYTHONPATH=. python -m bench.tools.pool_fusion_probe [--tokens 32768]   # CUDA or CPU

On the CPU (2026-12-04, torch 2.13) one C++ kernel holds norm, RoPE and the block mean. On
CUDA, Triton kernels tile reductions per axis: whether the token-axis mean shares a kernel with
the head-dim norm is what this run shows (kernel count and times).
"""
from __future__ import annotations

import argparse

import torch
from torch._inductor.utils import run_and_get_code

H, D, BQ = 12, 128, 128


def producer(x, w, g, cos, sin, pool: bool):
    B, N = x.shape[:2]
    q = (x @ w).view(B, N, H, D)
    q = (q.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-6) * g).to(x.dtype)
    q1, q2 = q.chunk(2, -1)
    q = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], -1)
    if not pool:
        return q
    return q, q.view(B, N // BQ, BQ, H, D).float().mean(2)


def kernels_in(code: str) -> list[str]:
    """Names of the generated kernels a compiled call launches (Triton or C++)."""
    names = []
    for line in code.splitlines():
        line = line.strip()
        for tag in ("triton_", "cpp_fused_"):
            if line.startswith(tag) and ".run(" in line or line.startswith(tag) and line.endswith(")"):
                names.append(line.split("(")[0].split(".")[0])
                break
    return sorted(set(names))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N = a.tokens if dev == "cuda" else 1024
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(1, N, H * D, device=dev, dtype=dt)
    w = torch.randn(H * D, H * D, device=dev, dtype=dt) * (H * D) ** -0.5
    g = torch.randn(D, device=dev)
    cos, sin = (torch.randn(N, 1, D // 2, device=dev, dtype=dt) for _ in range(2))
    res = {}
    for pool in (False, True):
        fn = torch.compile(lambda *t, pool=pool: producer(*t, pool=pool))
        _, code = run_and_get_code(fn, x, w, g, cos, sin)
        res[f"pool={pool} kernels"] = kernels_in(code[0])
        if dev == "cuda":
            from triton.testing import do_bench

            res[f"pool={pool} ms"] = do_bench(lambda fn=fn: fn(x, w, g, cos, sin), return_mode="median")
    if dev == "cuda":
        from triton.testing import do_bench

        q = producer(x, w, g, cos, sin, False)
        pool_alone = torch.compile(lambda q: q.view(1, N // BQ, BQ, H, D).float().mean(2))
        res["pooling alone ms"] = do_bench(lambda: pool_alone(q), return_mode="median")
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
