"""Shared benchmark helpers: the device and environment, timing, guarded measurements, errors
against a reference, and the options every command takes (``--out``, ``--quick``, ``--traceback``).

Timing: on CUDA the median of ``triton.testing.do_bench``; on the CPU a simple wall-clock
timer (median of a few runs), good enough for ``--quick`` smoke runs. Writers are in
:mod:`bench.output`, random and synthetic data in :mod:`bench.data`, models in :mod:`bench.models`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

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


SHOW_TRACEBACKS = False  # --traceback: print the traceback of every failed measurement


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
        if SHOW_TRACEBACKS:
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
# Errors and references


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
# Options every command takes


def add_common_args(p) -> None:
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--quick", action="store_true", help="tiny CPU run in seconds (smoke test)")
    p.add_argument("--traceback", action="store_true", help="print the traceback of every failed measurement")


def quick_defaults(args, add_args, quick: dict) -> None:
    """--quick: set each option of ``quick`` that was left at its default (per ``add_args``)."""
    import argparse

    p = argparse.ArgumentParser()
    add_args(p)
    defaults = vars(p.parse_args([]))
    for key, value in quick.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def apply_common_args(args) -> None:
    global SHOW_TRACEBACKS
    SHOW_TRACEBACKS = bool(getattr(args, "traceback", False))


def allow_broken_torchvision():
    """timm imports torchvision; a torchvision wheel built for CUDA torch cannot load its C ops
    next to the CPU torch, and then fails at import in its op registrations. timm only needs
    torchvision's Python parts: skip those registrations when the ops are missing."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401,F811
    except ImportError:
        pass
