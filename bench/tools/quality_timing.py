"""bench quality's attention timing on its own shape (B=8, H=4, N=9216, D=64, bf16, 97%: hybrid
topk 0.015 / topp 0.076, the config the 2026-12-04 run calibrated): GPU time from a CUDA graph
against eager time (host included), three rounds, for the sparse attention and the sla / sla-all
branches: whether the GPU time is stable where the eager one was not.

    PYTHONPATH=. python -m bench.tools.quality_timing        # CUDA; writes $OUT/quality_timing.json
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

import sparge_compile as sc
from bench import output as O
from bench.quality import attention_ms


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (8, 4, 9216, 64)
    q, k, v = (torch.randn(*shape, device="cuda", generator=g) for _ in range(3))
    offsets = torch.randn(8, 4, 9216 // 64, 1, device="cuda", generator=g)
    k = k + offsets.repeat_interleave(64, dim=2)   # per-key-block offsets: structured scores
    cfg = sc.SpargeConfig(topk=0.015, topp=0.0758, min_seq_len=0)
    args = SimpleNamespace(dim=256, heads=4)
    rows = []
    for rnd in range(3):
        for name, kw in (("sparse", None), ("sla", {"combine": "sla"}), ("sla-all", {"combine": "sla-all"})):
            rows.append({"round": rnd, "variant": name, **attention_ms(cfg, kw, (q, k, v), args)})
            print(rows[-1], flush=True)
    O.write_json(Path(os.environ.get("OUT", "out")) / "quality_timing.json", {"rows": rows})


if __name__ == "__main__":
    main()
