"""Merge the JSON of several runs into one report: ``python -m bench report DIR... --out DIR``.

Each folder holds the ``kernels.json`` / ``accuracy.json`` / ``e2e.json`` of an earlier run (e.g.
subsets measured in separate device commands); rows are concatenated per part, the end-to-end
speed-ups recomputed against one dense row. Writes each part's files, ``report.md`` (every table)
and ``summary.json`` (the headline numbers), as ``python -m bench all`` does.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from bench import common as C
from bench import output as O
from bench.cli import module_entry

PARTS = ("kernels", "accuracy", "e2e")
COMMON_ARGS = False  # only reads earlier runs: no --quick


def part(name: str):
    return importlib.import_module(f"bench.{name}")


def summary(results: dict) -> dict:
    """Headline numbers: kernel ratios at ~95%, hybrid vs single rules, end-to-end speed-up."""
    out: dict = {}
    k = results.get("kernels")
    if k:
        pts = [r for r in k["rows"] if abs((r.get("sparsity_target") or 0) - 0.95) < 1e-6]
        out["kernels_95"] = [{key: r.get(key) for key in (
            "N", "D", "sparsity", "sparge_fwd_ms", "flex_fwd_ms", "sparge_over_flex_fwd", "predict_ms",
            "sparge_fwdbwd_ms", "flex_sq_fwdbwd_ms", "sparge_over_flex_sq_fwdbwd", "sparge_rel_err")}
            for r in pts]
        errs = [r.get("sparge_rel_err") for r in k["rows"] if r.get("sparge_rel_err") is not None]
        out["kernels_max_rel_err"] = max(errs) if errs else None
    a = results.get("accuracy")
    if a:
        out["accuracy"] = []
        for src in a["sources"]:
            hyb = [r for r in src["rows"] if r.get("hybrid_not_worse") is not None]
            out["accuracy"].append({"source": src["name"], "hybrid_points": len(hyb),
                                    "hybrid_not_worse": sum(bool(r["hybrid_not_worse"]) for r in hyb),
                                    "frontier": src["frontier"]})
    e = results.get("e2e")
    if e:
        out["e2e"] = [{key: r.get(key) for key in ("variant", "sparsity", "fwd_ms", "speedup_fwd",
                                                   "attn_share_fwd", "train_ms", "speedup_train")}
                      for r in e["rows"]]
    return out


def _one_dense_row(e2e: dict) -> None:
    """One dense row (the first measured) in a merged e2e result, speed-ups against it."""
    rows = e2e["rows"]
    dense = [x for x in rows if x["variant"] == "dense"]
    base = next((x for x in dense if x.get("fwd_ms")), dense[0] if dense else None)
    e2e["rows"] = ([base] if base else []) + [x for x in rows if x["variant"] != "dense"]
    for x in e2e["rows"][1:]:
        x["speedup_fwd"] = C.ratio((base or {}).get("fwd_ms"), x.get("fwd_ms"))
        x["speedup_train"] = C.ratio((base or {}).get("train_ms"), x.get("train_ms"))


def merge(dirs: list[Path]) -> dict:
    """Results of several runs (e.g. subsets on separate device commands), merged per part."""
    merged: dict = {}
    for d in dirs:
        for name in PARTS:
            f = Path(d) / f"{name}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            if name not in merged:
                merged[name] = r
                continue
            m = merged[name]
            for key in ("rows", "dense", "sources"):
                if key in r:
                    m.setdefault(key, []).extend(r[key])
            m["command"] = f"{m.get('command')}; {r.get('command')}"
    if "e2e" in merged:
        _one_dense_row(merged["e2e"])
    return merged


def finish(results: dict, out: Path, t0: float, env: dict | None) -> None:
    """report.md (every table) and summary.json (the headline numbers) for ``results``."""
    sections = [(f"{n}: {h}", b) for n, r in results.items() if "failed" not in r
                for h, b in part(n).markdown(r)]
    env = env or next((r["env"] for r in results.values() if "env" in r), None)
    O.write_markdown(out / "report.md", "sparge-compile benchmark report", sections, env, O.command_line())
    O.write_json(out / "summary.json", {"env": env, "command": O.command_line(),
                                        "seconds": time.perf_counter() - t0,
                                        "parts": {n: ("failed" if "failed" in r else "ok")
                                                  for n, r in results.items()},
                                        "part_seconds": {n: r.get("seconds") for n, r in results.items()},
                                        "summary": summary({n: r for n, r in results.items()
                                                            if "failed" not in r})})


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", help="output folders of earlier runs")
    p.add_argument("--out", required=True, help="folder for the merged report")


def run(args) -> dict:
    out, t0 = Path(args.out), time.perf_counter()
    results = merge([Path(d) for d in args.dirs])
    for name, r in results.items():
        part(name).write(r, out)
    finish(results, out, t0, None)
    print((out / "report.md").read_text())
    return results


main = module_entry(__spec__.name)  # python -m bench.report [options]

if __name__ == "__main__":
    raise SystemExit(main())
