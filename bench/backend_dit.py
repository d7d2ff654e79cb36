"""A DiT (diffusers DiTTransformer2DModel, random weights) compiled with backend="sparge" vs
backend="inductor": forward step time and the output difference.

    PYTHONPATH=. python bench/backend_dit.py                # CUDA, bf16, DiT-L/2 shape at 1024 px
    PYTHONPATH=. python bench/backend_dit.py --quick        # CPU, tiny, a smoke test

Default shape: DiT-L/2 (24 layers, 16 heads x 64 = 1024 wide), 128x128 latents, patch 2 ->
4096 tokens (DiT-XL/2 has head dim 72, which the sparse op does not take, so it would stay
dense). Times are medians of triton.testing.do_bench (CUDA) or of a timed loop (CPU).
Writes JSON to --out, else to $OUT/backend_dit.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tabulate import tabulate

import sparge_compile as sc


def build_model(args, device, dtype):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                                  in_channels=4, num_layers=args.layers, sample_size=args.latent,
                                  patch_size=args.patch, num_embeds_ada_norm=1000)
    return model.to(device=device, dtype=dtype).eval()


def bench_ms(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps * 10, return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU (smoke test)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--latent", type=int, default=128, help="latent side (tokens = (latent / patch)^2)")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--topk", type=float, default=0.03)
    p.add_argument("--topp", type=float, default=0.2)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--min-seq-len", type=int, default=1024)
    p.add_argument("--inner", default="inductor", help="compiler after the sparge rewrite (and the baseline)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/backend_dit.json if $OUT is set)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.heads, args.head_dim, args.latent = 2, 2, 32, 16
        args.block_q = args.block_k = 16
        args.min_seq_len, args.reps, args.topk, args.topp = 0, 3, 0.3, 0.5
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, device, dtype)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    tokens = (args.latent // args.patch) ** 2

    cfg = sc.SpargeConfig(topk=args.topk, topp=args.topp, block_q=args.block_q, block_k=args.block_k,
                          min_seq_len=args.min_seq_len)
    be = sc.backend(config=cfg, inner=args.inner)
    variants = {
        "eager": model,
        args.inner: torch.compile(model, backend=args.inner),
        "sparge": torch.compile(model, backend=be),
    }
    rows, results, outs = [], {}, {}
    with torch.no_grad():
        for name, m in variants.items():
            t0 = time.perf_counter()
            outs[name] = m(x, t, y).sample
            first = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = bench_ms(lambda m=m: m(x, t, y), device, args.reps)
            results[name] = dict(forward_ms=ms, first_call_s=first)
    rep = be.report()
    sparsities = [s.sparsity for s in rep.rewritten if s.sparsity is not None]
    base = results[args.inner]["forward_ms"]
    for name, r in results.items():
        r["speedup_vs_" + args.inner] = base / r["forward_ms"]
        r["rel_err_vs_eager"] = rel_err(outs[name], outs["eager"])
        rows.append([name, f"{r['forward_ms']:.3f}", f"{r['speedup_vs_' + args.inner]:.2f}x",
                     f"{r['rel_err_vs_eager']:.2e}", f"{r['first_call_s']:.1f}"])
    summary = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
        torch=torch.__version__, model=dict(layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                                            latent=args.latent, patch=args.patch, batch=args.batch,
                                            tokens=tokens),
        config=dict(topk=args.topk, topp=args.topp, block_q=args.block_q, block_k=args.block_k,
                    min_seq_len=args.min_seq_len, inner=args.inner),
        sites=len(rep.sites), sites_rewritten=len(rep.rewritten),
        dense_reasons=sorted({s.reason for s in rep.dense}),
        mean_sparsity=statistics.mean(sparsities) if sparsities else None,
        results=results)
    print(f"DiT {args.layers} layers, {args.heads}x{args.head_dim} heads, {tokens} tokens, batch {args.batch}, "
          f"{summary['dtype']} on {summary['device']}")
    print(f"sparge: {len(rep.rewritten)}/{len(rep.sites)} attention sites rewritten, mean sparsity "
          + ("-" if summary["mean_sparsity"] is None else f"{summary['mean_sparsity']:.1%}"))
    print(tabulate(rows, headers=["backend", "forward ms (median)", f"speed-up vs {args.inner}",
                                  "rel. L2 err vs eager", "first call s"]))
    out = args.out or (os.path.join(os.environ["OUT"], "backend_dit.json") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
