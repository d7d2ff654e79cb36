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

    python -m bench distill --out results            # GPU, < 8 min on one H100
    python -m bench distill --quick --out /tmp/d     # CPU smoke run, < 1 min of CPU

Writes ``distill.json``, ``distill.md`` (the table) and ``distill_samples.png`` (rows: teacher,
then each student before / after) under --out. The images are :func:`bench.data.shape_images`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparge_compile as sc
from bench import common as C
from bench import output as O
from bench.cli import module_entry
from bench.data import SHAPE_CLASSES, shape_images
from sparge_compile.distillation import make_student
from sparge_compile.models import DiT

# --------------------------------------------------------------------------------------------
# Teacher training (flow matching, x_t = (1 - t) x0 + t eps, v = eps - x0)


def image_data(args):
    """(n, generator, device) -> (images, classes): this benchmark's data (shape_images)."""
    return lambda n, gen, device: shape_images(n, args.image_size, gen, device)


def train_teacher(args, device, amp, data=None, init: dict | None = None) -> tuple[DiT, dict]:
    """data: (n, generator, device) -> (x0, y), default :func:`image_data`. init: a saved
    teacher's ``{"state", "info"}`` to go on from (its weights start both the model and the EMA;
    a fresh optimizer with its warm-up; the steps and seconds add up in the info)."""
    data = data or image_data(args)
    step0 = init["info"]["steps"] if init else 0
    torch.manual_seed(args.seed + step0)
    model = DiT(image_size=args.image_size, patch=args.patch, in_ch=3, dim=args.dim, depth=args.depth,
                heads=args.heads, num_classes=SHAPE_CLASSES).to(device)
    if init:
        model.load_state_dict(init["state"])   # bf16 as saved, copied into the fp32 parameters
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed + step0)   # new batches after a resume
    t0 = time.perf_counter()
    losses, step = [], 0
    while step < args.train_steps and time.perf_counter() - t0 < args.train_seconds:
        x0, y = data(args.batch, gen, device)
        y = torch.where(torch.rand(args.batch, generator=gen, device=device) < 0.1, SHAPE_CLASSES, y)  # null
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
        decay = min(args.ema, (1 + step0 + step) / (10 + step0 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item() if step % 50 == 0 or step < 10 else losses[-1])
        if step % 500 == 0:
            secs = time.perf_counter() - t0
            print(f"teacher step {step}: loss {loss.item():.4f} ({secs:.0f} s)", flush=True)
        step += 1
    C.sync(device)
    secs = time.perf_counter() - t0
    info = dict(steps=step0 + step, seconds=secs + (init["info"]["seconds"] if init else 0.0),
                final_loss=sum(losses[-100:]) / max(1, len(losses[-100:])), batch=args.batch, lr=args.lr,
                resumed_at=step0 if init else None)
    print(f"teacher: {step} steps in {secs:.0f} s ({info['steps']} in all), loss {info['final_loss']:.4f}",
          flush=True)
    return ema.eval(), info


# --------------------------------------------------------------------------------------------
# Calibrating each mode to the target sparsity on the teacher's own q, k


@contextlib.contextmanager
def capture_qk(store: list, with_v: bool = False):
    """Within: every F.scaled_dot_product_attention call appends its (q, k) (and v) to store."""
    dense = F.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):
        store.append((q.detach(), k.detach(), v.detach()) if with_v else (q.detach(), k.detach()))
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
    return _bisect(qks, make, target, iters)


def _bisect(qks, make, target: float, iters: int) -> sc.SpargeConfig:
    lo, hi = 0.0, 1.0          # sparsity(lo) >= target (assumed), sparsity(hi) < target
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean_sparsity(qks, make(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return make(lo)


HYBRID_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9)   # of the top-k budget 1 - target


@torch.no_grad()
def attention_error(qkvs, cfg: sc.SpargeConfig) -> float:
    """Mean over the captured layers of the sparse attention's (prediction included) relative L1
    error against dense SDPA: SpargeAttn's training-free measure."""
    errs = [C.rel_l1(sc.sparse_attention(q, k, v, config=cfg), F.scaled_dot_product_attention(q, k, v))
            for q, k, v in qkvs]
    return sum(errs) / len(errs)


def calibrate_hybrid(qkvs, base: sc.SpargeConfig, target: float, shares=HYBRID_SHARES, iters: int = 20):
    """The hybrid rule at mean sparsity >= target with the least training-free attention error
    (:func:`attention_error`) on the captured q/k/v: for each share s of the top-k budget
    (topk = s·(1 − target)) topp is bisected to the target. Only true mixtures (0 < s < 1): the
    rules alone are their own variants, so the comparison with them means something. Candidates
    short of the target are left out; all short (a filter keeps blocks the top-k share cannot
    drop): the sparsest, top-k alone (share 1) among them. Returns (config, grid rows; the pick's
    row has ``picked``)."""
    qks = [x[:2] for x in qkvs]
    cands = []
    for s in shares:
        make = lambda a, s=s: base.replace(mode="hybrid", topk=s * (1 - target), topp=a)  # noqa: E731
        cands.append((s, _bisect(qks, make, target, iters)))
    grid = [dict(share=s, mode=c.mode, topk=c.topk, topp=c.topp, sparsity=mean_sparsity(qks, c))
            for s, c in cands]
    for row, (_, c) in zip(grid, cands):
        row["error"] = attention_error(qkvs, c) if row["sparsity"] >= target else None
    ok = [i for i, r in enumerate(grid) if r["error"] is not None]
    if ok:
        best = min(ok, key=lambda i: grid[i]["error"])
    else:
        alone = calibrate(qks, base, "topk", target, iters)
        cands.append((1.0, alone))
        grid.append(dict(share=1.0, mode=alone.mode, topk=alone.topk, topp=alone.topp,
                         sparsity=mean_sparsity(qks, alone), error=None))
        best = max(range(len(grid)), key=lambda i: grid[i]["sparsity"])
    grid[best]["picked"] = True
    return cands[best][1], grid


# --------------------------------------------------------------------------------------------
# Measurements


def psnr(a, b) -> float:   # images in [-1, 1]: peak-to-peak 2
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def run_model(fn, ev, amp, sample_steps):
    with amp():
        v = fn(ev["x_t"], ev["t"], ev["y"]).float()
        samples = sc.euler_sample(lambda x, t, y: fn(x, t, y).float(), ev["noise"], ev["y"],
                                  steps=sample_steps)
    return v, samples.float()


def measure(fn, ev, ref, amp, sample_steps) -> dict:
    """Velocity and sample errors against the teacher's; psnr: of all samples together; psnr_each:
    per sample (the same noise for every variant: paired comparisons, :func:`paired`)."""
    v, s = run_model(fn, ev, amp, sample_steps)
    return dict(vel_err=C.rel_l2(v, ref["v"]), sample_err=C.rel_l2(s, ref["samples"]),
                psnr=psnr(s, ref["samples"]), psnr_each=[psnr(a, b) for a, b in zip(s, ref["samples"])],
                samples=s)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a - b over paired samples (the same noise)."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, math.sqrt(var / len(d))


def site_sparsity(be) -> float | None:
    vals = [s.sparsity for s in be.report().rewritten if s.sparsity is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------------
# CLI


def add_teacher_args(p: argparse.ArgumentParser, batch: int, train_seconds: float) -> None:
    """The teacher DiT's sizes and training options (this benchmark's and ``bench quality``'s)."""
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=batch, help="teacher training batch")
    p.add_argument("--lr", type=float, default=3e-4, help="teacher training lr")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--train-seconds", type=float, default=train_seconds, help="teacher training time budget")
    p.add_argument("--train-steps", type=int, default=100_000, help="teacher training step cap")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=64)
    add_teacher_args(p, batch=32, train_seconds=180.0)
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
    p.add_argument("--inner", default=None, help="compiler after the rewrite: aot_eager (default) / inductor "
                   "(--quick: eager)")
    p.add_argument("--seed", type=int, default=0)


QUICK = dict(image_size=16, dim=64, depth=2, heads=1, batch=8, train_seconds=120.0, train_steps=80,
             warmup=10, lr=1e-3, block_q=16, block_k=16, distill_steps=4, distill_batch=4, pool=64,
             eval_n=4, sample_steps=4, inner="eager")


def _sizes(args) -> None:
    """--quick: the tiny sizes of QUICK for every option left at its default; the inner compiler."""
    if args.quick:
        C.quick_defaults(args, add_args, QUICK)
    args.inner = args.inner or "aot_eager"


def held_out(args, teacher, device, amp, data=None) -> tuple[dict, dict]:
    """Held-out eval inputs (noisy x_t, t, y, sampling noise) and the teacher's outputs on them."""
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    x0, y = (data or image_data(args))(args.eval_n, g, device)
    t = sc.logit_normal_timesteps(args.eval_n, generator=g, device=device)
    ev = dict(x_t=sc.flow.add_noise(x0, t, torch.randn(x0.shape, generator=g, device=device)), t=t, y=y,
              noise=torch.randn(x0.shape, generator=g, device=device))
    ref_v, ref_s = run_model(teacher, ev, amp, args.sample_steps)
    return ev, dict(v=ref_v, samples=ref_s)


def one_mode(args, mode, teacher, qks, base, inputs, ev, ref, amp, device) -> tuple[dict, list]:
    """Calibrate ``mode`` to the target sparsity, distill its student; the row and its samples."""
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
    samples = [before.pop("samples").cpu(), after.pop("samples").cpu()]
    row = dict(mode=mode, topk=cfg.topk, topp=cfg.topp, sparsity_cal=cal, sparsity=site_sparsity(be),
               **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
               loss_first=res.losses[0], loss_last=res.losses[-1], distill_s=t2 - t1,
               eval_compile_s=t1 - t0)
    row["vel_gain"] = row["vel_err_before"] / max(row["vel_err_after"], 1e-12)
    print(f"{mode}: topk {cfg.topk:.4f} topp {cfg.topp:.4f} sparsity {cal:.3f}; vel err "
          f"{row['vel_err_before']:.4f} -> {row['vel_err_after']:.4f}; sample err "
          f"{row['sample_err_before']:.4f} -> {row['sample_err_after']:.4f} ({t2 - t1:.0f} s)", flush=True)
    return row, samples


COLUMNS = [("mode", "student"), ("topk", "topk"), ("topp", "topp"), ("sparsity", "sparsity"),
           ("vel_err_before", "vel err before"), ("vel_err_after", "vel err after"), ("vel_gain", "gain"),
           ("sample_err_before", "sample err before"), ("sample_err_after", "sample err after"),
           ("psnr_before", "PSNR before (dB)"), ("psnr_after", "PSNR after (dB)"),
           ("loss_first", "distill loss first"), ("loss_last", "last"), ("distill_s", "distill s")]


def write(args, tinfo, rows, grid, total, device, out: Path) -> dict:
    """distill.json, distill.md (the table) and distill_samples.png; prints the table."""
    for r in rows:
        if r["sparsity"] is None:
            r["sparsity"] = r["sparsity_cal"]
    tab = O.table(rows, COLUMNS)
    head = (f"DiT {args.image_size}x{args.image_size}/p{args.patch} ({(args.image_size // args.patch) ** 2} "
            f"tokens), teacher {tinfo['steps']} steps ({tinfo['seconds']:.0f} s, "
            f"loss {tinfo['final_loss']:.4f}); "
            f"{args.distill_steps} distill steps at lr {args.distill_lr}, batch {args.distill_batch}; "
            f"errors are relative L2 vs the dense teacher ({args.eval_n} inputs / samples, "
            f"{args.sample_steps} Euler steps); total {total:.0f} s")
    print("\n" + head + "\n" + tab, flush=True)
    env = C.environment(device)
    result = dict(env=env, args=vars(args), teacher=tinfo, rows=rows, total_s=total, command=O.command_line())
    O.write_result(out, "distill", "Distillation at ~95% sparsity", result, [("Result", head + "\n\n" + tab)])
    O.write_png_grid(out / "distill_samples.png", [g_[:8] for g_ in grid],
                     scale=2 if args.image_size <= 32 else 1)
    print(f"wrote {out}/distill.json, distill.md, distill_samples.png", flush=True)
    return result


def run(args) -> dict:
    _sizes(args)
    logging.basicConfig(level=logging.WARNING)
    device = C.pick_device(args.quick)
    C.bump_dynamo_cache()
    torch._dynamo.config.automatic_dynamic_shapes = False   # eval and distill batches stay static
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp = contextlib.nullcontext
    if device.type == "cuda":
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    t_start = time.perf_counter()
    with C.torch_path_on_cpu(device):
        teacher, tinfo = train_teacher(args, device, amp)
        ntok = (args.image_size // args.patch) ** 2
        print(f"DiT: {ntok} tokens, dim {args.dim}, depth {args.depth}, head dim {args.dim // args.heads}; "
              f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters", flush=True)
        ev, ref = held_out(args, teacher, device, amp)
        qks: list = []
        with torch.no_grad(), amp(), capture_qk(qks):
            teacher(ev["x_t"], ev["t"], ev["y"])
        base = sc.SpargeConfig(block_q=args.block_q, block_k=args.block_k, min_seq_len=0)
        pool_x, pool_y = shape_images(args.pool, args.image_size, torch.Generator(device=device).manual_seed(
            args.seed + 2), device)
        inputs = sc.flow_matching_inputs(pool_x, pool_y, batch_size=args.distill_batch, seed=args.seed + 3)
        rows, grid = [], [ref["samples"].cpu()]
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            row, samples = one_mode(args, mode, teacher, qks, base, inputs, ev, ref, amp, device)
            rows.append(row)
            grid += samples
    return write(args, tinfo, rows, grid, time.perf_counter() - t_start, device, Path(args.out))


main = module_entry(__spec__.name)  # python -m bench.distill [options]

if __name__ == "__main__":
    raise SystemExit(main())
