"""``python -m bench all``: kernels, accuracy and e2e in one run, then ``report.md`` (every table)
and ``summary.json`` (the headline numbers) beside each part's files.

    python -m bench all --out results          # everything (GPU; see each part for its options)
    python -m bench all --quick --out /tmp/b   # tiny CPU smoke run
    python -m bench all --skip e2e --shapes 32768x128 --sparsities 0,95 --out results

One part failing records its error in ``summary.json`` and the others still run. The options
are the parts' own; e2e's sparsities are ``--e2e-sparsities`` here (``--sparsities`` is the
kernels').
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import common as C
from bench import output as O
from bench.cli import module_entry
from bench.report import PARTS, finish, part


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip", default="", help="comma list of parts to leave out (kernels, accuracy, e2e)")
    part("kernels").add_args(p)
    part("accuracy").add_args(p)
    part("e2e").add_args(p, standalone=False)  # --sparsities is the kernels'; e2e's is --e2e-sparsities


def run_part(name: str, args) -> dict:
    """One part's result, or {"failed": message}: one part failing must not lose the others."""
    t0 = time.perf_counter()
    try:
        result = part(name).run(args)
    except Exception as e:  # noqa: BLE001
        print(f"[{name}] failed: {C.short_error(e)}", flush=True)
        return {"benchmark": name, "failed": C.short_error(e)}
    result["seconds"] = time.perf_counter() - t0
    O.print_sections(part(name).markdown(result), prefix=f"{name}: ")
    print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return result


def run(args) -> dict:
    out, t0 = Path(args.out), time.perf_counter()
    skip = set(args.skip.split(","))
    results = {name: run_part(name, args) for name in PARTS if name not in skip}
    finish(results, out, t0, C.environment(C.pick_device(args.quick)))
    print(f"\nwrote {out}/ in {time.perf_counter() - t0:.1f} s", flush=True)
    return results


main = module_entry(__spec__.name)  # python -m bench.suite [options]

if __name__ == "__main__":
    raise SystemExit(main())
