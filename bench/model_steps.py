"""Real diffusers models (real configs, random weights) compiled the way diffusers users compile
(``compile_repeated_blocks``): inductor dense vs sparge at the same target sparsity.

    python -m bench models --models dit,flux,wan --out $OUT        # CUDA, bf16
    python -m bench models --quick --out /tmp/m                     # CPU smoke test, tiny configs

Per model: the dense step, its attention kernels' GPU time (torch.profiler, one step: the dense
attention time and share, and the limit the mask allows: dense / (dense - 0.9 * sparsity *
attention), attention less what stays dense in the sparge step), the step with SDPA replaced by
a no-op (the older estimate of the share, kept beside it: it also drops k's and v's projections,
which then feed nothing, so it overstates the share; off CUDA it is the only one), then
sparge at each target (topk = 1 - target, topp = 0: the report's measured sparsity is printed),
each with its compile (first call) time. Writes models.json and models.md.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparge_compile as sc
from bench import common as C
from bench import kernel_times as K
from bench import output as O
from bench.cli import module_entry

# (constructor kwargs, input builder) per model; sizes as the released checkpoints have them
FULL = {
    "dit": ("DiTTransformer2DModel", dict(num_attention_heads=16, attention_head_dim=64, in_channels=4,
                                          num_layers=24, sample_size=128, patch_size=2,
                                          norm_type="ada_norm_zero", num_embeds_ada_norm=1000)),
    "flux": ("FluxTransformer2DModel", dict(num_layers=4, num_single_layers=8, attention_head_dim=128,
                                            num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, in_channels=64)),
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=12,
                                          attention_head_dim=128, in_channels=16, out_channels=16,
                                          text_dim=4096, freq_dim=256,
                                          ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                                          qk_norm="rms_norm_across_heads")),
}
QUICK = {
    "dit": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=32),
    "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, in_channels=16,
                 axes_dims_rope=(8, 12, 12)),
    "wan": dict(num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2, rope_max_seq_len=64),
}


def build(name: str, quick: bool, device, dtype, linears: str = "bf16"):
    import diffusers

    cls, kw = FULL[name]
    kw = dict(kw, **(QUICK[name] if quick else {}))
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**kw).to(device, dtype).eval()
    if linears == "float8":
        float8_linears(model)
    return model, kw


def float8_linears(model) -> None:
    """torchao float8 (dynamic per-row activation and weight scales) on the model's linear layers."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def fits(mod, _fqn):
        return isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fits)


def step_inputs(name: str, quick: bool, device, dtype) -> dict:
    """The model's step inputs (its config's sizes, random values) on ``device``."""
    return inputs(name, build(name, quick, "cpu", torch.float32)[1], quick, device, dtype)


def inputs(name: str, kw: dict, quick: bool, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    if name == "dit":
        n = kw["sample_size"]
        return dict(hidden_states=r(1, 4, n, n), timestep=torch.tensor([500], device=device),
                    class_labels=torch.tensor([7], device=device), return_dict=False)
    if name == "flux":
        side, txt = (8, 4) if quick else (64, 512)
        axis = torch.arange(float(side))
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1).reshape(-1, 3)
        img_ids = img_ids.to(device)
        return dict(hidden_states=r(1, side * side, kw["in_channels"]),
                    encoder_hidden_states=r(1, txt, kw["joint_attention_dim"]),
                    pooled_projections=r(1, kw["pooled_projection_dim"]),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype), img_ids=img_ids,
                    txt_ids=torch.zeros(txt, 3, device=device), return_dict=False)
    frames, h, w, txt = (2, 16, 16, 8) if quick else (21, 60, 104, 512)
    return dict(hidden_states=r(1, kw["in_channels"], frames, h, w),
                timestep=torch.tensor([500], device=device),
                encoder_hidden_states=r(1, txt, kw["text_dim"]), return_dict=False)


@contextlib.contextmanager
def no_attention():
    """SDPA replaced by returning q (the same shape when Dv == D): the step without attention."""
    real = F.scaled_dot_product_attention
    def noop(*args, **kw):
        q = args[0] if args else kw["query"]
        return q * 1

    F.scaled_dot_product_attention = noop
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="dit,flux,wan", help="comma-separated: dit, flux, wan")
    p.add_argument("--targets", default="0.9,0.95", help="target block sparsities (topk = 1 - target)")
    p.add_argument("--modes", default="default", help="comma-separated: default, reduce-overhead")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--linears", default="bf16",
                   help="comma-separated: bf16, float8 (torchao float8 dynamic activations and weights, "
                        "per-row scales, on every nn.Linear whose sizes are multiples of 16)")


def step_ms(fn, device, reps: int) -> float:
    """Median wall ms of ``fn()`` over ``reps`` calls after two warm-up calls (synchronized; an even
    count takes the mean of the middle two: it took the slower of 2 for Wan before 2026-12-04)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(max(1, reps)):
        C.sync(device)
        t0 = time.perf_counter()
        fn()
        C.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn, device, reps: int) -> float:
    """Median ms until ``fn()`` returns, the GPU idle before each call: the host's cost of a step
    (launches, Python, guards). Near the step time: the step is host-bound (CUDA graphs help),
    unless it launches more kernels than CUDA's launch queue holds (~1000: the call then waits
    for the GPU; Wan's step has ~1030)."""
    times = []
    for _ in range(max(1, reps)):
        C.sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    C.sync(device)
    return statistics.median(times)


def compile_blockwise(model, backend, mode: str = "default"):
    """diffusers' regional compilation of ``model`` (in place; returned): one graph per block type."""
    if not getattr(model, "_repeated_blocks", None):   # DiT declares none: its blocks, the same way
        model._repeated_blocks = [type(model.transformer_blocks[0]).__name__]
    model.compile_repeated_blocks(backend=backend, mode=None if mode == "default" else mode)
    return model


def compiled_step(build_model, backend, mode, inp, device, reps, profile: bool = True) -> dict:
    """A fresh model compiled block-wise: first (compile seconds), ms (step), out, host (ms) and,
    with ``profile`` on CUDA, attn_gpu: the GPU ms of the dense attention kernels in one profiled
    step (None otherwise)."""
    torch._dynamo.reset()
    model = compile_blockwise(build_model(), backend, mode)
    with torch.no_grad():
        C.sync(device)
        t0 = time.perf_counter()
        out = model(**inp)[0]
        C.sync(device)
        first = time.perf_counter() - t0
        ms = step_ms(lambda: model(**inp), device, reps)
        host = host_ms(lambda: model(**inp), device, reps)
        attn = K.dense_attention_ms(lambda: model(**inp)) if profile and device.type == "cuda" else None
    return dict(first=first, ms=ms, out=out.float(), host=host, attn_gpu=attn)


def _sparsity(be) -> float | None:
    sp = [s.sparsity for g in be.graphs for s in g.sites if s.rewritten and s.sparsity is not None]
    return sum(sp) / len(sp) if sp else None


def model_rows(name, a, device, dtype) -> list[dict]:
    inp = step_inputs(name, a.quick, device, dtype)
    mk = lambda: build(name, a.quick, device, dtype)[0]  # noqa: E731
    rows, reps = [], max(3, a.reps // 3) if name == "wan" else a.reps   # Wan: ~0.2-0.5 s a step
    d = compiled_step(mk, "inductor", "default", inp, device, reps)
    dense, ref = d["ms"], d["out"]
    with no_attention():
        noop = compiled_step(mk, "inductor", "default", inp, device, reps, profile=False)["ms"]
    attn = dict(noop=max(dense - noop, 0.0), gpu=d["attn_gpu"])
    main = attn["gpu"] if attn["gpu"] is not None else attn["noop"]
    rows.append(dict(model=name, variant="inductor dense", step_ms=dense, host_ms=d["host"],
                     compile_s=d["first"], speedup=1.0, attention_ms=main, attention_share=main / dense,
                     attention_noop_ms=attn["noop"], attention_noop_share=attn["noop"] / dense))
    for lin in a.linears.split(","):
        mkl = mk if lin == "bf16" else (lambda: build(name, a.quick, device, dtype, lin)[0])  # noqa: E731
        tag = "" if lin == "bf16" else f", {lin} linears"
        if lin != "bf16":
            row = dict(model=name, variant=f"inductor dense{tag}")
            C.guarded(lambda: row.update(_sparse_row(mkl, "inductor", "default", inp, device, reps, ref,
                                                     dense, attn)), row, "error")
            rows.append(row)
        rows += _sparse_rows(name, a, mkl, tag, inp, device, reps, ref, dense, attn)
    return rows


def _sparse_rows(name, a, mk, tag, inp, device, reps, ref, dense, attn) -> list[dict]:
    rows = []
    for mode in a.modes.split(","):
        for t in (float(x) for x in a.targets.split(",")):
            be = sc.backend(config=sc.SpargeConfig(topk=1 - t, topp=0.0, min_seq_len=0 if a.quick else 1024))
            row = dict(model=name, variant=f"sparge {t:.0%} ({mode}{tag})", target=t)
            C.guarded(lambda: row.update(_sparse_row(mk, be, mode, inp, device, reps, ref, dense, attn)),
                      row, "error")
            rows.append(row)
    return rows


def _sparse_row(mk, be, mode, inp, device, reps, ref, dense, attn) -> dict:
    """attn: the dense step's attention ms, from its kernels ("gpu", None off CUDA) and from the
    step without SDPA ("noop": also drops what only feeds k and v, e.g. their projections, which
    Inductor then removes as dead code). The limit takes the kernels' time less the dense
    attention still in this step (sites kept dense, e.g. Wan's cross-attention)."""
    d = compiled_step(mk, be, mode, inp, device, reps)
    ms, sp = d["ms"], (_sparsity(be) if not isinstance(be, str) else None)
    gpu = None if attn["gpu"] is None else max(attn["gpu"] - (d["attn_gpu"] or 0.0), 0.0)
    limit = lambda a: None if sp is None or a is None else dense / max(dense - 0.9 * sp * a, 1e-9)  # noqa: E731
    main = limit(gpu if gpu is not None else attn["noop"])
    return dict(step_ms=ms, host_ms=d["host"], compile_s=d["first"], sparsity=sp, speedup=dense / ms,
                limit_90pct=main, limit_90pct_noop=limit(attn["noop"]), rewritable_attention_ms=gpu,
                meets=None if main is None else dense / ms >= main, rel_err_vs_dense=C.rel_l2(d["out"], ref))


COLUMNS = [("model", "model"), ("variant", "variant"), ("sparsity", "measured sparsity"),
           ("step_ms", "step ms"), ("host_ms", "host ms (launch only)"), ("speedup", "speed-up"),
           ("limit_90pct", "90% of the mask's saving"), ("limit_90pct_noop", "the same, no-op share"),
           ("attention_share", "dense attention share (kernels)"),
           ("attention_noop_share", "share, SDPA a no-op"), ("compile_s", "first call s"),
           ("rel_err_vs_dense", "rel. err vs dense"), ("error", "error")]


def _check_args(args) -> None:
    bad = sorted(set(args.models.split(",")) - set(FULL))
    if bad:
        raise SystemExit(f"bench models: --models {bad} unknown; choose from {sorted(FULL)}")
    bad = sorted(set(args.linears.split(",")) - {"bf16", "float8"})
    if bad:
        raise SystemExit(f"bench models: --linears {bad} unknown; choose from bf16, float8")
    bad = sorted(set(args.modes.split(",")) - {"default", "reduce-overhead"})
    if bad:
        raise SystemExit(f"bench models: --modes {bad} unknown; choose from default, reduce-overhead")
    try:
        ok = all(0 < float(t) < 1 for t in args.targets.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"bench models: --targets must be fractions in (0, 1), got {args.targets!r}")


def run(args) -> dict:
    from bench.common import allow_broken_torchvision

    _check_args(args)
    allow_broken_torchvision()
    device = C.pick_device(args.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    C.bump_dynamo_cache()
    rows = []
    for name in args.models.split(","):
        new = model_rows(name, args, device, dtype)
        rows += new
        print(O.table(new, COLUMNS), flush=True)
    result = dict(rows=rows, env=C.environment(device), command=O.command_line())
    O.write_result(Path(args.out), "models", "diffusers models, compile_repeated_blocks: inductor vs sparge",
                   result, markdown(result))
    return result


def markdown(result: dict) -> list[tuple[str, str]]:
    return [("Step times", O.table(result["rows"], COLUMNS))]


main = module_entry(__spec__.name)  # python -m bench.model_steps [options]
