"""``python -m bench {kernels,accuracy,e2e,all}``: the benchmark report.

    python -m bench all --out results          # everything (GPU; see each module for its options)
    python -m bench all --quick --out /tmp/b   # tiny CPU smoke run (the test uses it)
    python -m bench kernels --shapes 32768x128 --sparsities 0,95 --out results
    python -m bench report run1 run2 --out merged   # merge subset runs into one report
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import accuracy, common as C, e2e, kernels

MODULES = {"kernels": kernels, "accuracy": accuracy, "e2e": e2e}


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


def merge(dirs: list[Path]) -> dict:
    """Results of several runs (e.g. subsets on separate device commands), merged per part."""
    import json

    merged: dict = {}
    for d in dirs:
        for name in MODULES:
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
    if "e2e" in merged:  # one dense row (the first measured), speed-ups against it
        rows = merged["e2e"]["rows"]
        dense = [x for x in rows if x["variant"] == "dense"]
        base = next((x for x in dense if x.get("fwd_ms")), dense[0] if dense else None)
        merged["e2e"]["rows"] = ([base] if base else []) + [x for x in rows if x["variant"] != "dense"]
        for x in merged["e2e"]["rows"][1:]:
            x["speedup_fwd"] = C.ratio((base or {}).get("fwd_ms"), x.get("fwd_ms"))
            x["speedup_train"] = C.ratio((base or {}).get("train_ms"), x.get("train_ms"))
    return merged


def finish(results: dict, out: Path, t0: float, env: dict | None) -> None:
    """report.md (every table) and summary.json (the headline numbers) for ``results``."""
    sections = [(f"{n}: {h}", b) for n, r in results.items() if "failed" not in r
                for h, b in MODULES[n].markdown(r)]
    env = env or next((r["env"] for r in results.values() if "env" in r), None)
    C.write_markdown(out / "report.md", "sparge-compile benchmark report", sections, env, C.command_line())
    C.write_json(out / "summary.json", {"env": env, "command": C.command_line(),
                                        "seconds": time.perf_counter() - t0,
                                        "parts": {n: ("failed" if "failed" in r else "ok")
                                                  for n, r in results.items()},
                                        "part_seconds": {n: r.get("seconds") for n, r in results.items()},
                                        "summary": summary({n: r for n, r in results.items()
                                                            if "failed" not in r})})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    for name, mod in MODULES.items():
        sp = sub.add_parser(name, help=mod.__doc__.splitlines()[0])
        C.add_common_args(sp)
        mod.add_args(sp)
    sp = sub.add_parser("all", help="kernels, accuracy and e2e, then report.md and summary.json")
    C.add_common_args(sp)
    sp.add_argument("--skip", default="", help="comma list of parts to leave out")
    kernels.add_args(sp)
    accuracy.add_args(sp)
    e2e.add_args(sp, standalone=False)  # --sparsities is the kernels'; e2e's is --e2e-sparsities
    sp = sub.add_parser("report", help="merge the JSON of several runs (folders) into one report")
    sp.add_argument("dirs", nargs="+", help="output folders of earlier runs")
    sp.add_argument("--out", required=True, help="folder for the merged report")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in (*MODULES, "all", "report") for a in argv) and not {"-h", "--help"} & set(argv):
        argv = ["all", *argv]  # `python -m bench --quick ...` means `all`
    args = p.parse_args(argv)
    cmd = args.cmd
    out = Path(args.out)
    t0 = time.perf_counter()
    if cmd == "report":
        results = merge([Path(d) for d in args.dirs])
        for name, r in results.items():
            MODULES[name].write(r, out)
        finish(results, out, t0, None)
        print((out / "report.md").read_text())
        return 0
    names = list(MODULES) if cmd == "all" else [cmd]
    names = [n for n in names if n not in getattr(args, "skip", "").split(",")]
    results = {}
    for name in names:
        t_part = time.perf_counter()
        try:
            results[name] = MODULES[name].run(args, out)
            results[name]["seconds"] = time.perf_counter() - t_part
        except Exception as e:  # one part failing must not lose the others' report
            print(f"[{name}] failed: {C.short_error(e)}", flush=True)
            results[name] = {"benchmark": name, "failed": C.short_error(e)}
            continue
        for heading, body in MODULES[name].markdown(results[name]):
            print(f"\n## {name}: {heading}\n\n{body}", flush=True)
        print(f"[{name}] done in {time.perf_counter() - t_part:.1f} s", flush=True)
    if cmd == "all":
        finish(results, out, t0, C.environment(C.pick_device(args.quick)))
    print(f"\nwrote {out}/ in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written; skip the interpreter's teardown of torch/Dynamo/Triton state (seconds
    # on a small CPU, most of a --quick run's tail)
    os._exit(rc)
