"""End-to-end: a DiT stack at Wan2.1-1.3B's attention size, compiled with inductor vs "sparge".

The model: ``depth`` Wan-style blocks (hidden 1536, 12 heads of 128, FFN 8960, 3-D RoPE on the
self-attention, cross-attention to 512 text tokens, adaLN modulation), random weights, bf16,
``F.scaled_dot_product_attention`` inside, N = 21 x 30 x 52 = 32760 tokens (Wan2.1 at 480p).
Each block is compiled (regional compilation: the blocks are identical, so one compile serves
all of them) with ``backend="inductor"`` (dense) and ``backend="sparge"`` at each target
sparsity (mode top-k: options topk = 1 - sparsity, topp = 0; the cross-attention has 512 keys,
below min_seq_len, so it stays dense). Measured:

* forward time per step (no grad) and forward+backward (a training step without the optimizer)
* attention share of the step: self-attention alone (dense SDPA, or sparge with its
  prediction) timed on the same shape, times the number of blocks, over the step time
* speed-up against inductor dense, and the output's relative error against it

A missing or failing backend records its error and the rest still runs.

    python -m bench.e2e --out results                   # 90/95/97%, forward and training
    python -m bench.e2e --sparsities 95 --no-train --out results
    python -m bench.e2e --quick --out /tmp/b
    python -m bench.e2e --e2e-grid 8,16,32 --no-train --mode reduce-overhead --out r   # CUDA graphs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/e2e.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from bench import common as C
from bench.accuracy import apply_rope, rope_3d

FULL_SPARSITIES = [0.9, 0.95, 0.97]
QUICK_SPARSITIES = [0.9]


# --------------------------------------------------------------------------------------------
# The model


class WanBlock(nn.Module):
    """Self-attention (3-D RoPE) + cross-attention + FFN with adaLN modulation, as in Wan2.1."""

    def __init__(self, dim: int, heads: int, ffn: int, grid: tuple[int, int, int]):
        super().__init__()
        self.heads, self.grid = heads, grid
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cq = nn.Linear(dim, dim)
        self.ckv = nn.Linear(dim, 2 * dim)
        self.co = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def _heads(self, x):
        B, N, Cc = x.shape
        return x.view(B, N, self.heads, Cc // self.heads).transpose(1, 2)

    def forward(self, x, e, ctx, rope=None):
        """rope: precomputed (cos, sin) of :func:`bench.accuracy.rope_tables` (else built here)."""
        B, N, Cc = x.shape
        s1, g1, a1, s2, g2, a2 = (self.modulation + e).chunk(6, dim=1)
        h = self.norm1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if rope is None:
            q = rope_3d(self._heads(self.norm_q(q)), *self.grid).to(x.dtype)
            k = rope_3d(self._heads(self.norm_k(k)), *self.grid).to(x.dtype)
        else:
            q = apply_rope(self._heads(self.norm_q(q)), *rope).to(x.dtype)
            k = apply_rope(self._heads(self.norm_k(k)), *rope).to(x.dtype)
        a = F.scaled_dot_product_attention(q, k, self._heads(v))
        x = x + a1 * self.o(a.transpose(1, 2).reshape(B, N, Cc))
        cq = self._heads(self.cq(self.norm3(x)))
        ck, cv = (self._heads(t) for t in self.ckv(ctx).chunk(2, dim=-1))
        c = F.scaled_dot_product_attention(cq, ck, cv)
        x = x + self.co(c.transpose(1, 2).reshape(B, N, Cc))
        return x + a2 * self.ffn(self.norm2(x) * (1 + g2) + s2)


class WanStack(nn.Module):
    def __init__(self, dim=1536, heads=12, ffn=8960, depth=4, grid=(21, 30, 52)):
        super().__init__()
        self.blocks = nn.ModuleList(WanBlock(dim, heads, ffn, grid) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, dim)

    def forward(self, x, e, ctx):
        for b in self.blocks:
            x = b(x, e, ctx)
        return self.head(self.norm(x))


def compile_blocks(model: WanStack, backend: str, options: dict | None, mode: str | None = None) -> None:
    """Compile every block in place (regional compilation), replacing any earlier compile.
    backend "none": leave the blocks eager (the --quick dense baseline: no compile time).
    mode: torch.compile's mode (e.g. "reduce-overhead": CUDA graphs); torch.compile takes mode or
    options, not both, so with a mode the sparge options become a configured backend object."""
    torch._dynamo.reset()
    for b in model.blocks:
        b._compiled_call_impl = None  # back to eager first: a failing compile leaves no stale one
    if backend == "none":
        return
    if backend == "sparge" and "sparge" not in torch._dynamo.list_backends(exclude_tags=()):
        # not pip-installed (e.g. PYTHONPATH=. on a bare machine): no entry point, same function
        from sparge_compile.compiler import sparge_backend as backend
    kw = dict(backend=backend, options=options or None)
    if mode:
        kw = dict(backend=backend, mode=mode)
        if backend == "sparge" or callable(backend):
            import sparge_compile as sc

            opts = dict(options or {})
            inner = opts.pop("inner", "inductor")
            kw["backend"] = sc.backend(config=sc.SpargeConfig(**opts), inner=inner,
                                       record_masks=mode != "reduce-overhead")
    for b in model.blocks:
        b.compile(**kw)


# --------------------------------------------------------------------------------------------
# Measurements


def measure_model(model, inputs, device, timing, train: bool, errors: dict, prefix: str, ref=None,
                  new_step=None, one_compile: bool = False):
    """Compile time (first call), forward ms, output error vs ``ref``, fwd+bwd ms.
    new_step: called before every step (CUDA graphs: torch.compiler.cudagraph_mark_step_begin).
    one_compile (--quick): the forward runs with grad enabled on the training step's inputs, so
    Dynamo compiles each block once (the no-grad forward is a second compile)."""
    res = {}
    params = [p for p in model.parameters()]
    new_step = new_step or (lambda: None)
    # in a real DiT the first block's input comes from the (trainable) patch embedding, so in
    # training it requires grad: every block then sees the same kind of input and Dynamo
    # compiles the block once for training (not twice: first block, then the others)
    x = inputs[0].detach().requires_grad_(True)
    train_inputs = (x, *inputs[1:])
    one_compile = one_compile and train
    if one_compile:
        for p in params:
            p.requires_grad_(True)

    def fwd():
        new_step()
        if one_compile:
            return model(*train_inputs).detach()
        with torch.no_grad():
            return model(*inputs)

    def first():
        t0 = time.perf_counter()
        out = fwd()
        C.sync(device)
        res[f"{prefix}_compile_s"] = time.perf_counter() - t0
        return out.clone()  # under CUDA graphs (mode="reduce-overhead") later runs overwrite it

    out = C.guarded(first, errors, f"{prefix}_compile")
    if out is not None:
        res[f"{prefix}_fwd_ms"] = C.guarded(lambda: C.time_fn(fwd, device, **timing), errors, f"{prefix}_fwd")
        if ref is not None:
            res[f"{prefix}_rel_err"] = C.rel_l2(out, ref)
    if train:
        for p in params:
            p.requires_grad_(True)

        def step():
            new_step()
            model(*train_inputs).float().square().mean().backward()

        def first_train():
            t0 = time.perf_counter()
            step()
            C.sync(device)
            res[f"{prefix}_train_compile_s"] = time.perf_counter() - t0

        C.guarded(first_train, errors, f"{prefix}_train_compile")
        if f"{prefix}_train_compile_s" in res:
            res[f"{prefix}_train_ms"] = C.guarded(
                lambda: C.time_fn(step, device, grad_to_none=params + [x], **timing), errors, f"{prefix}_train")
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return res, out


def attention_alone(B, H, N, D, device, dtype, timing, train: bool, errors: dict, config=None) -> dict:
    """Self-attention alone on the block's shape: dense SDPA, or sparge (prediction included)."""
    import sparge_compile as sc

    q, k, v = C.random_qkv(B, H, N, D, device, dtype, seed=11)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    dout = C.randn((B, H, N, D), device, dtype, seed=12)
    name = "dense" if config is None else "sparge"

    def attn(q_, k_, v_):
        if config is None:
            return F.scaled_dot_product_attention(q_, k_, v_)
        return sc.sparse_attention(q_, k_, v_, config=config)

    res = {"attn_fwd_ms": C.guarded(lambda: C.time_fn(lambda: attn(q, k, v), device, **timing),
                                    errors, f"{name}_attn_fwd")}
    if config is not None:
        m = C.guarded(lambda: sc.predict_block_mask(q, k, config=config), errors, "sparge_attn_mask")
        res["attn_sparsity"] = m.sparsity() if m is not None else None
    if train:
        res["attn_fwdbwd_ms"] = C.guarded(
            lambda: C.time_fn(lambda: attn(qg, kg, vg).backward(dout), device, grad_to_none=[qg, kg, vg],
                              **timing), errors, f"{name}_attn_fwdbwd")
    return res


def explain(model, skip: int = 0) -> dict | None:
    """The backend's report (sc.explain), if the package has one, without its first ``skip``
    graphs (those of earlier compiles of the same blocks: explain() keeps every graph)."""
    import sparge_compile as sc

    fn = getattr(sc, "explain", None)
    if fn is None:
        return None
    rep = fn(model)
    if skip:
        rep = type(rep)(rep.graphs[skip:])
    sites = rep.as_dicts() if hasattr(rep, "as_dicts") else None
    return {"table": str(rep), "sites": sites}


def n_graphs(model) -> int:
    """How many compiled graphs explain() lists for ``model`` so far."""
    import sparge_compile as sc

    fn = getattr(sc, "explain", None)
    return len(fn(model).graphs) if fn is not None else 0


# --------------------------------------------------------------------------------------------
# Report


FWD_COLUMNS = [("variant", "variant"), ("sparsity", "sparsity"), ("sites", "sites rewritten"),
               ("fwd_ms", "step fwd (ms)"),
               ("attn_share_fwd", "attention share"), ("speedup_fwd", "speed-up"),
               ("rel_err", "rel err vs dense"), ("compile_s", "compile (s)")]
TRAIN_COLUMNS = [("variant", "variant"), ("sparsity", "sparsity"), ("train_ms", "step fwd+bwd (ms)"),
                 ("attn_share_train", "attention share"), ("speedup_train", "speed-up"),
                 ("train_compile_s", "compile (s)")]


def markdown(result: dict) -> list[tuple[str, str]]:
    a = result["args"]
    note = (f"{a['depth']} blocks, hidden {a['dim']}, {a['heads']} heads x {a['dim'] // a['heads']}, FFN "
            f"{a['ffn']}, N = {a['tokens']} tokens ({'x'.join(map(str, a['grid']))}), text {a['text_len']} "
            f"tokens, {a['dtype']}, batch {a['B']}; blocks compiled with {a['dense_backend']!r} (dense) "
            "and 'sparge'. Attention share: self-attention alone x blocks / step.\n\n")
    rows = result["rows"]
    secs = [("Forward (inference step)", note + C.table(rows, FWD_COLUMNS))]
    if a.get("train"):
        secs.append(("Forward + backward (training step, no optimizer)", C.table(rows, TRAIN_COLUMNS)))
    rep = next((r["report"]["table"] for r in rows if (r.get("report") or {}).get("table")), None)
    if rep:
        secs.append(("The backend's report (first sparge variant)", "```\n" + rep + "\n```"))
    errs = [(r["variant"], k, m) for r in rows for k, m in (r.get("errors") or {}).items()]
    secs.append(("Failures", "\n".join(f"- {v}: {k}: {m}" for v, k, m in errs) if errs else "none"))
    return secs


def plot(result: dict, path: Path):
    plt = C.plt()
    rows = [r for r in result["rows"] if r["variant"] != "dense"]
    if plt is None or not result["rows"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    dense = [r for r in result["rows"] if r["variant"] == "dense"]
    for ax, key, share, title in ((axes[0], "fwd_ms", "attn_share_fwd", "forward"),
                                  (axes[1], "train_ms", "attn_share_train", "forward+backward")):
        labels, tot, att = [], [], []
        for r in dense + rows:
            if r.get(key) is None:
                continue
            labels.append("dense" if r["variant"] == "dense" else f"{100 * r['sparsity_target']:g}%")
            tot.append(r[key])
            att.append(r[key] * min(1.0, r.get(share) or 0.0))
        if labels:
            x = range(len(labels))
            ax.bar(x, [t - a_ for t, a_ in zip(tot, att)], label="rest of the step")
            ax.bar(x, att, bottom=[t - a_ for t, a_ in zip(tot, att)], label="self-attention")
            ax.set_xticks(list(x), labels)
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"step time, {title}")
        ax.set_ylabel("ms")
    return C.save_fig(fig, path, quick=bool(result["args"].get("quick")))


def write(result: dict, out: Path, plots: bool = True) -> dict:
    """JSON, markdown and (``plots``) the PNG; the runs' intermediate writes skip the PNG."""
    out = Path(out)
    files = {"json": str(C.write_json(out / "e2e.json", result))}
    files["md"] = str(C.write_markdown(out / "e2e.md", "End-to-end: Wan2.1-1.3B-sized DiT stack",
                                       markdown(result), result["env"], result.get("command")))
    png = plots and C.guarded(lambda: plot(result, out / "e2e.png"),
                              result.setdefault("report_errors", {}), "plot")
    if png:
        files["png"] = str(png)
    return files


# --------------------------------------------------------------------------------------------
# CLI


def add_args(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    names = ("--e2e-sparsities", "--sparsities") if standalone else ("--e2e-sparsities",)
    p.add_argument(*names, dest="e2e_sparsities", default=None,
                   help="comma list in %% or fractions (default 90,95,97)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default 4; --quick: 2)")
    p.add_argument("--e2e-grid", default=None, help="T,H,W token grid (default 21,30,52; --quick: 4,8,8)")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--no-dense", action="store_true", help="skip the inductor dense baseline (when "
                   "another run has it: `python -m bench report` merges them and computes speed-ups)")
    p.add_argument("--dense-backend", default=None, help="default inductor (--quick: none, i.e. not compiled)")
    p.add_argument("--inner-backend", default=None,
                   help="the sparge backend's options['inner'] (default: its own, inductor; --quick: eager)")
    p.add_argument("--mode", default=None, help="torch.compile mode for both backends, e.g. reduce-overhead "
                   "(CUDA graphs: removes the per-launch host cost that bounds small shapes)")
    p.add_argument("--min-seq-len", type=int, default=None,
                   help="sparge min_seq_len (default 1024: the 512-token cross-attention stays dense)")


def run(args, out: Path | None = None) -> dict:
    from sparge_compile import SpargeConfig

    quick = bool(getattr(args, "quick", False))
    device = C.pick_device(quick)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    grid = tuple(int(x) for x in (args.e2e_grid or ("4,8,8" if quick else "21,30,52")).split(","))
    dim, heads, ffn, text_len = (64, 2, 128, 16) if quick else (1536, 12, 8960, 512)
    depth = args.depth or (2 if quick else 4)
    N = grid[0] * grid[1] * grid[2]
    D = dim // heads
    bq, bk = (32, 16) if quick else (128, 64)
    train = not args.no_train
    sparsities = ([float(x) / (100 if float(x) > 1 else 1) for x in args.e2e_sparsities.split(",")]
                  if args.e2e_sparsities else (QUICK_SPARSITIES if quick else FULL_SPARSITIES))
    dense_backend = args.dense_backend or ("none" if quick else "inductor")
    inner = args.inner_backend or ("eager" if quick else None)
    mode = getattr(args, "mode", None)
    new_step = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None
    min_seq_len = args.min_seq_len if args.min_seq_len is not None else (64 if quick else 1024)
    timing = dict(warmup=25, rep=100, cpu_iters=1, cpu_warmup=False)
    C.bump_dynamo_cache()
    result = {"benchmark": "e2e", "env": C.environment(device), "command": C.command_line(),
              "args": dict(dim=dim, heads=heads, ffn=ffn, depth=depth, grid=list(grid), tokens=N,
                           text_len=text_len, dtype=str(dtype).replace("torch.", ""), B=1, train=train,
                           sparsities=sparsities, dense_backend=dense_backend, inner_backend=inner,
                           mode=mode,
                           min_seq_len=min_seq_len, block_q=bq, block_k=bk, quick=quick),
              "rows": []}
    t_start = time.perf_counter()
    torch.manual_seed(0)
    with C.torch_path_on_cpu(device):
        model = WanStack(dim, heads, ffn, depth, grid).to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        inputs = (C.randn((1, N, dim), device, dtype, seed=1), C.randn((1, 6, dim), device, dtype, seed=2) * 0.1,
                  C.randn((1, text_len, dim), device, dtype, seed=3))

        dense, ref = {}, None
        if not getattr(args, "no_dense", False):
            print(f"[e2e] dense, backend={dense_backend!r}, N={N}, depth={depth}", flush=True)
            errors: dict = {}
            compile_blocks(model, dense_backend, None, mode)
            res, ref = measure_model(model, inputs, device, timing, train, errors, "m", new_step=new_step,
                                     one_compile=quick)
            att = attention_alone(1, heads, N, D, device, dtype, timing, train, errors)
            dense = _row("dense", None, res, att, depth, errors)
            result["rows"].append(dense)
            if out is not None:
                write(result, out, plots=False)

        for s in sparsities:
            print(f"[e2e] sparge at {100 * s:g}%", flush=True)
            errors = {}
            opts = {"topk": round(1.0 - s, 6), "topp": 0.0, "min_seq_len": min_seq_len}
            if quick:
                opts.update(block_q=bq, block_k=bk)
            if inner:
                opts["inner"] = inner
            cfg = SpargeConfig(topk=opts["topk"], topp=0.0, block_q=bq, block_k=bk, mode="hybrid",
                               min_seq_len=min_seq_len)
            before = C.guarded(lambda: n_graphs(model), errors, "explain") or 0
            compiled = C.guarded(lambda: compile_blocks(model, "sparge", opts, mode) or True, errors,
                                 "sparge_compile")
            res = {}
            if compiled:  # never time the previous (dense) compile under the sparge label
                res, _ = measure_model(model, inputs, device, timing, train, errors, "m", ref=ref,
                                       new_step=new_step, one_compile=quick)
            att = attention_alone(1, heads, N, D, device, dtype, timing, train, errors, config=cfg)
            row = _row("sparge", s, res, att, depth, errors)
            row["options"] = opts
            row["report"] = C.guarded(lambda: explain(model, before), errors, "explain")
            sites = (row["report"] or {}).get("sites") or []
            if sites:
                rw = [x for x in sites if x.get("rewritten")]
                row["sites"] = f"{len(rw)}/{len(sites)}"
                sp = [x["sparsity"] for x in rw if x.get("sparsity") is not None]
                if sp:
                    row["sparsity"] = sum(sp) / len(sp)  # measured by the compiled model's sites
            row["speedup_fwd"] = C.ratio(dense.get("fwd_ms"), row.get("fwd_ms"))
            row["speedup_train"] = C.ratio(dense.get("train_ms"), row.get("train_ms"))
            result["rows"].append(row)
            result["seconds"] = time.perf_counter() - t_start
            if out is not None:
                write(result, out, plots=False)
    torch._dynamo.reset()
    result["seconds"] = time.perf_counter() - t_start
    if out is not None:
        result["files"] = write(result, out)
    return result


def _row(variant, target, res, att, depth, errors) -> dict:
    row = {"variant": variant, "sparsity_target": target,
           "sparsity": att.get("attn_sparsity") if variant != "dense" else 0.0,
           "fwd_ms": res.get("m_fwd_ms"), "train_ms": res.get("m_train_ms"),
           "compile_s": res.get("m_compile_s"), "train_compile_s": res.get("m_train_compile_s"),
           "rel_err": res.get("m_rel_err"), "attn_fwd_ms": att.get("attn_fwd_ms"),
           "attn_fwdbwd_ms": att.get("attn_fwdbwd_ms")}
    row["attn_share_fwd"] = C.ratio(None if row["attn_fwd_ms"] is None else depth * row["attn_fwd_ms"],
                                    row["fwd_ms"])
    row["attn_share_train"] = C.ratio(None if row["attn_fwdbwd_ms"] is None else depth * row["attn_fwdbwd_ms"],
                                      row["train_ms"])
    if variant == "dense":
        row["speedup_fwd"] = row["speedup_train"] = 1.0 if row["fwd_ms"] else None
    row["errors"] = errors
    return row


def main(argv=None) -> int:
    return C.module_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
