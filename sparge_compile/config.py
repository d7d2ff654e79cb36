"""SpargeConfig: the knobs of the hybrid Top-k + Top-p block-sparse attention."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("hybrid", "topk", "topp")
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256
HEAD_DIMS_SUPPORTED = f"a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}"


def head_dim_ok(d) -> bool:
    """A head dim the kernels take: a multiple of 8 in [8, 256] (the kernels pad it to a power of two)."""
    return isinstance(d, int) and 0 < d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class SpargeConfig:
    """Configuration of the sparse attention (frozen, validated on construction).

    topk:  fraction of the visible key blocks every query block keeps (Top-k rule), in [0, 1].
    topp:  cumulative block-probability mass every query block keeps (Top-p rule), in [0, 1].
    mode:  "hybrid" (union of both rules, the default), "topk" or "topp" (one rule alone).
    block_q, block_k: tokens per query block / key block (powers of two in [16, 256]).
    min_seq_len: attention with fewer keys than this stays dense in the compiler backend.
    """

    topk: float = 0.03
    topp: float = 0.2
    block_q: int = 128
    block_k: int = 64
    mode: str = "hybrid"
    min_seq_len: int = 1024

    def __post_init__(self):
        for name in ("topk", "topp"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"SpargeConfig.{name} must be a float, got {type(val).__name__}")
            if not (0.0 <= float(val) <= 1.0):
                raise ValueError(f"SpargeConfig.{name} must be in [0, 1], got {val}")
            object.__setattr__(self, name, float(val))
        if self.mode not in MODES:
            raise ValueError(f"SpargeConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"SpargeConfig.{name} must be an int, got {type(val).__name__}")
            if not (_is_pow2(val) and 16 <= val <= 256):
                raise ValueError(f"SpargeConfig.{name} must be a power of two in [16, 256], got {val}")
        if isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"SpargeConfig.min_seq_len must be a non-negative int, got {self.min_seq_len!r}")

    def replace(self, **changes) -> "SpargeConfig":
        """A copy with some fields changed (validated); unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown SpargeConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)


DEFAULT_CONFIG = SpargeConfig()
