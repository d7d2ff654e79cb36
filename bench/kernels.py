"""Kernel speed table: sparge vs SDPA (cuDNN, FlashAttention) and FlexAttention on the same mask.

For each shape (B, H, N, D) and target sparsity, the mask comes from our own predictor, tuned to
that sparsity (mode "topk", topp = 0, topk found from the block count and checked by bisection
on the data), and the very same mask is handed to FlexAttention through
``SpargeBlockMask.to_flex()``. Timed in one run, forward and forward+backward:

* SDPA cuDNN and FlashAttention, dense (``sdpa_kernel`` with one backend), plus SDPA's default
* FlashAttention-4's block-sparse kernel (where flash-attn-4 imports; `bench.fa4`) on our mask
  predicted at its 128x128 blocks, tuned to the same sparsity
* FlexAttention (compiled) on the same 128x64 mask; and at 128x128 blocks at the same sparsity
  (the issue's fwd+bwd baseline: Flex's backward does not compile at 128x64 on torch 2.11, see
  :func:`flex_tiles`). Flex runs with its own tiles where they compile; its forward at D = 64
  with ``kernel_options`` tiles that divide the mask's blocks, reported in the table
* sparge mask prediction alone (also replayed from a CUDA graph: its GPU time without launch
  cost), sparge kernel alone (given the mask), sparge total

plus the relative error of sparge (and Flex) against a float32 SDPA on the same mask. Every
measurement is guarded: a failing baseline records its error string and the run goes on.

    python -m bench kernels --out results                       # the full table (GPU)
    python -m bench kernels --shapes 32768x128 --sparsities 0,95 --out results
    python -m bench kernels --quick --out /tmp/b                # tiny CPU smoke run
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common as C
from bench import data
from bench import output as O
from bench.cli import module_entry
from bench.fa4 import FA4_BLOCK, fa4_call, fa4_or_none

FULL_SHAPES = [(8192, 64), (8192, 128), (32768, 64), (32768, 128), (75600, 64), (75600, 128)]
QUICK_SHAPES = [(256, 64)]
FULL_SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.97]
QUICK_SPARSITIES = [0.0, 0.9]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# Tuning a mask to a target sparsity


def tune_config(q, k, target: float, base, is_causal: bool = False, iters: int = 30):
    """(config, mask) whose predicted mask on (q, k) has sparsity closest to ``target``.

    Uses mode "topk" with topp = 0: the kept count per row is ceil(topk * visible blocks), so
    the first guess (keep - 0.5) / nk is exact for non-causal masks; otherwise (causal, or a
    predictor that rounds differently) bisection on topk over the predictor on this data.
    """
    import sparge_compile as sc

    nk = math.ceil(k.shape[2] / base.block_k)
    base = base.replace(mode="topk", topp=0.0, min_seq_len=0)

    def predict(topk):
        cfg = base.replace(topk=float(min(1.0, max(0.0, topk))))
        m = sc.predict_block_mask(q, k, is_causal=is_causal, config=cfg)
        return cfg, m, m.sparsity()

    if target <= 0:
        return predict(1.0)[:2]
    keep = max(1, round((1.0 - target) * nk))
    best = predict((keep - 0.5) / nk)
    tol = 0.5 / nk
    if abs(best[2] - target) <= tol:
        return best[:2]
    lo, hi = 0.0, 1.0  # sparsity decreases as topk grows
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = predict(mid)
        if abs(cand[2] - target) < abs(best[2] - target):
            best = cand
        if abs(cand[2] - target) <= tol:
            break
        if cand[2] > target:
            lo = mid
        else:
            hi = mid
    return best[:2]


# --------------------------------------------------------------------------------------------
# Measurements


def _fwd_bwd(fn, dout):
    def run():
        fn().backward(dout)
    return run


def _flex_fn(compile_flex: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if compile_flex:
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def flex_tiles(bm) -> dict:
    """FlexAttention forward kernel_options whose tiles divide the mask's blocks: Flex's own
    forward tiles do not for 64-key blocks at D = 64 (BLOCK_N = 128 there). Its backward at
    128x64 has no such fix on torch 2.11-2.13: the lowering drops every config whose tiles do
    not divide the blocks *before* it applies kernel_options, and the H100 default (not
    max-autotune) is the single config BLOCK_N1 = 128, so 'no choices' (flex_attention.py)."""
    bq, bk = bm.BLOCK_SIZE
    return {"BLOCK_M": min(128, bq), "BLOCK_N": min(64, bk)}


def time_flex(flex, bm, qkv, dout, device, timing, errors: dict, key: str):
    """(median ms, kernel_options used) of flex on block mask bm, forward (dout None) or
    forward+backward: Flex's own tiles first, then :func:`flex_tiles` if those fail to
    compile (forward only: see :func:`flex_tiles`). Both failing: (None, None), the errors
    under key (explicit tiles) and key + "_own_tiles"."""
    q, k, v = qkv

    def timed(opts, errs, verbose):
        def call():
            return flex(q, k, v, block_mask=bm, kernel_options=opts)
        fn = call if dout is None else _fwd_bwd(call, dout)
        grads = None if dout is None else [q, k, v]
        return C.guarded(lambda: C.time_fn(fn, device, grad_to_none=grads, **timing), errs, key,
                         verbose=verbose)

    own: dict = {}
    ms = timed(None, own, verbose=False)
    if ms is not None:
        return ms, None
    if dout is not None:  # no tile fallback for the backward
        errors[key] = own[key]
        return None, None
    opts = flex_tiles(bm)
    ms = timed(opts, errors, verbose=True)
    if ms is None:
        errors[key + "_own_tiles"] = own[key]
        return None, None
    return ms, opts


def _tiles(opts) -> str | None:
    return None if opts is None else " ".join(f"{k}={v}" for k, v in opts.items())


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def measure_dense(q, k, v, qg, kg, vg, dout, device, timing, bwd: bool) -> dict:
    """Dense SDPA baselines (cuDNN, flash, default dispatch): forward and forward+backward ms."""
    from torch.nn.attention import sdpa_kernel

    res, errors = {}, {}
    backends = dict(_sdpa_backends())
    backends["default"] = None
    for name, be in backends.items():
        def timed(fn, be=be, **kw):
            if be is None:
                return C.time_fn(fn, device, **timing, **kw)
            with sdpa_kernel(be):
                return C.time_fn(fn, device, **timing, **kw)

        res[f"sdpa_{name}_fwd_ms"] = C.guarded(
            lambda: timed(lambda: F.scaled_dot_product_attention(q, k, v)), errors, f"sdpa_{name}_fwd")
        if bwd:
            res[f"sdpa_{name}_fwdbwd_ms"] = C.guarded(
                lambda: timed(_fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg), dout),
                              grad_to_none=[qg, kg, vg]),
                errors, f"sdpa_{name}_fwdbwd")
    res["errors"] = errors
    return res


def time_sparge(P, row: dict, errors: dict, cfg, mask) -> None:
    """Prediction alone (also from a CUDA graph), kernel alone, total; forward (and +backward)."""
    import sparge_compile as sc

    q, k, v, t = P.q, P.k, P.v, P.timing
    row["predict_ms"] = C.guarded(
        lambda: C.time_fn(lambda: sc.predict_block_mask(q, k, config=cfg), P.device, **t), errors, "predict")
    row["predict_gpu_ms"] = C.guarded(  # without the launch cost: what a CUDA-graphed model pays
        lambda: C.time_graph(lambda: sc.predict_block_mask(q, k, config=cfg), P.device), errors,
        "predict_gpu")
    row["sparge_kernel_fwd_ms"] = C.guarded(
        lambda: C.time_fn(lambda: sc.sparse_attention(q, k, v, block_mask=mask), P.device, **t),
        errors, "sparge_kernel_fwd")
    row["sparge_fwd_ms"] = C.guarded(
        lambda: C.time_fn(lambda: sc.sparse_attention(q, k, v, config=cfg), P.device, **t),
        errors, "sparge_fwd")
    if P.bwd:
        qg, kg, vg = P.qkv_grad
        row["sparge_kernel_fwdbwd_ms"] = C.guarded(
            lambda: C.time_fn(_fwd_bwd(lambda: sc.sparse_attention(qg, kg, vg, block_mask=mask), P.dout),
                              P.device, grad_to_none=list(P.qkv_grad), **t), errors, "sparge_kernel_fwdbwd")
        row["sparge_fwdbwd_ms"] = C.guarded(
            lambda: C.time_fn(_fwd_bwd(lambda: sc.sparse_attention(qg, kg, vg, config=cfg), P.dout),
                              P.device, grad_to_none=list(P.qkv_grad), **t), errors, "sparge_fwdbwd")


def square_mask(P, errors: dict, target: float, base, block: int):
    """Our mask predicted at block x block, tuned to the target (memoised per point in
    ``P.squares``: Flex-square and FA4 both want 128x128)."""
    if block not in P.squares:
        cfg = base.replace(block_q=block, block_k=block)
        P.squares[block] = C.guarded(lambda: tune_config(P.q, P.k, target, cfg), errors, f"tune_{block}sq")
    return P.squares[block]


def time_flex_masks(P, row: dict, errors: dict, mask, target: float, base):
    """FlexAttention on the very same mask (128x64 blocks by default), then at square blocks
    (block_q x block_q) tuned to the same sparsity. Returns (Flex's block mask, its tiles)."""
    bm = C.guarded(mask.to_flex, errors, "flex_block_mask")
    flex_opts = None
    qkv, t = (P.q, P.k, P.v), P.timing
    if bm is not None and P.flex is not None:
        row["flex_fwd_ms"], flex_opts = time_flex(P.flex, bm, qkv, None, P.device, t, errors, "flex_fwd")
        row["flex_tiles_fwd"] = _tiles(flex_opts)
        if P.bwd:
            row["flex_fwdbwd_ms"], _ = time_flex(P.flex, bm, P.qkv_grad, P.dout, P.device, t, errors,
                                                 "flex_fwdbwd")
    if P.flex_square and P.flex is not None and base.block_k != base.block_q:
        sq = square_mask(P, errors, target, base, base.block_q)
        if sq is not None:
            row["flex_sq_sparsity"] = sq[1].sparsity()
            bm_sq = C.guarded(sq[1].to_flex, errors, "flex_sq_block_mask")
            if bm_sq is not None:
                row["flex_sq_fwd_ms"], _ = time_flex(P.flex, bm_sq, qkv, None, P.device, t, errors,
                                                     "flex_sq_fwd")
                if P.bwd:
                    row["flex_sq_fwdbwd_ms"], _ = time_flex(P.flex, bm_sq, P.qkv_grad, P.dout, P.device, t,
                                                            errors, "flex_sq_fwdbwd")
    return bm, flex_opts


def time_fa4(P, row: dict, errors: dict, target: float, base) -> None:
    """FlashAttention-4's block-sparse kernel on our mask predicted at its 128x128 blocks, tuned
    to the same sparsity (FA4's blocks on Hopper; ``bench.fa4``), forward and forward+backward."""
    if P.fa4 is None:
        return
    sq = square_mask(P, errors, target, base, FA4_BLOCK)
    fwd = None if sq is None else C.guarded(lambda: fa4_call(P.fa4, P.q, P.k, P.v, sq[1]), errors, "fa4_mask")
    if fwd is None:
        return
    row["fa4_sparsity"] = sq[1].sparsity()
    row["fa4_fwd_ms"] = C.guarded(lambda: C.time_fn(fwd, P.device, **P.timing), errors, "fa4_fwd")
    if P.bwd:
        train = fa4_call(P.fa4, *P.qkv_grad, sq[1])
        row["fa4_fwdbwd_ms"] = C.guarded(
            lambda: C.time_fn(_fwd_bwd(train, P.dout), P.device, grad_to_none=list(P.qkv_grad), **P.timing),
            errors, "fa4_fwdbwd")


def check_errors(P, row: dict, errors: dict, cfg, mask, bm, flex_opts) -> None:
    """Relative error of sparge (and Flex) against float32 SDPA on the same mask."""
    import sparge_compile as sc

    q, k, v = P.q, P.k, P.v
    ref = C.guarded(lambda: C.chunked_masked_sdpa(q, k, v, mask.to_dense(), cfg.block_q, cfg.block_k),
                    errors, "reference")
    if ref is None:
        return
    out = C.guarded(lambda: sc.sparse_attention(q, k, v, block_mask=mask), errors, "sparge_out")
    if out is not None:
        row["sparge_rel_err"] = C.rel_l2(out, ref)
    if bm is not None and P.flex is not None:
        fo = C.guarded(lambda: P.flex(q, k, v, block_mask=bm, kernel_options=flex_opts), errors, "flex_out")
        if fo is not None:
            row["flex_rel_err"] = C.rel_l2(fo, ref)


def measure_point(P, target: float, base) -> dict:
    """Every timing at one (shape, target sparsity); missing entries are None, with an error.
    P: the shape's tensors (q, k, v, qkv_grad, dout) and the run's settings (device, timing,
    flex, bwd, check, flex_square)."""
    errors: dict = {}
    row: dict = {"sparsity_target": target}
    P.squares = {}   # square-block masks of this point (square_mask)
    tuned = C.guarded(lambda: tune_config(P.q, P.k, target, base), errors, "tune")
    if tuned is None:
        row["errors"] = errors
        return row
    cfg, mask = tuned
    row.update(topk=cfg.topk, sparsity=mask.sparsity(), block_q=cfg.block_q, block_k=cfg.block_k)
    time_sparge(P, row, errors, cfg, mask)
    bm, flex_opts = time_flex_masks(P, row, errors, mask, target, base)
    time_fa4(P, row, errors, target, base)
    if P.check:
        check_errors(P, row, errors, cfg, mask, bm, flex_opts)
    row["errors"] = errors
    return row


def add_ratios(row: dict, dense: dict, flops_fwd: float) -> None:
    """Ratios the issue asks for (<1 means sparge is faster for the *_over_* time ratios)."""
    g = row.get
    row["sparge_over_flex_fwd"] = C.ratio(g("sparge_fwd_ms"), g("flex_fwd_ms"))
    row["sparge_kernel_over_flex_fwd"] = C.ratio(g("sparge_kernel_fwd_ms"), g("flex_fwd_ms"))
    row["sparge_over_flex_sq_fwdbwd"] = C.ratio(g("sparge_fwdbwd_ms"), g("flex_sq_fwdbwd_ms"))
    row["sparge_over_flex_fwdbwd"] = C.ratio(g("sparge_fwdbwd_ms"), g("flex_fwdbwd_ms"))
    row["sparge_kernel_over_fa4_fwd"] = C.ratio(g("sparge_kernel_fwd_ms"), g("fa4_fwd_ms"))
    row["sparge_over_fa4_fwd"] = C.ratio(g("sparge_fwd_ms"), g("fa4_fwd_ms"))
    row["sparge_kernel_over_fa4_fwdbwd"] = C.ratio(g("sparge_kernel_fwdbwd_ms"), g("fa4_fwdbwd_ms"))
    cudnn_f = dense.get("sdpa_cudnn_fwd_ms") or dense.get("sdpa_default_fwd_ms")
    cudnn_fb = dense.get("sdpa_cudnn_fwdbwd_ms") or dense.get("sdpa_default_fwdbwd_ms")
    row["speedup_vs_dense_fwd"] = C.ratio(cudnn_f, g("sparge_fwd_ms"))
    row["speedup_vs_dense_fwdbwd"] = C.ratio(cudnn_fb, g("sparge_fwdbwd_ms"))
    row["flex_speedup_vs_dense_fwd"] = C.ratio(cudnn_f, g("flex_fwd_ms"))
    row["flex_sq_speedup_vs_dense_fwdbwd"] = C.ratio(cudnn_fb, g("flex_sq_fwdbwd_ms"))
    row["flex_speedup_vs_dense_fwdbwd"] = C.ratio(cudnn_fb, g("flex_fwdbwd_ms"))
    if g("sparge_fwd_ms"):
        row["sparge_fwd_eff_tflops"] = flops_fwd / (g("sparge_fwd_ms") * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# Report


FWD_COLUMNS = [
    ("N", "N"), ("D", "D"), ("sparsity", "sparsity"),
    ("sdpa_cudnn_fwd_ms", "cuDNN dense"), ("sdpa_flash_fwd_ms", "FA2 dense"),
    ("flex_fwd_ms", "Flex (same mask)"), ("predict_ms", "predict"), ("predict_gpu_ms", "predict GPU"),
    ("fa4_fwd_ms", "FA4 (128x128)"),
    ("sparge_kernel_fwd_ms", "sparge kernel"), ("sparge_fwd_ms", "sparge total"),
    ("sparge_over_flex_fwd", "total/Flex"), ("sparge_kernel_over_fa4_fwd", "kernel/FA4"),
    ("speedup_vs_dense_fwd", "speed-up vs dense"),
    ("sparge_rel_err", "rel err"),
]
BWD_COLUMNS = [
    ("N", "N"), ("D", "D"), ("sparsity", "sparsity"),
    ("sdpa_cudnn_fwdbwd_ms", "cuDNN dense"), ("sdpa_flash_fwdbwd_ms", "FA2 dense"),
    ("flex_fwdbwd_ms", "Flex (same mask)"), ("flex_sq_fwdbwd_ms", "Flex square blocks"),
    ("fa4_fwdbwd_ms", "FA4 (128x128)"),
    ("sparge_kernel_fwdbwd_ms", "sparge kernel"), ("sparge_fwdbwd_ms", "sparge total"),
    ("sparge_over_flex_fwdbwd", "total/Flex"), ("sparge_over_flex_sq_fwdbwd", "total/Flex square"),
    ("sparge_kernel_over_fa4_fwdbwd", "kernel/FA4"),
    ("speedup_vs_dense_fwdbwd", "speed-up vs dense"),
]


def _flex_tiles_table(rows: list[dict]) -> str:
    """Where Flex ran with explicit kernel_options (its own tiles did not compile for the mask)."""
    seen: dict = {}
    for r in rows:
        if r.get("flex_tiles_fwd"):
            seen.setdefault(r["flex_tiles_fwd"], []).append(
                f"{r.get('N')}x{r.get('D')}@{fmt_pct(r.get('sparsity_target'))}")
    if not seen:
        return "Flex's own tiles everywhere"
    out = [{"tiles": t, "where": ", ".join(v[:6]) + (" ..." if len(v) > 6 else "")} for t, v in seen.items()]
    return ("Elsewhere Flex's own tiles; here (forward, same mask) they do not divide the mask's "
            "blocks, so these kernel_options:\n\n"
            + O.table(out, [("tiles", "kernel_options"), ("where", "points")]))


def _errors_table(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        for key, msg in (r.get("errors") or {}).items():
            where = f"{r.get('N')}x{r.get('D')}@{fmt_pct(r.get('sparsity_target'))}"
            seen.setdefault((key, msg), []).append(where)
    if not seen:
        return "none"
    out = [{"what": k, "where": ", ".join(v[:6]) + (" ..." if len(v) > 6 else ""), "error": m[:160]}
           for (k, m), v in seen.items()]
    return O.table(out, [("what", "measurement"), ("where", "points"), ("error", "error")])


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:g}%"


def markdown(result: dict) -> list[tuple[str, str]]:
    rows = result["rows"]
    a = result["args"]
    on_cuda = result["env"]["device"].startswith("cuda")
    timer = "median of triton.testing.do_bench" if on_cuda else "CPU wall clock"
    note = (f"B={a['B']}, H={a['H']}, {a['dtype']}, blocks {a['block_q']}x{a['block_k']} "
            f"(Flex square: {a['block_q']}x{a['block_q']}); times in ms, "
            f"{timer}. "
            "total = mask prediction + kernel; predict GPU = the prediction replayed from a CUDA graph "
            "(no launch cost). Ratios < 1 mean sparge is faster.\n\n")
    return [
        ("Forward", note + O.table(rows, FWD_COLUMNS)),
        ("Forward + backward", O.table(rows, BWD_COLUMNS)),
        ("FlexAttention tiles", _flex_tiles_table(rows)),
        ("Failed measurements", _errors_table(rows)),
    ]


def plot(result: dict, path: Path):
    plt = O.plt()
    if plt is None or not result["rows"]:
        return None
    shapes = sorted({(r["N"], r["D"]) for r in result["rows"]})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(10, 3.2 * len(shapes)), squeeze=False)
    series = [("fwd", [("speedup_vs_dense_fwd", "sparge total"),
                       ("flex_speedup_vs_dense_fwd", "Flex, same mask")]),
              ("fwd+bwd", [("speedup_vs_dense_fwdbwd", "sparge total"),
                           ("flex_speedup_vs_dense_fwdbwd", "Flex, same mask"),
                           ("flex_sq_speedup_vs_dense_fwdbwd", "Flex, square blocks")])]
    for i, (N, D) in enumerate(shapes):
        rows = sorted((r for r in result["rows"] if (r["N"], r["D"]) == (N, D)),
                      key=lambda r: r.get("sparsity_target", 0))
        for j, (title, keys) in enumerate(series):
            ax = axes[i][j]
            for key, label in keys:
                pts = [(100 * r["sparsity_target"], r.get(key)) for r in rows if r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_title(f"N={N}, D={D}, {title}")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("speed-up vs cuDNN dense")
            ax.set_yscale("log")
            if ax.lines[:-1]:
                ax.legend(fontsize=8, loc="upper left")
    return O.save_fig(fig, path, quick=bool(result["args"].get("quick")))


def write(result: dict, out: Path, plots: bool = True) -> dict:
    """JSON, markdown and (``plots``) the PNG; the runs' intermediate writes skip the PNG."""
    return O.write_result(out, "kernels", "Kernel speed", result, markdown(result), plot if plots else None)


# --------------------------------------------------------------------------------------------
# CLI


def parse_shapes(text: str | None, quick: bool):
    if not text:
        return QUICK_SHAPES if quick else FULL_SHAPES
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if "x" in item:
            n, d = item.split("x")
            shapes.append((int(n), int(d)))
        else:  # N alone: both head dims
            shapes += [(int(item), 64), (int(item), 128)]
    return shapes


def parse_sparsities(text: str | None, quick: bool):
    if not text:
        return QUICK_SPARSITIES if quick else FULL_SPARSITIES
    vals = [float(x) for x in text.split(",") if x.strip()]
    return [v / 100 if v > 1 else v for v in vals]  # 95 or 0.95


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", help="comma list of NxD (e.g. 32768x128,8192x64) or N (both D); "
                   "default: N in {8192,32768,75600} x D in {64,128}")
    p.add_argument("--sparsities", help="comma list in %% or fractions (default 0,50,80,90,95,97)")
    p.add_argument("--B", type=int, default=None, help="batch (default 1)")
    p.add_argument("--H", type=int, default=None, help="heads (default 12; --quick: 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (--quick: fp32)")
    p.add_argument("--block-q", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--block-k", type=int, default=None, help="default 64 (--quick: 16)")
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument("--no-check", action="store_true", help="skip the error against float32 SDPA")
    p.add_argument("--no-flex-square", action="store_true", help="skip Flex at square blocks")
    p.add_argument("--flex-compile", choices=["auto", "yes", "no"], default="auto",
                   help="compile flex_attention (auto: on CUDA only)")
    p.add_argument("--flex-cpu", action="store_true", help="also run FlexAttention on the CPU")
    p.add_argument("--no-fa4", action="store_true",
                   help="skip FlashAttention-4's block-sparse kernel (run where flash-attn-4 imports)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")


def settings(args, device, dtype) -> dict:
    """The run's sizes and options (``result["args"]``): --quick or full size."""
    quick = bool(getattr(args, "quick", False))
    flex_compiled = args.flex_compile == "yes" or (args.flex_compile == "auto" and device.type == "cuda")
    return dict(B=args.B or 1, H=args.H or (2 if quick else 12), dtype=str(dtype).replace("torch.", ""),
                block_q=args.block_q or (32 if quick else 128), block_k=args.block_k or (16 if quick else 64),
                shapes=[list(s) for s in parse_shapes(args.shapes, quick)],
                sparsities=parse_sparsities(args.sparsities, quick), bwd=not args.no_bwd,
                check=not args.no_check,
                flex_compiled=flex_compiled, quick=quick)


def flex_or_none(args, device, compile_flex: bool, errors: dict):
    """flex_attention (compiled on CUDA), or None with the reason in ``errors``."""
    if device.type == "cuda" or args.flex_cpu:
        return C.guarded(lambda: _flex_fn(compile_flex), errors, "flex_import")
    errors["flex"] = "skipped on the CPU (eager FlexAttention is very slow there; --flex-cpu to run it)"
    return None


def one_shape(N: int, D: int, P, result: dict, peer_errors: dict, out: Path) -> None:
    """The dense baselines, then every target sparsity, at one (N, D); JSON after every point."""
    from sparge_compile import SpargeConfig

    a = result["args"]
    B, H, dtype = a["B"], a["H"], P.dtype
    print(f"[kernels] B={B} H={H} N={N} D={D} {dtype}", flush=True)
    P.q, P.k, P.v = data.random_qkv(B, H, N, D, P.device, dtype, seed=N + D)
    P.qkv_grad = tuple(t.detach().clone().requires_grad_(True) for t in (P.q, P.k, P.v))
    P.dout = data.randn((B, H, N, D), P.device, dtype, seed=7)
    dense = measure_dense(P.q, P.k, P.v, *P.qkv_grad, P.dout, P.device, P.timing, P.bwd)
    dense.update(N=N, D=D)
    result["dense"].append(dense)
    base = SpargeConfig(topk=1.0, topp=0.0, block_q=a["block_q"], block_k=a["block_k"], mode="topk",
                        min_seq_len=0)
    for s in a["sparsities"]:
        row = measure_point(P, s, base)
        row.update(N=N, D=D, B=B, H=H, dtype=a["dtype"])
        row.update({key: val for key, val in dense.items() if key.endswith("_ms")})
        row["errors"] = {**peer_errors, **dense["errors"], **row.get("errors", {})}
        add_ratios(row, dense, 4.0 * B * H * N * N * D)
        result["rows"].append(row)
        O.write_json(out / "kernels.json", result)  # after every point: a run killed mid-shape keeps it
        print(f"  sparsity {fmt_pct(row.get('sparsity'))}: sparge {O.fmt(row.get('sparge_fwd_ms'))} ms, "
              f"flex {O.fmt(row.get('flex_fwd_ms'))} ms, err {O.fmt(row.get('sparge_rel_err'))}", flush=True)
    P.q = P.k = P.v = P.qkv_grad = P.dout = None
    if P.device.type == "cuda":
        torch.cuda.empty_cache()


def run(args) -> dict:
    import types

    out = Path(args.out)
    device = C.pick_device(bool(getattr(args, "quick", False)))
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    a = settings(args, device, dtype)
    if a["flex_compiled"]:  # the only compile here (imports torch._dynamo: seconds on a small CPU)
        C.bump_dynamo_cache()
    result = {"benchmark": "kernels", "env": C.environment(device), "command": O.command_line(), "args": a,
              "dense": [], "rows": []}
    peer_errors: dict = {}
    P = types.SimpleNamespace(  # what every point of the run shares; one_shape adds its tensors
        device=device, dtype=dtype, bwd=a["bwd"], check=a["check"], flex_square=not args.no_flex_square,
        timing=dict(warmup=args.warmup, rep=args.rep, cpu_iters=1 if a["quick"] else 3,
                    cpu_warmup=not a["quick"]),
        flex=flex_or_none(args, device, a["flex_compiled"], peer_errors),
        fa4=None if args.no_fa4 else fa4_or_none(device, peer_errors))
    t_start = time.perf_counter()
    with C.torch_path_on_cpu(device):
        for N, D in a["shapes"]:
            t0 = time.perf_counter()
            one_shape(N, D, P, result, peer_errors, out)
            result["seconds"] = time.perf_counter() - t_start
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
            write(result, out, plots=False)  # after every shape: a run cut short keeps what it measured
    result["seconds"] = time.perf_counter() - t_start
    from sparge_compile.kernels import tuning

    result["env"]["autotuned"] = tuning.best_configs()  # launch settings picked per key (CUDA)
    result["files"] = write(result, out)
    return result


main = module_entry(__spec__.name)  # python -m bench.kernels [options]

if __name__ == "__main__":
    raise SystemExit(main())
