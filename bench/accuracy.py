"""Accuracy vs sparsity for each mask rule (top-k, top-p, hybrid) on attention inputs with structure.

Sources of Q/K/V:

* ``video``: a synthetic video-like generator. Tokens on a T x H x W grid; each head's Q and K
  share a spatially smooth random field (local correlation) and carry Wan-style 3-D rotary
  position embedding; head kinds: ``local`` (peaked, local), ``sink`` (a block-aligned group
  of sink keys every query is drawn to: sink-dominated rows), ``flat`` (near-uniform rows),
  ``mixed`` (local plus a weaker sink).
* ``trained``: Q/K/V captured from a tiny video transformer trained here for a few hundred
  steps on a procedural task (next-frame prediction of moving blobs), when enabled.

For each rule the sweep records the mask's sparsity and the relative L1 error of the attention
output against dense attention, overall, per row kind (flat rows: block-score entropy near the
maximum; sink rows: one key block holds most of the block-score mass) and per head kind. The
masked attention is computed in float32 with SDPA and a boolean mask, so the error is the rule's
alone (not the kernel's). Each hybrid point is compared with the better single rule at the same
sparsity (linear interpolation along each single rule's sweep): column ``hybrid_vs_best_single``.

    python -m bench accuracy --out results
    python -m bench accuracy --quick --out /tmp/b

The generators are in :mod:`bench.data` (``video_qkv``, ``trained_qkv``).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common as C
from bench import output as O
from bench.cli import module_entry
from bench.data import trained_qkv, video_qkv

RULES = ("topk", "topp", "hybrid")
FULL_TOPK = [0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5]
FULL_TOPP = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
FULL_HYBRID = [(k, p) for k in (0.01, 0.02, 0.03, 0.05, 0.1) for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)]
QUICK_TOPK = [0.1, 0.25, 0.5]
QUICK_TOPP = [0.3, 0.6, 0.9]
QUICK_HYBRID = [(0.1, 0.3), (0.1, 0.6), (0.25, 0.6)]
HEAD_KINDS_FULL = ["local"] * 6 + ["sink"] * 2 + ["flat"] * 2 + ["mixed"] * 2
HEAD_KINDS_QUICK = ["local", "sink", "flat", "mixed"]
TARGETS = [0.5, 0.8, 0.9, 0.95, 0.97]
FLAT_ENTROPY = 0.9   # a row is "flat" if the entropy of its block scores is >= 90% of log(n)
SINK_MASS = 0.5      # a row is "sink-dominated" if one key block holds >= 50% of its block-score mass


# --------------------------------------------------------------------------------------------
# Sweep


def row_kinds(q, k, block_q: int, block_k: int) -> torch.Tensor:
    """(B, H, nq) int8 per query block: 0 other, 1 flat, 2 sink-dominated (from block scores)."""
    from sparge_compile.reference import block_scores

    p = block_scores(q.float(), k.float(), 1.0 / math.sqrt(q.shape[-1]), False, block_q, block_k)
    n = p.shape[-1]
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(max(2, n))
    kinds = torch.zeros(p.shape[:-1], dtype=torch.int8, device=p.device)
    kinds[ent >= FLAT_ENTROPY] = 1
    kinds[p.max(-1).values >= SINK_MASS] = 2
    return kinds


def _errors(out, ref, row_kind_tok: torch.Tensor, head_kinds: list[str]) -> dict:
    """Relative L1 error overall, per row kind and per head kind."""
    diff = (out - ref).abs().double().sum(-1)   # (B, H, N)
    mag = ref.abs().double().sum(-1)
    res = {"rel_l1": float(diff.sum() / mag.sum().clamp_min(1e-30))}
    for code, name in ((0, "other"), (1, "flat"), (2, "sink")):
        sel = row_kind_tok == code
        res[f"rel_l1_{name}_rows"] = float(diff[sel].sum() / mag[sel].sum()) if sel.any() else None
    for kind in sorted(set(head_kinds)):
        hs = [i for i, kk in enumerate(head_kinds) if kk == kind]
        res[f"rel_l1_{kind}_heads"] = float(diff[:, hs].sum() / mag[:, hs].sum().clamp_min(1e-30))
    return res


def sweep(q, k, v, head_kinds, block_q, block_k, grids: dict, errors: dict) -> list[dict]:
    import sparge_compile as sc

    ref = F.scaled_dot_product_attention(q, k, v) if q.shape[2] <= 8192 else \
        C.chunked_masked_sdpa(q, k, v, torch.ones(*q.shape[:2], -(-q.shape[2] // block_q),
                                                  -(-k.shape[2] // block_k), dtype=torch.bool,
                                                  device=q.device), block_q, block_k)
    kinds = row_kinds(q, k, block_q, block_k)
    kinds_tok = kinds.repeat_interleave(block_q, dim=-1)[..., : q.shape[2]]
    rows = []
    for rule in RULES:
        for params in grids[rule]:
            topk, topp = {"topk": (params, 0.0), "topp": (0.0, params), "hybrid": params}[rule]
            cfg = sc.SpargeConfig(topk=topk, topp=topp, block_q=block_q, block_k=block_k, mode=rule,
                                  min_seq_len=0)
            key = f"{rule}(topk={topk:g},topp={topp:g})"
            mask = C.guarded(lambda: sc.predict_block_mask(q, k, config=cfg), errors, key)
            if mask is None:
                continue
            dense = mask.to_dense()
            out = C.chunked_masked_sdpa(q, k, v, dense, block_q, block_k)
            row = {"rule": rule, "topk": topk, "topp": topp, "sparsity": mask.sparsity()}
            kept = dense.sum(-1).float()
            for code, name in ((1, "flat"), (2, "sink")):
                sel = kinds == code
                row[f"kept_blocks_{name}_rows"] = float(kept[sel].mean()) if sel.any() else None
            row.update(_errors(out, ref, kinds_tok, head_kinds))
            rows.append(row)
    row_share = {name: float((kinds == code).float().mean()) for code, name in
                 ((0, "other"), (1, "flat"), (2, "sink"))}
    return rows, row_share


def _interp(points: list[tuple[float, float]], s: float):
    """Linear interpolation of error at sparsity s along a rule's sweep (None outside it)."""
    pts = sorted(points)
    if not pts or s < pts[0][0] - 1e-9 or s > pts[-1][0] + 1e-9:
        return None
    for (s0, e0), (s1, e1) in zip(pts, pts[1:]):
        if s0 - 1e-9 <= s <= s1 + 1e-9:
            return e0 if s1 - s0 < 1e-12 else e0 + (e1 - e0) * (s - s0) / (s1 - s0)
    return pts[0][1] if abs(s - pts[0][0]) < 1e-9 else None


def compare(rows: list[dict], key: str = "rel_l1", tol: float = 0.02) -> None:
    """Add to each hybrid row the better single rule's error at the same sparsity."""
    curves = {r: [(x["sparsity"], x[key]) for x in rows if x["rule"] == r and x.get(key) is not None]
              for r in ("topk", "topp")}
    for row in rows:
        if row["rule"] != "hybrid":
            continue
        singles = {r: _interp(curves[r], row["sparsity"]) for r in curves}
        row["topk_err_same_sparsity"] = singles["topk"]
        row["topp_err_same_sparsity"] = singles["topp"]
        cand = [e for e in singles.values() if e is not None]
        best = min(cand) if cand else None
        row["best_single_err_same_sparsity"] = best
        row["hybrid_vs_best_single"] = C.ratio(row["rel_l1"], best)
        row["hybrid_not_worse"] = None if best is None else bool(row["rel_l1"] <= best * (1 + tol) + 1e-12)


def pareto(rows: list[dict], key: str = "rel_l1") -> list[dict]:
    """The points no other point beats on both sparsity (higher) and error (lower), by sparsity."""
    pts = sorted((x for x in rows if x.get(key) is not None), key=lambda x: (-x["sparsity"], x[key]))
    front, best = [], math.inf
    for x in pts:
        if x[key] < best:
            front.append(x)
            best = x[key]
    return front[::-1]


def frontier(rows: list[dict], targets, key: str = "rel_l1", tol: float = 0.02) -> list[dict]:
    """Per target sparsity s and rule: the error of that rule's Pareto front at exactly s.

    Linear interpolation between the two front points around s (errors per row kind along with
    it); None where s lies outside the rule's sweep. ``hybrid_not_worse``: hybrid's error at s
    is within ``tol`` of the better single rule's.
    """
    out = []
    for s in targets:
        r = {"sparsity_target": s}
        for rule in RULES:
            front = pareto([x for x in rows if x["rule"] == rule], key)
            for name in ("", "_flat_rows", "_sink_rows"):
                k = key + name
                pts = [(x["sparsity"], x[k]) for x in front if x.get(k) is not None]
                r[f"{rule}_err{name}"] = _interp(pts, s) if len(pts) == len(front) else None
        singles = [r[f"{x}_err"] for x in ("topk", "topp") if r[f"{x}_err"] is not None]
        r["hybrid_not_worse"] = (None if r["hybrid_err"] is None or not singles
                                 else bool(r["hybrid_err"] <= min(singles) * (1 + tol) + 1e-12))
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# Report


SWEEP_COLUMNS = [("rule", "rule"), ("topk", "topk"), ("topp", "topp"), ("sparsity", "sparsity"),
                 ("rel_l1", "rel L1"), ("rel_l1_flat_rows", "flat rows"), ("rel_l1_sink_rows", "sink rows"),
                 ("rel_l1_other_rows", "other rows"), ("kept_blocks_flat_rows", "blocks kept (flat)"),
                 ("kept_blocks_sink_rows", "blocks kept (sink)"),
                 ("best_single_err_same_sparsity", "best single rule, same sparsity"),
                 ("hybrid_vs_best_single", "hybrid / best single"), ("hybrid_not_worse", "hybrid not worse")]
FRONTIER_COLUMNS = [("sparsity_target", "sparsity"),
                    ("topk_err", "top-k"), ("topp_err", "top-p"), ("hybrid_err", "hybrid"),
                    ("topk_err_flat_rows", "top-k flat rows"), ("topp_err_flat_rows", "top-p flat rows"),
                    ("hybrid_err_flat_rows", "hybrid flat rows"),
                    ("topk_err_sink_rows", "top-k sink rows"), ("topp_err_sink_rows", "top-p sink rows"),
                    ("hybrid_err_sink_rows", "hybrid sink rows"),
                    ("hybrid_not_worse", "hybrid <= best single")]


def markdown(result: dict) -> list[tuple[str, str]]:
    secs = []
    for src in result["sources"]:
        name = src["name"]
        share = src.get("row_share") or {}
        hyb = [r for r in src["rows"] if r["rule"] == "hybrid" and r.get("hybrid_not_worse") is not None]
        n_ok = sum(bool(r["hybrid_not_worse"]) for r in hyb)
        head = (f"{src.get('description', '')}\n\nRow kinds (from block scores): "
                f"flat {100 * share.get('flat', 0):.1f}%, sink-dominated {100 * share.get('sink', 0):.1f}%, "
                f"other {100 * share.get('other', 0):.1f}% of query blocks. Hybrid points not worse than "
                f"the better single rule at the same sparsity (2% tolerance): {n_ok} of {len(hyb)} "
                "comparable.\n\n")
        secs.append((f"{name}: relative L1 error per rule at equal sparsity (Pareto front, interpolated)",
                     head + O.table(src["frontier"], FRONTIER_COLUMNS)))
        secs.append((f"{name}: the sweep", O.table(src["rows"], SWEEP_COLUMNS)))
    if result.get("errors"):
        secs.append(("Failures", "\n".join(f"- {k}: {v}" for k, v in result["errors"].items())))
    return secs


def plot(result: dict, path: Path):
    plt = O.plt()
    if plt is None or not result["sources"]:
        return None
    panels = [("rel_l1", "all rows"), ("rel_l1_flat_rows", "flat rows"), ("rel_l1_sink_rows", "sink rows"),
              ("rel_l1_other_rows", "other rows")]
    srcs = result["sources"]
    fig, axes = plt.subplots(len(srcs), len(panels), figsize=(4 * len(panels), 3.4 * len(srcs)),
                             squeeze=False)
    style = {"topk": dict(marker="o", ls="-"), "topp": dict(marker="s", ls="-"),
             "hybrid": dict(marker="^", ls="")}
    for i, src in enumerate(srcs):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for rule in RULES:
                pts = sorted((100 * r["sparsity"], r[key]) for r in src["rows"]
                             if r["rule"] == rule and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), label=rule, **style[rule])
            ax.set_title(f"{src['name']}: {title}")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("relative L1 error")
            ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8, loc="upper left")
    return O.save_fig(fig, path, quick=bool(result["args"].get("quick")))


def write(result: dict, out: Path, plots: bool = True) -> dict:
    """JSON, markdown and (``plots``) the PNG; the runs' intermediate writes skip the PNG."""
    return O.write_result(out, "accuracy", "Accuracy vs sparsity per mask rule", result, markdown(result),
                          plot if plots else None, plot_errors="errors")


# --------------------------------------------------------------------------------------------
# CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None, help="T,H,W of the token grid (default 21,30,52 = 32760 "
                   "tokens, Wan2.1 480p; --quick: 4,8,8)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--acc-block-q", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--acc-block-k", type=int, default=None, help="default 64 (--quick: 16)")
    p.add_argument("--sources", default=None, help="comma list of video,trained (default both; "
                   "--quick: video)")
    p.add_argument("--train-steps", type=int, default=300, help="steps for the trained source")
    p.add_argument("--train-grid", default="8,16,16", help="T,H,W of the trained source's grid")


def run(args) -> dict:
    out = Path(args.out)
    quick = bool(getattr(args, "quick", False))
    device = C.pick_device(quick)
    T, Hh, W = (int(x) for x in (args.grid or ("4,8,8" if quick else "21,30,52")).split(","))
    D = args.head_dim or (32 if quick else 128)
    bq = args.acc_block_q or (32 if quick else 128)
    bk = args.acc_block_k or (16 if quick else 64)
    sources = (args.sources or ("video" if quick else "video,trained")).split(",")
    grids = ({"topk": QUICK_TOPK, "topp": QUICK_TOPP, "hybrid": QUICK_HYBRID} if quick else
             {"topk": FULL_TOPK, "topp": FULL_TOPP, "hybrid": FULL_HYBRID})
    result = {"benchmark": "accuracy", "env": C.environment(device), "command": O.command_line(),
              "args": dict(grid=[T, Hh, W], head_dim=D, block_q=bq, block_k=bk, sources=sources,
                           quick=quick, flat_entropy=FLAT_ENTROPY, sink_mass=SINK_MASS),
              "sources": [], "errors": {}}
    t0 = time.perf_counter()
    with C.torch_path_on_cpu(device), torch.no_grad():
        for name in sources:
            name = name.strip()
            print(f"[accuracy] source {name}", flush=True)
            if name == "video":
                kinds = HEAD_KINDS_QUICK if quick else HEAD_KINDS_FULL
                qkv = video_qkv(T, Hh, W, kinds, D, device, seed=0, sink_tokens=2 * bk)
                desc = (f"Synthetic video-like Q/K/V: {T}x{Hh}x{W} = {T * Hh * W} tokens, head dim {D}, "
                        f"3-D RoPE, heads {', '.join(kinds)}; blocks {bq}x{bk}.")
            elif name == "trained":
                tT, tH, tW = (int(x) for x in args.train_grid.split(","))
                heads = 4
                with torch.enable_grad():
                    got = C.guarded(lambda: trained_qkv(tT, tH, tW, min(D, 64), heads, device,
                                                        args.train_steps), result["errors"], "trained")
                if got is None:
                    continue
                qkv, loss = got
                kinds = [f"head{i}" for i in range(heads)]
                desc = (f"Q/K/V of the last layer of a 2-layer video transformer trained {args.train_steps} "
                        f"steps on moving blobs (next-frame prediction, final loss {loss:.4g}): "
                        f"{tT}x{tH}x{tW} = {tT * tH * tW} tokens, {heads} heads, head dim {min(D, 64)}; "
                        f"blocks {bq}x{bk}.")
            else:
                result["errors"][name] = f"unknown source {name!r}"
                continue
            q, k, v = qkv
            rows, share = sweep(q, k, v, kinds, bq, bk, grids, result["errors"])
            compare(rows)
            src = {"name": name, "description": desc, "tokens": q.shape[2], "head_kinds": kinds,
                   "row_share": share, "rows": rows,
                   "frontier": frontier(rows, [0.5, 0.7] if quick else TARGETS)}
            result["sources"].append(src)
            result["seconds"] = time.perf_counter() - t0
            write(result, out, plots=False)
    result["seconds"] = time.perf_counter() - t0
    result["files"] = write(result, out)
    return result


main = module_entry(__spec__.name)  # python -m bench.accuracy [options]

if __name__ == "__main__":
    raise SystemExit(main())
