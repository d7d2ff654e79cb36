"""Quality at 95% and 97%: the mask rules, SLA's sparse + linear branch and SpargeAttn's filters,
training-free and distilled, on a DiT trained on video-like clips (issue 19).

1. Teacher: ``sparge_compile.models.DiT`` trained with flow matching on :func:`bench.data.shape_clips`
   (16 frames of 24x24 as a 96x96 mosaic, patch 1: 9216 tokens, head dim 64), the EMA weights.
   Its samples against the data, as numbers (:func:`teacher_quality`): the share of them a CNN
   trained on data clips assigns the class they were sampled for (next to its share on data
   clips), and their edge energy over the data's (blurry samples score well below 1).
2. For each sparsity (``--sparsities``) and variant (``--variants``): the variant's config is
   calibrated to a mean sparsity >= the target on the teacher's own q/k
   (:func:`bench.distill.calibrate`); the training-free student is measured, distilled against
   the teacher (the same steps, lr and batches for every variant) and measured again: relative
   velocity error and PSNR of the final samples against the teacher's from the same noise.
   Variants: ``hybrid``, ``topk``, ``topp`` (the mask rules); ``sla`` and ``sla2`` (hybrid's mask
   plus the linear branch over the dropped blocks: SLA's combination, SLA2's gate and router;
   ``sc.enable_linear_branch``), ``sla-all`` (SLA's released code: its linear branch over all
   keys); ``theta`` (hybrid + SpargeAttn's self-similarity judge) and ``pv`` (hybrid + its
   in-kernel P·V filter); ``int8`` and ``fp8`` (hybrid's config with the low-bit forward and its
   bf16 gradient, QAT). A paired table compares each variant with the first at its target.
3. Each variant's attention time on one layer's q/k/v of the teacher at the eval batch (CUDA only,
   ``triton.testing.do_bench``), and its ratio to the plain sparse kernel on the same config.

    python -m bench quality --out results                      # GPU
    python -m bench quality --teacher-ckpt teacher.pt ...      # trains once and saves; later runs load it
    python -m bench quality --quick --out /tmp/q               # CPU smoke run

Writes ``quality.json``, ``quality.md`` and ``quality_samples.png`` (rows: data, teacher, then each
distilled student) under --out. Where thu-ml/SLA's package (``sparse_linear_attention``) imports,
the sla rows also time its own module on the same q/k/v at the same kept share (its top-k mask).
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
from bench import distill as D
from bench import output as O
from bench.cli import module_entry
from bench.data import SHAPE_CLASSES, shape_clips
from bench.kernels import parse_sparsities
from sparge_compile.distillation import make_student
from sparge_compile.models import DiT

# name -> (mask rule calibrated, extra config, linear branch options or None)
VARIANTS = {
    "hybrid": ("hybrid", {}, None), "topk": ("topk", {}, None), "topp": ("topp", {}, None),
    "sla": ("hybrid", {}, dict(combine="sla")), "sla2": ("hybrid", {}, dict(combine="sla2", router=True)),
    "sla-all": ("hybrid", {}, dict(combine="sla-all")),
    "theta": ("hybrid", {"theta": "theta"}, None), "pv": ("hybrid", {"pv_threshold": "pv_lambda"}, None),
    "int8": ("hybrid", {}, None), "fp8": ("hybrid", {}, None),
}
# low-bit forwards (QAT: the bf16 gradient) on hybrid's own calibrated mask config: only the
# forward's arithmetic differs from the hybrid row
PRECISION = {"int8": "int8", "fp8": "fp8"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=16, help="frames per clip (a square number: the mosaic)")
    p.add_argument("--frame-size", type=int, default=24, help="pixels per frame side")
    D.add_teacher_args(p, batch=16, train_seconds=300.0)
    p.add_argument("--teacher-ckpt", default=None, help="load the teacher from here if it exists, else train "
                   "it and save it here")
    p.add_argument("--teacher-continue", action="store_true", help="with --teacher-ckpt: train the saved "
                   "teacher --train-seconds more and save it again")
    p.add_argument("--sparsities", default="0.95,0.97")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--theta", type=float, default=0.3, help="the theta variant's self-similarity threshold")
    p.add_argument("--pv-lambda", type=float, default=8.0, help="the pv variant's P·V filter threshold")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=5e-5)
    p.add_argument("--distill-schedule", default="constant", choices=("constant", "cosine"),
                   help="distill's lr_schedule (cosine: each group's lr down to 0 at the last step)")
    p.add_argument("--distill-warmup", type=int, default=0, help="distill's warmup_steps")
    p.add_argument("--branch-lr", type=float, default=1e-3, help="lr of the linear branches' parameters "
                   "(zero at init: at the model's lr they barely move in a short distillation)")
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--pool", type=int, default=1024, help="data clips the distill inputs draw from")
    p.add_argument("--eval-n", type=int, default=8, help="eval inputs and samples")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--classifier-steps", type=int, default=400, help="training steps of the classifier "
                   "that judges the teacher's samples")
    p.add_argument("--inner", default=None, help="compiler after the rewrite: aot_eager (default) / inductor "
                   "(--quick: eager)")
    p.add_argument("--seed", type=int, default=0)


QUICK = dict(frames=4, frame_size=8, dim=64, depth=2, heads=1, batch=8, train_seconds=120.0, train_steps=60,
             warmup=10, lr=1e-3, block_q=16, block_k=16, distill_steps=3, distill_batch=4, pool=32, eval_n=4,
             sample_steps=3, inner="eager", sparsities="0.9", classifier_steps=30)


def _sizes(args) -> None:
    if args.quick:
        C.quick_defaults(args, add_args, QUICK)
    args.inner = args.inner or "aot_eager"
    g = math.isqrt(args.frames)
    if g * g != args.frames:
        raise SystemExit(f"bench quality: --frames {args.frames} is not a square number")
    args.image_size = g * args.frame_size
    if args.distill_warmup < 0:
        raise SystemExit(f"bench quality: --distill-warmup must be >= 0 steps, got {args.distill_warmup}")
    if args.teacher_continue and not args.teacher_ckpt:
        raise SystemExit("bench quality: --teacher-continue needs --teacher-ckpt (the teacher to go on from)")
    bad = sorted(set(_names(args.variants)) - set(VARIANTS))
    if bad:
        raise SystemExit(f"bench quality: --variants {bad} unknown; choose from {', '.join(VARIANTS)}")
    try:   # 95 or 0.95, as bench kernels takes them
        args.targets = parse_sparsities(args.sparsities, False)
    except ValueError:
        args.targets = None
    if not args.targets or not all(0 < t < 1 for t in args.targets):
        raise SystemExit(f"bench quality: --sparsities must be block sparsities in (0, 1) or (0, 100) %, "
                         f"got {args.sparsities!r}")


def _names(csv: str) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip()]


def clip_data(args):
    return lambda n, gen, device: shape_clips(n, args.frames, args.frame_size, gen, device)


def get_teacher(args, device, amp, data) -> tuple[DiT, dict]:
    """The teacher from --teacher-ckpt where that file exists (same sizes), else trained (and saved
    there when given). --teacher-continue: a saved teacher trains --train-seconds more from its
    weights and is saved again (a teacher longer than one device call)."""
    path = Path(args.teacher_ckpt) if args.teacher_ckpt else None
    init = None
    if path is not None and path.exists():
        ck = torch.load(path, map_location=device, weights_only=False)
        if not args.teacher_continue:
            teacher = DiT(**ck["sizes"], in_ch=3, num_classes=SHAPE_CLASSES).to(device)
            teacher.load_state_dict(ck["state"])
            print(f"teacher loaded from {path}", flush=True)
            return teacher.eval().requires_grad_(False), dict(ck["info"], loaded_from=str(path))
        init = ck
        print(f"teacher goes on from {path} ({ck['info']['steps']} steps)", flush=True)
    teacher, info = D.train_teacher(args, device, amp, data, init=init)
    if path is not None:
        save_teacher(teacher, args, info, path)
    return teacher, info


def save_teacher(teacher, args, info, path: Path) -> None:
    """Saved in bf16 (half the bytes: it fits what the GPU machine sends back); the run goes on
    with the weights as saved, as later runs load them."""
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(p.to(torch.bfloat16))
    sizes = dict(image_size=args.image_size, patch=args.patch, dim=args.dim, depth=args.depth,
                 heads=args.heads)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    torch.save(dict(sizes=sizes, state=state, info=info), path)


def classifier(args, data, device) -> torch.nn.Module:
    """A small CNN trained on data clips to tell their class (the moving shape's kind)."""
    torch.manual_seed(args.seed + 5)
    w = 32
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, w, 3, 2, 1), torch.nn.GELU(), torch.nn.Conv2d(w, 2 * w, 3, 2, 1), torch.nn.GELU(),
        torch.nn.Conv2d(2 * w, 2 * w, 3, 2, 1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(2 * w, SHAPE_CLASSES)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator(device=device).manual_seed(args.seed + 6)
    for _ in range(args.classifier_steps):
        x, y = data(64, gen, device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def edges(x: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels (what blurry samples lack)."""
    x = x.float().clamp(-1, 1)
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                 + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def teacher_quality(args, ev, ref, data, device) -> dict:
    """The teacher's samples against the data, as numbers: the share a classifier trained on data
    clips gives the class they were sampled for (and its share on held-out data clips), and their
    edge energy over the data's (1: as sharp as the data; a blurry mean of the data is well below)."""
    net = classifier(args, data, device)
    x, y = data(256, torch.Generator(device=device).manual_seed(args.seed + 8), device)
    samples = ref["samples"].clamp(-1, 1)
    with torch.no_grad():
        return dict(class_acc_samples=float((net(samples).argmax(1) == ev["y"]).float().mean()),
                    class_acc_data=float((net(x).argmax(1) == y).float().mean()),
                    edge_ratio=edges(samples) / max(edges(x), 1e-12))


def variant_config(args, name, ctx, target) -> tuple[sc.SpargeConfig, list | None]:
    """The variant's config at mean sparsity >= target on the calibration batch's q/k/v (a
    training batch, not the eval one): top-k / top-p bisected; the hybrid-rule variants (with their
    filters) by :func:`bench.distill.calibrate_hybrid`, the least training-free error over the
    top-k share, with its grid. Cached per (rule, filters, target): sla / sla2 / sla-all and the
    low-bit variants (:data:`PRECISION`) get hybrid's config, the latter with their precision."""
    mode, extra, _ = VARIANTS[name]
    base = ctx["base"].replace(**{k: getattr(args, v) for k, v in extra.items()})
    key = (mode, tuple(sorted(extra)), target)
    if key not in ctx["configs"]:
        qks = [x[:2] for x in ctx["cal_qkv"]]
        ctx["configs"][key] = (D.calibrate_hybrid(ctx["cal_qkv"], base, target) if mode == "hybrid"
                               else (D.calibrate(qks, base, mode, target), None))
    cfg, grid = ctx["configs"][key]
    return (cfg.replace(precision=PRECISION[name]), grid) if name in PRECISION else (cfg, grid)


def attach_branches(module, args, branch_kw) -> None:
    if branch_kw is not None:
        sites = [f"blocks.{i}.attn" for i in range(len(module.blocks))]
        sc.enable_linear_branch(module, sites, head_dim=args.dim // args.heads, num_heads=args.heads,
                                **branch_kw)


def attention_ms(cfg, branch_kw, qkv, args) -> dict:
    """On CUDA: this variant's attention (prediction included) and the plain sparse attention's on
    the same config, each as GPU time (replayed from a CUDA graph: at this size an eager call is
    mostly host time, which varied 2x between rows of one run) and eager (host included); {} off
    CUDA. A call that cannot be captured keeps its eager time alone."""
    q, k, v = qkv
    if not q.is_cuda:
        return {}
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    sparse = lambda: sc.sparse_attention(q, k, v, config=cfg)  # noqa: E731
    fn = sparse
    if branch_kw is not None:
        br = sc.LinearBranch(args.dim // args.heads, args.heads, **branch_kw).to(q.device)
        with torch.no_grad():
            for p in br.parameters():
                p.normal_(0, 0.02)   # non-trivial parameters: the branch's whole work runs
        fn = lambda: sc.sparse_linear_attention(q, k, v, br, config=cfg)  # noqa: E731
    with torch.no_grad():   # inference timing, eager and graph alike (no autograd records)
        res = {"attn_eager_ms": C.time_fn(fn, q.device)}
        res["attn_ms"], res["sparse_ms"] = _graph_ms(fn, q.device), _graph_ms(sparse, q.device)
    if res["attn_ms"] is not None and res["sparse_ms"]:
        res["attn_vs_sparse"] = res["attn_ms"] / res["sparse_ms"]
    return res


def _graph_ms(fn, device) -> float | None:
    try:
        return C.time_graph(fn, device)
    except Exception as e:   # not capturable (a host sync inside): the eager time stands alone
        print(f"attention timing: no CUDA graph ({C.short_error(e, 160)})", flush=True)
        return None


def _optimizer(module, args):
    """AdamW at --distill-lr, the linear branches' parameters at --branch-lr."""
    branch = {id(p) for n, p in module.named_parameters() if ".sparge_linear." in n}

    def make(params):
        params = list(params)
        groups = [dict(params=[p for p in params if id(p) not in branch], lr=args.distill_lr),
                  dict(params=[p for p in params if id(p) in branch], lr=args.branch_lr)]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    return make


def sla_peer_ms(qkv, target: float, args) -> float | None:
    """thu-ml/SLA's own module (``sparse_linear_attention.SparseLinearAttention``: its top-k mask at
    the same kept share, its Triton sparse kernel, linear attention over all keys, proj) on the same
    q/k/v, where that package imports and on CUDA; else None. GPU time (a CUDA graph) where it
    captures, else eager."""
    q, k, v = qkv
    try:
        from sparse_linear_attention import SparseLinearAttention
    except ImportError:
        return None
    if not q.is_cuda:
        return None
    from triton.testing import do_bench

    q, k, v = (x.to(torch.bfloat16).contiguous() for x in (q, k, v))
    peer = SparseLinearAttention(q.shape[-1], topk=1 - target, BLKQ=args.block_q, BLKK=args.block_k)
    peer = peer.to(q.device)
    with torch.no_grad():
        call = lambda: peer(q, k, v)  # noqa: E731
        return _graph_ms(call, q.device) or do_bench(call, warmup=25, rep=100)


def one_variant(args, name, target, ctx) -> tuple[dict, torch.Tensor]:
    """Calibrate, measure, distill, measure one variant at one sparsity: its row and samples."""
    cfg, grid = variant_config(args, name, ctx, target)
    branch_kw = VARIANTS[name][2]
    module = copy.deepcopy(ctx["teacher"]).requires_grad_(True)
    attach_branches(module, args, branch_kw)
    student, be = make_student(module, cfg, args.inner)
    before = D.measure(student, ctx["ev"], ctx["ref"], ctx["amp"], args.sample_steps)
    sp_before = D.site_sparsity(be)   # top-p's drifts in distill: the student's scores sharpen
    t0 = time.perf_counter()
    res = sc.distill(module, ctx["inputs"], steps=args.distill_steps, lr=args.distill_lr, config=cfg,
                     lr_schedule=args.distill_schedule, warmup_steps=args.distill_warmup,
                     optimizer=_optimizer(module, args), teacher=ctx["teacher"],
                     compile_fn=lambda m, c, s=student, b=be: (s, b),
                     amp_dtype=torch.bfloat16 if ctx["device"].type == "cuda" else None,
                     log_every=max(1, args.distill_steps // 4), seed=args.seed)
    C.sync(ctx["device"])
    secs = time.perf_counter() - t0
    after = D.measure(student, ctx["ev"], ctx["ref"], ctx["amp"], args.sample_steps)
    samples = after.pop("samples").cpu()
    before.pop("samples")
    timing = attention_ms(cfg, branch_kw, ctx["qkv"], args)
    peer = sla_peer_ms(ctx["qkv"], target, args) if name in ("sla", "sla-all") else None
    row = dict(sparsity_target=target, variant=name, topk=cfg.topk, topp=cfg.topp, rule=cfg.mode,
               precision=cfg.precision,
               topk_share=_share(grid), calibration_grid=grid,
               sparsity=D.site_sparsity(be) or D.mean_sparsity(ctx["qks"], cfg), sparsity_before=sp_before,
               **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
               loss_first=res.losses[0], loss_last=res.losses[-1], distill_s=secs, **timing, sla_peer_ms=peer)
    print(f"{target:.2f} {name}: sparsity {row['sparsity']:.3f}; vel err {row['vel_err_before']:.4f} -> "
          f"{row['vel_err_after']:.4f}; PSNR {row['psnr_before']:.1f} -> {row['psnr_after']:.1f} dB "
          f"({secs:.0f} s)", flush=True)
    return row, samples


def _share(grid):
    """The hybrid pick's share of the top-k budget, else None."""
    return next((r["share"] for r in grid or () if r.get("picked")), None)


COLUMNS = [("sparsity_target", "target"), ("variant", "student"), ("topk_share", "top-k share"),
           ("sparsity_before", "sparsity training-free"), ("sparsity", "sparsity distilled"),
           ("vel_err_before", "vel err training-free"), ("vel_err_after", "vel err distilled"),
           ("psnr_before", "PSNR training-free (dB)"), ("psnr_after", "PSNR distilled (dB)"),
           ("attn_ms", "attention GPU ms"), ("attn_vs_sparse", "vs sparse kernel"),
           ("attn_eager_ms", "eager ms (host incl.)"),
           ("sla_peer_ms", "thu-ml/SLA ms (its top-k mask)"), ("distill_s", "distill s")]


def paired_rows(rows) -> list[dict]:
    """Per target, each variant against the first one run there (hybrid by default): the mean
    per-sample PSNR difference of the distilled students and its standard error (same noise)."""
    out = []
    for r in rows:
        base = next(x for x in rows if x["sparsity_target"] == r["sparsity_target"])
        if r is base or not r.get("psnr_each_after"):
            continue
        diff, se = D.paired(r["psnr_each_after"], base["psnr_each_after"])
        out.append(dict(sparsity_target=r["sparsity_target"], variant=r["variant"], against=base["variant"],
                        psnr_diff_db=diff, se_db=se, samples=len(r["psnr_each_after"])))
    return out


PAIRED_COLUMNS = [("sparsity_target", "target"), ("variant", "student"), ("against", "against"),
                  ("psnr_diff_db", "PSNR difference, distilled (dB)"), ("se_db", "standard error (dB)"),
                  ("samples", "samples")]


def write(args, tinfo, quality, rows, grid, total, device, out: Path) -> dict:
    pairs = paired_rows(rows)
    tab = O.table(rows, COLUMNS) + ("\n\n" + O.table(pairs, PAIRED_COLUMNS) if pairs else "")
    head = (f"DiT on {args.frames}-frame clips of {args.frame_size}x{args.frame_size} ({args.image_size}x"
            f"{args.image_size} mosaic, patch {args.patch}: {(args.image_size // args.patch) ** 2} tokens); "
            f"teacher {tinfo['steps']} steps (loss {tinfo['final_loss']:.4f}), its samples: a data-trained "
            f"classifier names {quality['class_acc_samples']:.0%} of them their class "
            f"({quality['class_acc_data']:.0%} of data clips), edge energy {quality['edge_ratio']:.2f}x the "
            f"data's; {args.distill_steps} distill steps at lr {args.distill_lr} (branches "
            f"{args.branch_lr}; {args.distill_schedule}, warm-up {args.distill_warmup}), batch "
            f"{args.distill_batch}; "
            f"errors vs the dense teacher ({args.eval_n} inputs / samples, {args.sample_steps} Euler steps); "
            f"total {total:.0f} s")
    print("\n" + head + "\n" + tab, flush=True)
    result = dict(env=C.environment(device), args=vars(args), teacher=tinfo, teacher_quality=quality,
                  rows=rows, paired=pairs, total_s=total, command=O.command_line())
    O.write_result(out, "quality", "Sparse variants at 95% / 97%, training-free and distilled", result,
                   [("Result", head + "\n\n" + tab)])
    n = min(8, args.eval_n)
    O.write_png_grid(out / "quality_samples.png", [g[:n] for g in grid],
                     scale=2 if args.image_size <= 32 else 1)
    print(f"wrote {out}/quality.json, quality.md, quality_samples.png", flush=True)
    return result


def context(args, device, amp) -> dict:
    """The teacher, its eval references and quality, its q/k (calibration) and the distill inputs."""
    data = clip_data(args)
    teacher, tinfo = get_teacher(args, device, amp, data)
    ev, ref = D.held_out(args, teacher, device, amp, data)
    qkv: list = []
    with torch.no_grad(), amp(), D.capture_qk(qkv, with_v=True):
        teacher(ev["x_t"], ev["t"], ev["y"])
    pool_x, pool_y = data(args.pool, torch.Generator(device=device).manual_seed(args.seed + 2), device)
    inputs = sc.flow_matching_inputs(pool_x, pool_y, batch_size=args.distill_batch, seed=args.seed + 3)
    cal_qkv: list = []   # calibration: a training batch no distill run reaches (its step index)
    with torch.no_grad(), amp(), D.capture_qk(cal_qkv, with_v=True):
        teacher(*inputs(10 ** 6))
    return dict(teacher=teacher, tinfo=tinfo, ev=ev, ref=ref, qks=[x[:2] for x in qkv], qkv=qkv[0],
                cal_qkv=cal_qkv, configs={},
                inputs=inputs,
                base=sc.SpargeConfig(block_q=args.block_q, block_k=args.block_k, min_seq_len=0),
                quality=teacher_quality(args, ev, ref, data, device), amp=amp, device=device,
                data_rows=pool_x[:8].cpu())


def run(args) -> dict:
    _sizes(args)
    logging.basicConfig(level=logging.WARNING)
    device = C.pick_device(args.quick)
    C.bump_dynamo_cache()
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch.backends.cuda.matmul.allow_tf32 = True
    amp = contextlib.nullcontext
    if device.type == "cuda":
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    t_start = time.perf_counter()
    with C.torch_path_on_cpu(device):
        ctx = context(args, device, amp)
        print(f"teacher samples: {ctx['quality']}", flush=True)
        rows, grid = [], [ctx["data_rows"], ctx["ref"]["samples"].cpu()]
        for target in args.targets:
            for name in _names(args.variants):
                row, samples = one_variant(args, name, target, ctx)
                rows.append(row)
                grid.append(samples)
    return write(args, ctx["tinfo"], ctx["quality"], rows, grid, time.perf_counter() - t_start, device,
                 Path(args.out))


main = module_entry(__spec__.name)  # python -m bench.quality [options]

if __name__ == "__main__":
    raise SystemExit(main())
