"""A DiT (diffusers DiTTransformer2DModel, random weights) compiled with backend="sparge" vs
backend="inductor": forward step time and the output difference.

    python -m bench dit --out results          # CUDA, bf16, DiT-L/2 shape at 1024 px
    python -m bench dit --latent 256 --layers 12 --out results   # 16384 tokens
    python -m bench dit --quick --out /tmp/b   # CPU, tiny, a smoke test

Default shape: DiT-L/2 (24 layers, 16 heads x 64 = 1024 wide), 128x128 latents, patch 2 ->
4096 tokens (DiT-XL/2 has head dim 72, which the sparse op does not take, so it would stay
dense). Times are medians of triton.testing.do_bench (CUDA) or of a timed loop (CPU).
Writes ``backend_dit.json`` and ``backend_dit.md`` under --out. The model is
:func:`bench.models.diffusers_dit`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import sparge_compile as sc
from bench import common as C
from bench import output as O
from bench.cli import module_entry
from bench.models import diffusers_dit

COLUMNS = [("backend", "backend"), ("forward_ms", "forward ms (median)"), ("speedup", "speed-up"),
           ("rel_err_vs_eager", "rel. L2 err vs eager"), ("first_call_s", "first call s")]


def add_args(p: argparse.ArgumentParser) -> None:
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


QUICK = dict(layers=2, heads=2, head_dim=32, latent=16, block_q=16, block_k=16, min_seq_len=0, reps=3,
             topk=0.3, topp=0.5)


def _sizes(args) -> None:
    """--quick: a tiny model (QUICK, for every option left at its default)."""
    if args.quick:
        C.quick_defaults(args, add_args, QUICK)


def time_variants(variants: dict, inputs, device, reps: int) -> tuple[dict, dict]:
    """Per variant: first-call seconds and median forward ms; and each variant's output."""
    results, outs = {}, {}
    with torch.no_grad():
        for name, m in variants.items():
            t0 = time.perf_counter()
            outs[name] = m(*inputs).sample
            first = time.perf_counter() - t0
            C.sync(device)
            ms = C.time_fn(lambda m=m: m(*inputs), device, warmup=25, rep=reps * 10, cpu_iters=reps,
                           cpu_warmup=False)
            results[name] = dict(forward_ms=ms, first_call_s=first)
    return results, outs


def summarize(args, device, dtype, rep, results) -> dict:
    sparsities = [s.sparsity for s in rep.rewritten if s.sparsity is not None]
    tokens = (args.latent // args.patch) ** 2
    return dict(
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


def run(args) -> dict:
    _sizes(args)
    device = C.pick_device(args.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = diffusers_dit(args.layers, args.heads, args.head_dim, args.latent, args.patch, device, dtype)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    cfg = sc.SpargeConfig(topk=args.topk, topp=args.topp, block_q=args.block_q, block_k=args.block_k,
                          min_seq_len=args.min_seq_len)
    be = sc.backend(config=cfg, inner=args.inner)
    variants = {"eager": model, args.inner: torch.compile(model, backend=args.inner),
                "sparge": torch.compile(model, backend=be)}
    results, outs = time_variants(variants, (x, t, y), device, args.reps)
    base = results[args.inner]["forward_ms"]
    for name, r in results.items():
        r["speedup_vs_" + args.inner] = base / r["forward_ms"]
        r["rel_err_vs_eager"] = C.rel_l2(outs[name], outs["eager"])
    summary = summarize(args, device, dtype, be.report(), results)
    write(summary, args, Path(args.out))
    return summary


def write(summary: dict, args, out: Path) -> None:
    m, rows = summary["model"], []
    for name, r in summary["results"].items():
        rows.append(dict(r, backend=name, speedup=f"{r['speedup_vs_' + args.inner]:.2f}x"))
    head = (f"DiT {m['layers']} layers, {m['heads']}x{m['head_dim']} heads, {m['tokens']} tokens, batch "
            f"{m['batch']}, {summary['dtype']} on {summary['device']}\nsparge: {summary['sites_rewritten']}/"
            f"{summary['sites']} attention sites rewritten, mean sparsity "
            + ("-" if summary["mean_sparsity"] is None else f"{summary['mean_sparsity']:.1%}"))
    tab = O.table(rows, [(k, h.replace("speed-up", f"speed-up vs {args.inner}")) for k, h in COLUMNS])
    print(head + "\n" + tab, flush=True)
    env = C.environment(torch.device("cuda" if summary["device"] != "cpu" else "cpu"))
    O.write_markdown(out / "backend_dit.md", 'A diffusers DiT through backend="sparge"',
                     [("Result", head + "\n\n" + tab)], env, O.command_line())
    O.write_json(out / "backend_dit.json", summary)
    print(f"wrote {out / 'backend_dit.json'}", flush=True)


main = module_entry(__spec__.name)  # python -m bench.dit [options]

if __name__ == "__main__":
    raise SystemExit(main())
