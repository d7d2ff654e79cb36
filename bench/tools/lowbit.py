"""Low-bit forward (GPU, issue 23): correctness first, then times at B=1, H=12, N=32768, D=128, bf16.

1. Correctness (exits non-zero on a failure): each variant's output against exact fp32 attention
   on the same mask (relative error and cosine within :data:`BOUNDS`) and against the float64
   simulation of its own quantized inputs; random and structured (model-like) inputs.
2. Times (``triton.testing.do_bench`` medians, ms) at 90/95/97% sparsity (Top-k masks from
   sparge's prediction: every query block keeps the same count): the mask prediction, the bf16
   sparge kernel, each variant's quantization pass and kernel alone, and the total (prediction +
   quantization + kernel). At 95% every variant is also timed over launch settings (warps x
   stages x TMA); the best launch is used at 90/97 and for the totals. FlashAttention-4's
   block-sparse forward as a peer where ``flash_attn.cute`` imports.

Variants: name -> (precision, P·V, V layout); ``--variants`` picks some. Writes $OUT/lowbit.json.

    PYTHONPATH=. python -m bench.tools.lowbit [--variants fp8,int8] [--full-sweep]
"""
from __future__ import annotations

import argparse
import json
import os
import traceback
from functools import partial
from pathlib import Path

import torch
import triton

from bench.cli import module_entry
from bench.data import structured_qkv
from bench.tools import require_cuda

B, H, N, D = 1, 12, 32768, 128
BLOCK_Q, BLOCK_K = 128, 64
SPARSITIES = (0.95, 0.90, 0.97)  # 0.95 first: its launch sweep picks the launch of the others
VARIANTS = {  # name -> (precision, pv, v_layout)
    "fp8": ("fp8", "fp8", "dn"), "fp8_vnd": ("fp8", "fp8", "nd"), "fp8_pvhalf": ("fp8", "half", "dn"),
    "int8": ("int8", "half", "dn"), "int8_pvfp8": ("int8", "fp8", "dn"),
}
LAUNCHES = [(w, s, t) for w in (4, 8) for s in (2, 3) for t in (True, False)]
# (rel error, cosine) against exact attention on the same mask; the target is 3e-2 / 0.999,
# FP8 P·V or FP8 Q·Kᵀ on zero-mean random data measures ~4-5e-2 (tests/test_lowbit.py)
BOUNDS = {("int8", "random"): (3e-2, 0.999), ("fp8", "random"): (6e-2, 0.998),
          ("int8", "structured"): (3e-2, 0.999), ("fp8", "structured"): (3e-2, 0.999)}


def time_ms(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def predicted_mask(q, k, sparsity):
    from sparge_compile import kernels

    return partial(kernels.predict_mask, q, k, D ** -0.5, False, 1.0 - sparsity, 0.0, "topk", BLOCK_Q,
                   BLOCK_K)


def check_variant(name, kind, q, k, v, num, idx) -> dict:
    """One variant's errors at a correctness shape (see the module docstring)."""
    from sparge_compile.kernels import quant as Q
    from sparge_compile.kernels.forward_lowbit import lowbit_kernel
    from sparge_compile.kernels.quant_triton import quantize_inputs_triton

    precision, pv, layout = VARIANTS[name]
    Nq, d = q.shape[2], q.shape[3]
    z = quantize_inputs_triton(q, k, v, d ** -0.5, BLOCK_Q, BLOCK_K, precision, pv, layout == "dn")
    out, lse = lowbit_kernel(z, num, idx, d ** -0.5, False, BLOCK_Q, BLOCK_K, Nq, Nq, d, q.dtype)
    ex = Q.exact_attention(q, k, v, num, idx, d ** -0.5, False, BLOCK_Q, BLOCK_K, dtype=torch.float32)
    v8 = z.v8.transpose(-1, -2) if z.v_t else z.v8
    zs = z._replace(q8=z.q8[:, :, :Nq, :d], k8=z.k8[:, :, :Nq, :d],
                    v8=v8[:, :, :Nq, :d] if z.vs is not None else v)
    sim, _ = Q.simulate_lowbit(zs, num, idx, d ** -0.5, False, BLOCK_Q, BLOCK_K)
    bound, cos = BOUNDS[(precision, kind)]
    res = dict(rel_vs_exact=round(rel(out, ex), 5), cos_vs_exact=round(cosine(out, ex), 6),
               rel_vs_simulation=round(rel(out, sim), 6))
    res["ok"] = (res["rel_vs_exact"] <= bound and res["cos_vs_exact"] >= cos
                 and res["rel_vs_simulation"] < 3e-3)
    return res


def correctness(names) -> dict:
    from sparge_compile.kernels import torch_impl

    res = {}
    for kind in ("random", "structured"):
        Hc, Nc = 4, 2048
        if kind == "random":
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, Hc, Nc, D, device="cuda", generator=g, dtype=torch.bfloat16)
                       for _ in range(3))
        else:
            q, k, v = structured_qkv(1, Hc, Hc, Nc, D, "cuda", torch.bfloat16)
        dense = torch.rand(1, Hc, Nc // BLOCK_Q, Nc // BLOCK_K, device="cuda") < 0.3
        dense[..., 0] = True
        num, idx = torch_impl.dense_to_indices(dense)
        for name in names:
            try:
                res[f"{name}/{kind}"] = check_variant(name, kind, q, k, v, num, idx)
            except Exception as e:  # a variant Triton does not compile: recorded, not fatal
                res[f"{name}/{kind}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": None}
            print("check", name, kind, res[f"{name}/{kind}"], flush=True)
    return res


def _guarded(fn):
    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def time_variant(name, q, k, v, num, idx, predict, launches) -> dict:
    """Quantization, kernel (per launch setting) and total times of one variant at one mask."""
    from sparge_compile.kernels.forward_lowbit import lowbit_kernel
    from sparge_compile.kernels.quant_triton import quantize_inputs_triton

    precision, pv, layout = VARIANTS[name]
    quantize = partial(quantize_inputs_triton, q, k, v, D ** -0.5, BLOCK_Q, BLOCK_K, precision, pv,
                       layout == "dn")
    z = quantize()
    res = {"quant_ms": time_ms(quantize), "kernel_ms": {}}
    for w, s, t in launches:
        run = partial(lowbit_kernel, z, num, idx, D ** -0.5, False, BLOCK_Q, BLOCK_K, N, N, D, q.dtype,
                      num_warps=w, num_stages=s, use_tma=t)
        res["kernel_ms"][f"w{w}s{s}tma{int(t)}"] = _guarded(lambda: time_ms(run))
    timed = {key: ms for key, ms in res["kernel_ms"].items() if isinstance(ms, float)}
    if not timed:
        return res
    best = min(timed, key=timed.get)
    w, s, t = int(best[1]), int(best[3]), best.endswith("1")
    res.update(best_launch=best, best_kernel_ms=timed[best])

    def total():
        n, i = predict()
        return lowbit_kernel(quantize(), n, i, D ** -0.5, False, BLOCK_Q, BLOCK_K, N, N, D, q.dtype,
                             num_warps=w, num_stages=s, use_tma=t)

    res["total_ms"] = time_ms(total)
    return res


def fa4_ms(q, k, v, sparsity):
    """FlashAttention-4's block-sparse forward at 128 x 128 blocks, the same kept count per row."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    nb = N // 128
    keep = max(1, round((1 - sparsity) * nb))
    idx = torch.rand(B, H, nb, nb, device="cuda").argsort(-1)[..., :keep].sort(-1).values.to(torch.int32)
    cnt = torch.full((B, H, nb), keep, dtype=torch.int32, device="cuda")
    bs = BlockSparseTensorsTorch(mask_block_cnt=cnt, mask_block_idx=idx.contiguous(), full_block_cnt=None,
                                 full_block_idx=None)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return time_ms(lambda: flash_attn_func(qt, kt, vt, block_sparse_tensors=bs))


def at_sparsity(sparsity, q, k, v, names, launch_sets) -> dict:
    from sparge_compile.kernels import forward

    predict = predicted_mask(q, k, sparsity)
    num, idx = predict()
    bf16 = partial(forward.attention_fwd_triton, q, k, v)
    res = {"kept_blocks": int(num[0, 0, 0]), "predict_ms": time_ms(predict),
           "bf16_kernel_ms": time_ms(lambda: bf16(num, idx, D ** -0.5, False, BLOCK_Q, BLOCK_K)),
           "bf16_total_ms": time_ms(lambda: bf16(*predict(), D ** -0.5, False, BLOCK_Q, BLOCK_K))}
    for name in names:
        res[name] = _guarded(lambda: time_variant(name, q, k, v, num, idx, predict, launch_sets[name]))
        print(f"{sparsity:.2f}", name, json.dumps(res[name]), flush=True)
    res["fa4_block_sparse_ms"] = _guarded(lambda: fa4_ms(q, k, v, sparsity))
    return res


COMMON_ARGS = False  # a GPU tool


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.environ.get("OUT", "out"),
                   help="folder for lowbit.json (default $OUT, else ./out)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--full-sweep", action="store_true",
                   help="sweep launches for every variant (default: only fp8 and int8; ~2 s a compile)")


def _table(res) -> str:
    names = res["variants"]
    head = " | ".join(f"{n} quant / kernel / total" for n in names)
    lines = [f"| sparsity | predict | bf16 kernel | bf16 total | {head} | FA4 |",
             "|" + " --- |" * (5 + len(names))]
    for sp, r in res["times"].items():
        cells = [sp, str(r["predict_ms"]), str(r["bf16_kernel_ms"]), str(r["bf16_total_ms"])]
        for n in names:
            x = r.get(n, {})
            kernel = f"{x.get('best_kernel_ms')} ({x.get('best_launch')})"
            cells.append(f"{x.get('quant_ms')} / {kernel} / {x.get('total_ms')}")
        fa4 = r["fa4_block_sparse_ms"]
        cells.append(str(fa4) if isinstance(fa4, float) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> dict:
    require_cuda("lowbit")
    from sparge_compile.kernels import tuning

    tuning.AUTOTUNE = False
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(B=B, H=H, N=N, D=D, dtype="bfloat16", block_q=BLOCK_Q, block_k=BLOCK_K),
           "variants": names, "correctness": correctness(names), "times": {}}
    (out / "lowbit.json").write_text(json.dumps(res, indent=1))
    failed = [key for key, r in res["correctness"].items() if r["ok"] is False]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for sp in SPARSITIES:
        best = {n: res["times"].get("0.95", {}).get(n, {}).get("best_launch") for n in names}
        sweep = sp == 0.95
        launch_sets = {n: (LAUNCHES if sweep and (args.full_sweep or n in ("fp8", "int8"))
                           else [_parse(best[n])] if best[n] else [(4, 2, True)]) for n in names}
        try:
            res["times"][f"{sp:.2f}"] = at_sparsity(sp, q, k, v, names, launch_sets)
        except Exception:
            res["times"][f"{sp:.2f}"] = {"error": traceback.format_exc()[-1500:]}
        (out / "lowbit.json").write_text(json.dumps(res, indent=1))  # a run cut short keeps what it has
    ok_times = {sp: r for sp, r in res["times"].items() if "error" not in r}
    print(_table(dict(res, times=ok_times)))
    if failed:
        print("CORRECTNESS FAILED:", failed, flush=True)
        raise SystemExit(1)
    return res


def _parse(key: str):
    return int(key[1]), int(key[3]), key.endswith("1")


main = module_entry(__spec__.name)  # python -m bench.tools.lowbit [options]

if __name__ == "__main__":
    raise SystemExit(main())
