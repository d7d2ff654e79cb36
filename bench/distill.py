"""Distillation recovers quality at ~95% sparsity (issue 5, must-show 2).

1. Train a small DiT (own, ``sparge_compile.models.DiT``: 64x64 RGB, patch 1 -> 4096 tokens,
   head dim 64) with flow matching on procedurally generated images (coloured circles, squares
   and diamonds on gradient backgrounds; the class is the front shape) for a time budget; the
   EMA weights are the teacher.
2. Calibrate three sparse configs to the same sparsity (default 95%) on the teacher's own q/k:
   hybrid (top-k 2.5% + top-p), top-k only, top-p only.
3. For each: the training-free student (teacher weights, sparse attention), then
   ``sc.distill`` against the teacher (same steps, lr, batches), and measure
   (a) the relative velocity error against the teacher on held-out noisy inputs and
   (b) the difference of final samples from the same noise (Euler sampler), before and after.

    python -m bench.distill --out "$OUT"             # GPU, < 8 min on one H100
    python -m bench.distill --quick --out /tmp/d     # CPU smoke run, < 1 min of CPU

Writes ``distill.json``, ``distill.md`` (the table) and ``distill_samples.png`` (rows: teacher,
then each student before / after) under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):   # python bench/distill.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparge_compile as sc  # noqa: E402
from bench import common as C  # noqa: E402
from sparge_compile.distillation import make_student  # noqa: E402
from sparge_compile.models import DiT  # noqa: E402

NUM_CLASSES = 3


# --------------------------------------------------------------------------------------------
# Data: coloured shapes on gradients, generated on the device


def make_images(n: int, size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB images in [-1, 1] (n, 3, size, size) and their class (n,): the front shape's kind
    (0 circle, 1 square, 2 diamond). A gradient background, a smaller shape behind, soft edges."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    ax = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = ax.view(1, -1, 1), ax.view(1, 1, -1)
    theta = rand(n) * 2 * math.pi
    g = (torch.cos(theta).view(-1, 1, 1) * (xx - 0.5) + torch.sin(theta).view(-1, 1, 1) * (yy - 0.5)) + 0.5
    c1, c2 = rand(n, 3) * 1.2 - 0.6, rand(n, 3) * 1.2 - 0.6
    img = c1.view(n, 3, 1, 1) + (c2 - c1).view(n, 3, 1, 1) * g.clamp(0, 1).unsqueeze(1)

    def shape(kind, r):
        cx, cy = r + rand(n) * (1 - 2 * r), r + rand(n) * (1 - 2 * r)
        dx, dy = (xx - cx.view(-1, 1, 1)).abs(), (yy - cy.view(-1, 1, 1)).abs()
        d = torch.where(kind.view(-1, 1, 1) == 0, torch.sqrt(dx ** 2 + dy ** 2),
                        torch.where(kind.view(-1, 1, 1) == 1, torch.maximum(dx, dy), (dx + dy) / 1.3))
        m = torch.sigmoid((r.view(-1, 1, 1) - d) * size * 1.5).unsqueeze(1)
        col = (rand(n, 3) * 2 - 1).sign() * (0.5 + 0.5 * rand(n, 3))   # saturated colours
        return m, col.view(n, 3, 1, 1)

    back = torch.randint(0, NUM_CLASSES, (n,), generator=gen, device=device)
    m, col = shape(back, 0.08 + rand(n) * 0.1)
    img = img * (1 - m) + col * m
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen, device=device)
    m, col = shape(y, 0.15 + rand(n) * 0.15)
    img = img * (1 - m) + col * m
    return img.clamp(-1, 1), y


# --------------------------------------------------------------------------------------------
# Teacher training (flow matching, x_t = (1 - t) x0 + t eps, v = eps - x0)


def train_teacher(args, device, amp) -> tuple[DiT, dict]:
    torch.manual_seed(args.seed)
    model = DiT(image_size=args.image_size, patch=args.patch, in_ch=3, dim=args.dim, depth=args.depth,
                heads=args.heads, num_classes=NUM_CLASSES).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    losses, step = [], 0
    while step < args.train_steps and time.perf_counter() - t0 < args.train_seconds:
        x0, y = make_images(args.batch, args.image_size, gen, device)
        y = torch.where(torch.rand(args.batch, generator=gen, device=device) < 0.1, NUM_CLASSES, y)  # null
        t = sc.logit_normal_timesteps(args.batch, generator=gen, device=device)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        x_t = sc.flow.add_noise(x0, t, eps)
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with amp():
            v = model(x_t, t, y)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item() if step % 50 == 0 or step < 10 else losses[-1])
        if step % 500 == 0:
            print(f"teacher step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        step += 1
    C.sync(device)
    secs = time.perf_counter() - t0
    info = dict(steps=step, seconds=secs, final_loss=sum(losses[-100:]) / max(1, len(losses[-100:])),
                batch=args.batch, lr=args.lr)
    print(f"teacher: {step} steps in {secs:.0f} s, loss {info['final_loss']:.4f}", flush=True)
    return ema.eval(), info


# --------------------------------------------------------------------------------------------
# Calibrating each mode to the target sparsity on the teacher's own q, k


@contextlib.contextmanager
def capture_qk(store: list):
    dense = F.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):
        store.append((q.detach(), k.detach()))
        return dense(q, k, v, *a, **kw)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = dense


def mean_sparsity(qks, cfg) -> float:
    return sum(sc.predict_block_mask(q, k, config=cfg).sparsity() for q, k in qks) / len(qks)


def calibrate(qks, base: sc.SpargeConfig, mode: str, target: float, iters: int = 20) -> sc.SpargeConfig:
    """The densest config of this mode whose mean sparsity over the layers is >= target.

    topk: bisect topk (topp unused); topp: bisect topp; hybrid: topk = (1 - target) / 2
    (half the budget, like the paper's 3% with top-p 0.2 at 95%), bisect topp."""
    if mode == "topk":
        make = lambda a: base.replace(mode="topk", topk=a, topp=0.0)  # noqa: E731
    elif mode == "topp":
        make = lambda a: base.replace(mode="topp", topk=0.0, topp=a)  # noqa: E731
    else:
        make = lambda a: base.replace(mode="hybrid", topk=(1 - target) / 2, topp=a)  # noqa: E731
    lo, hi = 0.0, 1.0          # sparsity(lo) >= target (assumed), sparsity(hi) < target
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean_sparsity(qks, make(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return make(lo)


# --------------------------------------------------------------------------------------------
# Measurements


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def psnr(a, b) -> float:   # images in [-1, 1]: peak-to-peak 2
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def run_model(fn, ev, amp, sample_steps):
    with amp():
        v = fn(ev["x_t"], ev["t"], ev["y"]).float()
        samples = sc.euler_sample(lambda x, t, y: fn(x, t, y).float(), ev["noise"], ev["y"], steps=sample_steps)
    return v, samples.float()


def measure(fn, ev, ref, amp, sample_steps) -> dict:
    v, s = run_model(fn, ev, amp, sample_steps)
    return dict(vel_err=rel_l2(v, ref["v"]), sample_err=rel_l2(s, ref["samples"]), psnr=psnr(s, ref["samples"]),
                samples=s)


def site_sparsity(be) -> float | None:
    vals = [s.sparsity for s in be.report().rewritten if s.sparsity is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------------
# PNG grid with no dependencies


def write_png(path: Path, rows: list[torch.Tensor], scale: int = 1) -> Path:
    """rows: tensors (n, 3, H, W) in [-1, 1]; one grid row each, 2-pixel gaps."""
    tiles = []
    for r in rows:
        r = ((r.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        r = F.pad(r, (1, 1, 1, 1), value=255)
        tiles.append(torch.cat(list(r), dim=2))   # (3, H+2, n*(W+2))
    img = torch.cat(tiles, dim=1)
    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    h, w = img.shape[1:]
    raw = img.permute(1, 2, 0).contiguous().numpy().tobytes()
    lines = b"".join(b"\x00" + raw[i * w * 3:(i + 1) * w * 3] for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(lines, 6)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


# --------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 1 min)")
    p.add_argument("--out", default=os.environ.get("OUT", "out/distill"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="teacher training batch")
    p.add_argument("--lr", type=float, default=3e-4, help="teacher training lr")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--train-seconds", type=float, default=180.0, help="teacher training time budget")
    p.add_argument("--train-steps", type=int, default=100_000, help="teacher training step cap")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--modes", default="hybrid,topk,topp")
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=5e-5)
    p.add_argument("--distill-batch", type=int, default=16)
    p.add_argument("--pool", type=int, default=2048, help="data images the distill inputs draw from")
    p.add_argument("--eval-n", type=int, default=16, help="eval inputs and samples (same batch as distill)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--inner", default=None, help="compiler after the rewrite: aot_eager (default) / inductor")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.dim, args.depth, args.heads, args.batch = 16, 64, 2, 1, 8
        args.train_seconds, args.train_steps, args.warmup, args.lr = 120.0, 80, 10, 1e-3
        args.block_q = args.block_k = 16
        args.distill_steps, args.distill_batch, args.pool, args.eval_n, args.sample_steps = 4, 4, 64, 4, 4
        args.inner = args.inner or "eager"
    args.inner = args.inner or "aot_eager"
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    device = C.pick_device(args.quick)
    out = Path(args.out)
    C.bump_dynamo_cache()
    torch._dynamo.config.automatic_dynamic_shapes = False   # eval and distill batches stay static
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    t_start = time.perf_counter()
    with C.torch_path_on_cpu(device):
        teacher, tinfo = train_teacher(args, device, amp)
        ntok = (args.image_size // args.patch) ** 2
        print(f"DiT: {ntok} tokens, dim {args.dim}, depth {args.depth}, head dim {args.dim // args.heads}; "
              f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters", flush=True)

        # Held-out eval inputs and the teacher's reference outputs.
        g = torch.Generator(device=device).manual_seed(args.seed + 1)
        x0, y = make_images(args.eval_n, args.image_size, g, device)
        t = sc.logit_normal_timesteps(args.eval_n, generator=g, device=device)
        ev = dict(x_t=sc.flow.add_noise(x0, t, torch.randn(x0.shape, generator=g, device=device)), t=t, y=y,
                  noise=torch.randn(x0.shape, generator=g, device=device))
        ref_v, ref_s = run_model(teacher, ev, amp, args.sample_steps)
        ref = dict(v=ref_v, samples=ref_s)

        qks: list = []
        with torch.no_grad(), amp(), capture_qk(qks):
            teacher(ev["x_t"], ev["t"], ev["y"])
        base = sc.SpargeConfig(block_q=args.block_q, block_k=args.block_k, min_seq_len=0)
        pool_x, pool_y = make_images(args.pool, args.image_size, torch.Generator(device=device).manual_seed(
            args.seed + 2), device)
        inputs = sc.flow_matching_inputs(pool_x, pool_y, batch_size=args.distill_batch, seed=args.seed + 3)

        rows, grid = [], [ref_s.cpu()]
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            cfg = calibrate(qks, base, mode, args.sparsity)
            cal = mean_sparsity(qks, cfg)
            module = copy.deepcopy(teacher).requires_grad_(True)
            student, be = make_student(module, cfg, args.inner)
            t0 = time.perf_counter()
            before = measure(student, ev, ref, amp, args.sample_steps)
            t1 = time.perf_counter()
            res = sc.distill(module, inputs, steps=args.distill_steps, lr=args.distill_lr, config=cfg,
                             teacher=teacher, compile_fn=lambda m, c, s=student, b=be: (s, b),
                             amp_dtype=torch.bfloat16 if device.type == "cuda" else None,
                             log_every=max(1, args.distill_steps // 4), seed=args.seed)
            C.sync(device)
            t2 = time.perf_counter()
            after = measure(student, ev, ref, amp, args.sample_steps)
            grid += [before.pop("samples").cpu(), after.pop("samples").cpu()]
            row = dict(mode=mode, topk=cfg.topk, topp=cfg.topp, sparsity_cal=cal, sparsity=site_sparsity(be),
                       **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                       loss_first=res.losses[0], loss_last=res.losses[-1], distill_s=t2 - t1,
                       eval_compile_s=t1 - t0)
            row["vel_gain"] = row["vel_err_before"] / max(row["vel_err_after"], 1e-12)
            rows.append(row)
            print(f"{mode}: topk {cfg.topk:.4f} topp {cfg.topp:.4f} sparsity {cal:.3f}; vel err "
                  f"{row['vel_err_before']:.4f} -> {row['vel_err_after']:.4f}; sample err "
                  f"{row['sample_err_before']:.4f} -> {row['sample_err_after']:.4f} ({t2 - t1:.0f} s)", flush=True)
            del module, student, be, res

    cols = [("mode", "student"), ("topk", "topk"), ("topp", "topp"), ("sparsity", "sparsity"),
            ("vel_err_before", "vel err before"), ("vel_err_after", "vel err after"), ("vel_gain", "gain"),
            ("sample_err_before", "sample err before"), ("sample_err_after", "sample err after"),
            ("psnr_before", "PSNR before (dB)"), ("psnr_after", "PSNR after (dB)"), ("loss_first", "distill loss first"),
            ("loss_last", "last"), ("distill_s", "distill s")]
    for r in rows:
        if r["sparsity"] is None:
            r["sparsity"] = r["sparsity_cal"]
    tab = C.table(rows, cols)
    total = time.perf_counter() - t_start
    head = (f"DiT {args.image_size}x{args.image_size}/p{args.patch} ({(args.image_size // args.patch) ** 2} tokens), "
            f"teacher {tinfo['steps']} steps ({tinfo['seconds']:.0f} s, loss {tinfo['final_loss']:.4f}); "
            f"{args.distill_steps} distill steps at lr {args.distill_lr}, batch {args.distill_batch}; "
            f"errors are relative L2 vs the dense teacher ({args.eval_n} inputs / samples, "
            f"{args.sample_steps} Euler steps); total {total:.0f} s")
    print("\n" + head + "\n" + tab, flush=True)
    env = C.environment(device)
    result = dict(env=env, args=vars(args), teacher=tinfo, rows=rows, total_s=total, command=C.command_line())
    C.write_json(out / "distill.json", result)
    C.write_markdown(out / "distill.md", "Distillation at ~95% sparsity", [("Result", head + "\n\n" + tab)],
                     env=env, command=C.command_line())
    write_png(out / "distill_samples.png", [g_[:8] for g_ in grid], scale=2 if args.image_size <= 32 else 1)
    print(f"wrote {out}/distill.json, distill.md, distill_samples.png", flush=True)
    return result


if __name__ == "__main__":
    main()
