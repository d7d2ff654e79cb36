"""Shared benchmark helpers: timing, guarded measurements, random data, writers (JSON, markdown, PNG).

Timing: on CUDA the median of ``triton.testing.do_bench``; on the CPU a simple wall-clock
timer (median of a few runs), good enough for ``--quick`` smoke runs.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

# --------------------------------------------------------------------------------------------
# Environment


def pick_device(quick: bool) -> torch.device:
    """CUDA when present (and not --quick), otherwise the CPU."""
    if torch.cuda.is_available() and not quick:
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def torch_path_on_cpu(device: torch.device):
    """On the CPU, run the ops' chunked PyTorch path, not Triton's (slow) interpreter.

    CI sets TRITON_INTERPRET=1 for the tests; the quick benchmark only checks that the report
    code runs, so it uses the fast PyTorch implementation of the same function.
    """
    if device.type != "cpu":
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def bump_dynamo_cache(limit: int = 256) -> None:
    """Many shapes and block sizes recompile the same functions: raise Dynamo's recompile limit."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))


# --------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 25, rep: int = 100,
            cpu_iters: int = 3, cpu_warmup: bool = True, grad_to_none=None) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")`` (warmup/rep in ms).
    CPU: one warm-up call (unless ``cpu_warmup`` is False), then the median of ``cpu_iters``
    timed calls.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                              return_mode="median"))
    if cpu_warmup:
        fn()
    times = []
    for _ in range(max(1, cpu_iters)):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def time_graph(fn: Callable[[], Any], device: torch.device, rep: int = 100) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``):
    its GPU time without the host's launch cost. None off CUDA."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def short_error(e: BaseException, limit: int = 400) -> str:
    """One line naming the exception, short enough for a JSON field and a table cell."""
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def guarded(fn: Callable[[], Any], errors: dict, key: str, verbose: bool = True):
    """Run ``fn``; on any exception record its message under ``errors[key]`` and return None.

    A failing baseline (a kernel missing on this device, a compile failure, out of memory)
    never kills the run.
    """
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - we record every failure
        errors[key] = short_error(e)
        if verbose:
            print(f"  [{key}] failed: {errors[key]}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        return None


def ratio(a, b):
    """a / b, or None if either is missing (a failed measurement)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# --------------------------------------------------------------------------------------------
# Data


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, device, dtype, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(shape, generator=generator(device, seed), device=device, dtype=torch.float32)
    t = t.to(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def random_qkv(B: int, H: int, N: int, D: int, device, dtype, seed: int = 0,
               requires_grad: bool = False):
    return tuple(randn((B, H, N, D), device, dtype, seed + i, requires_grad) for i in range(3))


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Σ|out − ref| / Σ|ref| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30))


def chunked_masked_sdpa(q, k, v, dense_block_mask: torch.Tensor, block_q: int, block_k: int,
                        scale: float | None = None, is_causal: bool = False,
                        dtype: torch.dtype = torch.float32, max_elems: int = 1 << 28) -> torch.Tensor:
    """Attention with every score outside the kept blocks at -inf, via SDPA + a boolean mask.

    Computed in ``dtype`` (float32 by default), one head and one chunk of query blocks at a
    time so that the (rows x Nk) token mask stays below ``max_elems`` elements. GQA aware.
    Returns (B, Hq, Nq, Dv) in ``dtype``.
    """
    import torch.nn.functional as F

    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    G = Hq // k.shape[1]
    out = torch.empty(B, Hq, Nq, v.shape[-1], dtype=dtype, device=q.device)
    rows = max(block_q, (max_elems // max(1, Nk)) // block_q * block_q)
    cols = torch.arange(Nk, device=q.device)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // G].to(dtype)
            vh = v[b, h // G].to(dtype)
            for s in range(0, Nq, rows):
                e = min(Nq, s + rows)
                bm = dense_block_mask[b, h, s // block_q: -(-e // block_q)]
                m = bm.repeat_interleave(block_q, dim=0)[: e - s]
                m = m.repeat_interleave(block_k, dim=1)[:, :Nk]
                if is_causal:
                    m = m & (cols[None, :] <= torch.arange(s, e, device=q.device)[:, None])
                out[b, h, s:e] = F.scaled_dot_product_attention(  # 4-D: the fused kernels take it
                    q[b, h, s:e].to(dtype)[None, None], kh[None, None], vh[None, None],
                    attn_mask=m[None, None], scale=scale)[0, 0]
    return out


# --------------------------------------------------------------------------------------------
# Writers


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file
    return path


def fmt(x, digits: int = 3):
    """A table cell: floats with ``digits`` significant digits, None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def table(rows: list[dict], columns: list[tuple[str, str]], fmt_digits: int = 3,
          tablefmt: str = "github") -> str:
    """A tabulate table of ``rows`` with ``columns`` = [(key, header), ...]."""
    from tabulate import tabulate

    body = [[fmt(r.get(k), fmt_digits) for k, _ in columns] for r in rows]
    return tabulate(body, headers=[h for _, h in columns], tablefmt=tablefmt, disable_numparse=True)


def write_markdown(path: Path, title: str, sections: list[tuple[str, str]], env: dict | None = None,
                   command: str | None = None) -> Path:
    """A markdown report: a title, the environment and command, then (heading, body) sections."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if env:
        dev = env.get("gpu") or env.get("cpu") or env.get("device")
        lines += [f"{env.get('date', '')}, {dev}, torch {env.get('torch')}, triton {env.get('triton')}", ""]
    if command:
        lines += ["```", command, "```", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    path.write_text("\n".join(lines))
    return path


def plt():
    """matplotlib.pyplot with a non-interactive backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot

        return pyplot
    except Exception:  # pragma: no cover
        return None


def save_fig(fig, path: Path, quick: bool = False) -> Path:
    """PNG at 120 dpi with a tight layout; quick (the CPU smoke run): 60 dpi and a fixed layout,
    which on a small CPU is several seconds per figure faster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if quick:
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=60 if quick else 120)
    import matplotlib.pyplot as pyplot

    pyplot.close(fig)
    return path


def command_line() -> str:
    import sys

    return "python -m " + " ".join(["bench"] + sys.argv[1:]) if sys.argv else "python -m bench"


def add_common_args(p) -> None:
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--quick", action="store_true", help="tiny CPU run in seconds (smoke test)")


def module_main(module, argv=None) -> int:
    """``python -m bench.<name>``: parse the module's arguments, run it, print its tables."""
    import argparse

    name = module.__name__.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=module.__doc__.splitlines()[0])
    add_common_args(p)
    module.add_args(p)
    args = p.parse_args(argv)
    result = module.run(args, Path(args.out))
    for heading, body in module.markdown(result):
        print(f"\n## {heading}\n\n{body}")
    return 0
