"""Input checks for the public functions: clear errors naming the argument, before any kernel."""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256
HEAD_DIMS_SUPPORTED = f"a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}"
PRECISIONS = ("bf16", "fp8", "int8")  # the forward's arithmetic: bf16 (q's dtype), or low-bit Q·Kᵀ


def head_dim_ok(d) -> bool:
    """A head dim the kernels take: a multiple of 8 in [8, 256] (the kernels pad it to a power of two)."""
    return isinstance(d, int) and 0 < d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def is_real(x) -> bool:
    """A real number that is not a bool (True would otherwise pass as 1)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_int(name: str, value, low: int) -> int:
    """An int argument >= low: TypeError for another type, ValueError below ``low``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """A bool argument (a string such as "False" would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_precision(name: str, value) -> str:
    """One of :data:`PRECISIONS` (the forward's arithmetic)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {PRECISIONS}, got {type(value).__name__} {value!r}")
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")
    return value


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, scale=None) -> float:
    """Validate SDPA-layout inputs; return the softmax scale to use."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES and t.dtype != torch.float64:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    for name, t in named[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all must match")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {B}")
    if k.shape[-1] != D:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {D}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({k.shape[1]}) (Hq % Hkv == 0)")
    if v is not None:
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v shape {tuple(v.shape)} must match k shape {tuple(k.shape)} in (B, H, N)")
        if v.shape[-1] != D:
            raise ValueError(f"v head dim {v.shape[-1]} must equal q/k head dim {D}")
    if not head_dim_ok(D):
        raise ValueError(f"head dim {D} (last axis of q) is not supported; it must be {HEAD_DIMS_SUPPORTED}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence lengths must be positive, got Nq={q.shape[2]}, Nk={k.shape[2]}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _mask_fields_ok(m, q: torch.Tensor, k: torch.Tensor) -> None:
    """Shape, lengths, dtype and device of a block mask (no data read)."""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    for name in ("block_q", "block_k"):
        val = getattr(m, name, None)
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"block_mask.{name} must be a positive int, got {val!r}")
        if not (_is_pow2(val) and 16 <= val <= 256):   # what the kernels compile for (as SpargeConfig)
            raise ValueError(f"block_mask.{name} must be a power of two in [16, 256], got {val}")
    if (m.q_len, m.kv_len) != (Nq, Nk):
        raise ValueError(f"block_mask was built for q_len={m.q_len}, kv_len={m.kv_len} but q has {Nq} "
                         f"tokens and k has {Nk}")
    nq, nk = -(-Nq // m.block_q), -(-Nk // m.block_k)
    for name, t, shape in (("kv_num_blocks", m.kv_num_blocks, (B, H, nq)),
                           ("kv_indices", m.kv_indices, (B, H, nq, nk))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block_mask.{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"block_mask.{name} has shape {tuple(t.shape)}; q/k need {shape} "
                             f"(B, Hq, ceil(Nq/block_q){', ceil(Nk/block_k)' if len(shape) == 4 else ''})")
        if t.dtype != torch.int32:
            raise TypeError(f"block_mask.{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"block_mask.{name} is on {t.device} but q is on {q.device}")


def _mask_values_ok(num: torch.Tensor, idx: torch.Tensor) -> None:
    """0 <= kv_num_blocks <= nk; the first kv_num_blocks indices of a row in [0, nk), no repeats."""
    nk = idx.shape[-1]
    used = torch.arange(nk, device=idx.device) < num[..., None]
    bad_num = (num < 0) | (num > nk)
    bad_idx = used & ((idx < 0) | (idx >= nk))
    from .kernels.torch_impl import indices_to_dense

    repeats = indices_to_dense(num.clamp(0, nk), idx, nk).sum(-1, dtype=torch.int32) != num.clamp(0, nk)
    flags = torch.stack([bad_num.any(), bad_idx.any(), repeats.any()]).tolist()   # one sync
    if flags[0]:
        raise ValueError(f"block_mask.kv_num_blocks must lie in [0, {nk}] (nk key blocks), got values in "
                         f"[{int(num.min())}, {int(num.max())}]")
    if flags[1]:
        raise ValueError(f"block_mask.kv_indices: a used entry (among the first kv_num_blocks of its row) "
                         f"is outside [0, {nk})")
    if flags[2]:
        raise ValueError("block_mask.kv_indices: a row names the same key block twice among its first "
                         "kv_num_blocks entries")


def check_block_mask(m, q: torch.Tensor, k: torch.Tensor) -> None:
    """A block mask must fit q/k before any kernel runs (a wrong one crashes or silently misreads).

    Shapes, lengths, dtype and device always; the values (counts and index range) once per mask
    and again only after its tensors change in place (their version counters), and never while
    torch.compile traces (no data there).
    """
    from .block_mask import SpargeBlockMask

    if not isinstance(m, SpargeBlockMask):
        raise TypeError(f"block_mask must be a SpargeBlockMask (from predict_block_mask or "
                        f"SpargeBlockMask(...)), got {type(m).__name__}")
    _mask_fields_ok(m, q, k)
    if torch.compiler.is_compiling():
        return
    stamp = m._stamp()
    if m._checked != stamp:
        _mask_values_ok(m.kv_num_blocks, m.kv_indices)
        m._checked = stamp


def check_kv_keep(kv_keep, q: torch.Tensor, k: torch.Tensor) -> None:
    """A key-padding mask: None or a (B, Nk) bool tensor on q's device."""
    if kv_keep is None:
        return
    if not isinstance(kv_keep, torch.Tensor) or kv_keep.dtype != torch.bool:
        got = kv_keep.dtype if isinstance(kv_keep, torch.Tensor) else type(kv_keep).__name__
        raise TypeError(f"kv_keep must be None or a bool tensor (True: the key is attended), got {got}")
    if tuple(kv_keep.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"kv_keep has shape {tuple(kv_keep.shape)}; q/k need (B, Nk) = "
                         f"{(q.shape[0], k.shape[2])}")
    if kv_keep.device != q.device:
        raise ValueError(f"kv_keep is on {kv_keep.device} but q is on {q.device}")


def _check_optional(name: str, x, ok: bool, what: str) -> None:
    if x is not None and not ok:
        raise TypeError(f"{name} must be None or {what}, got {type(x).__name__}: {x!r}")


def check_distill_objects(*, trainable, teacher, callback, compile_fn) -> None:
    """distill()'s object arguments (its settings are checked by DistillConfig), before anything runs."""
    from torch import nn

    _check_optional("trainable", trainable, callable(trainable) or hasattr(trainable, "__iter__"),
                    "a callable(name, param) -> bool, parameter-name prefixes or parameters")
    _check_optional("teacher", teacher, isinstance(teacher, nn.Module), "a torch.nn.Module")
    _check_optional("callback", callback, callable(callback), "a callable(DistillStep)")
    _check_optional("compile_fn", compile_fn, callable(compile_fn), "a callable(module, config)")


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn pointed at the user's line: the first caller outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
