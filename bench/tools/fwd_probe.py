# ruff: noqa: E501, E731
"""How the sparse forward loads K and V (pointer loads, host-built TMA descriptors, descriptors
built in the kernel) eagerly and in the compiled (native, Inductor-launched) path, Wan's strided
layout at 32760 / 32768 tokens, 95%: correctness against the pointer path, then times.

    PYTHONPATH=. python bench/tools/fwd_probe.py          # CUDA; writes $OUT/fwd_probe.json
"""
import json
import os
import traceback

import torch
import torch.nn.functional as F
import triton

import sparge_compile as sc
from sparge_compile.kernels import forward

CFG = sc.SpargeConfig(topk=0.05, topp=0.0, min_seq_len=0)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=200)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def eager(res, N, q, k, v):
    m = sc.predict_block_mask(q, k, config=CFG)
    args = (m.kv_num_blocks, m.kv_indices, 128 ** -0.5, False, CFG.block_q, CFG.block_k)
    base, base_lse = forward.attention_fwd_triton(q, k, v, *args, use_tma=False)
    for name, mode in (("pointer", False), ("host TMA", True), ("device TMA", "device")):
        out, lse = forward.attention_fwd_triton(q, k, v, *args, use_tma=mode)
        res[f"N{N} eager {name}: max |out - pointer|"] = (out.float() - base.float()).abs().max().item()
        res[f"N{N} eager {name}: max |lse - pointer|"] = (lse - base_lse).abs().max().item()
        res[f"N{N} eager {name} kernel ms"] = bench(lambda: forward.attention_fwd_triton(q, k, v, *args, use_tma=mode))


def compiled(res, N, q, k, v, ref, device_tma, mode):
    forward.DEVICE_TMA_DEFAULT = device_tma
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=sc.backend(config=CFG), mode=mode)
    tag = f"N{N} compiled {'device TMA' if device_tma else 'pointer'} {mode or 'default'}"
    try:
        for _ in range(3):
            out = fn(q, k, v).clone()
        res[f"{tag}: rel diff vs eager"] = rel(out, ref)
        res[f"{tag} total ms"] = bench(lambda: fn(q, k, v))
    except Exception as e:   # noqa: BLE001 - the probe reports every variant
        res[f"{tag} error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for N in (32760, 32768):
        q, k, v = (torch.randn(1, N, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        eager(res, N, q, k, v)
        ref = sc.sparse_attention(q, k, v, config=CFG)
        for device_tma, mode in ((False, None), (True, None), (True, "reduce-overhead")):
            compiled(res, N, q, k, v, ref, device_tma, mode)
        res[f"N{N} dense sdpa ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        print(json.dumps(res, indent=0), flush=True)
    json.dump(res, open(f"{os.environ.get('OUT', '/tmp')}/fwd_probe.json", "w"), indent=1)


if __name__ == "__main__":
    main()
