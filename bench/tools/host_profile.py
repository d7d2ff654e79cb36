"""Where a compiled step's host time goes: per sparge site its path (native launches or Python
ops), and the CPU ops of one step by self CPU time (torch.profiler, CPU and CUDA activity).

    PYTHONPATH=. python -m bench.tools.host_profile --model dit --targets dense,0.9,0.95 --out $OUT

The model of ``bench models`` (real config, random weights), compiled block-wise as diffusers
users do; inductor dense and each target: the step's wall and host ms, each site's state, the top CPU ops.
Writes host_profile.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparge_compile as sc
from bench import common as C
from bench import model_steps as M


def sites(be) -> list[dict]:
    out = []
    for g in be.graphs:
        for s in g.sites:
            st = s.state
            out.append(dict(graph=s.graph, site=s.name, rewritten=s.rewritten, reason=s.reason,
                            sparsity=s.sparsity, calls=s.calls, shapes=s.shapes,
                            native=None if st is None else st.native,
                            per_owner=None if st is None else st.per_owner is not None))
    return out


def cpu_top(model, inp, n: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**inp)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [dict(name=e.key[:100], self_cpu_us=e.self_cpu_time_total, calls=e.count) for e in rows]


def one_target(a, t, inp, dev, dt) -> dict:
    """t: a target sparsity, or None: inductor dense (the host cost to compare with)."""
    be = "inductor" if t is None else sc.backend(config=sc.SpargeConfig(topk=1 - t, topp=0.0,
                                                                         min_seq_len=1024))
    torch._dynamo.reset()
    model = M.compile_blockwise(M.build(a.model, False, dev, dt)[0], be)
    with torch.no_grad():
        model(**inp)
        step = M.step_ms(lambda: model(**inp), dev, a.reps)
        host = M.host_ms(lambda: model(**inp), dev, a.reps)
    row = dict(target=t, step_ms=step, host_ms=host, sites=[] if t is None else sites(be),
               cpu_top=cpu_top(model, inp))
    print(json.dumps({k: v for k, v in row.items() if k != "cpu_top"}, default=str)[:1500], flush=True)
    for r in row["cpu_top"][:14]:
        print(f"  {r['self_cpu_us']:9.0f} us {r['calls']:5d}x {r['name']}", flush=True)
    C.sync(dev)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", choices=sorted(M.FULL))
    p.add_argument("--targets", default="dense,0.9,0.95", help="comma-separated: dense (inductor) "
                   "and target sparsities")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="/tmp/host_profile")
    a = p.parse_args()
    from bench.common import allow_broken_torchvision

    allow_broken_torchvision()
    dev, dt = torch.device("cuda"), torch.bfloat16
    inp = M.step_inputs(a.model, False, dev, dt)
    res = [one_target(a, None if t == "dense" else float(t), inp, dev, dt) for t in a.targets.split(",")]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "host_profile.json").write_text(json.dumps(dict(model=a.model, rows=res), indent=1,
                                                              default=str))


if __name__ == "__main__":
    main()
