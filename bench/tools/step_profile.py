"""Where a model step's GPU time goes: torch.profiler over one compiled step, kernels grouped.

    PYTHONPATH=. python -m bench.tools.step_profile --model wan --target 0.95 --out $OUT

Builds the model of ``bench models`` (real config, random weights), compiles it block-wise with
inductor (dense) and with sparge at the target, profiles one step of each after warm-up and
writes step_profile.json: per variant the step's wall ms, summed GPU kernel ms, kernel launches,
and the top kernels by GPU time with their category (attention, mask prediction, matmul, other).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparge_compile as sc
from bench import kernel_times as K
from bench import model_steps as M
from bench.common import allow_broken_torchvision


def profile_step(model, inp) -> dict:
    with torch.no_grad():
        for _ in range(3):
            model(**inp)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inp)
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end)
        kernels = K.kernel_ms(lambda: model(**inp))
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(step_ms=wall, gpu_ms=sum(v[0] for v in kernels.values()),
                launches=sum(v[1] for v in kernels.values()), by_category=K.by_category(kernels),
                top=[dict(name=n[:120], ms=v[0], calls=v[1], category=K.category(n)) for n, v in top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan", choices=sorted(M.FULL))
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--out", default="/tmp/step_profile")
    a = p.parse_args()
    allow_broken_torchvision()
    dev, dt = torch.device("cuda"), torch.bfloat16
    inp = M.step_inputs(a.model, False, dev, dt)
    res = {}
    for variant in ("inductor", "sparge"):
        be = variant if variant == "inductor" else sc.backend(
            config=sc.SpargeConfig(topk=1 - a.target, topp=0.0, min_seq_len=1024))
        torch._dynamo.reset()
        model = M.compile_blockwise(M.build(a.model, False, dev, dt)[0], be)
        res[variant] = profile_step(model, inp)
        summary = {k: v for k, v in res[variant].items() if k != "top"}
        print(variant, json.dumps(summary, indent=1), flush=True)
        for row in res[variant]["top"][:12]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:5d}x {row['category']:<22} {row['name'][:70]}")
        del model
        torch.cuda.empty_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = dict(model=a.model, target=a.target, **res)
    (Path(a.out) / "step_profile.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
