"""distill()'s checkpoints: RNG state, atomic saves that keep the previous file, loading, resuming."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DistillConfig, SpargeConfig
from ..validate import warn_user
from .results import DistillError

logger = logging.getLogger("sparge_compile.distill")

CHECKPOINT_NAME = "distill_latest.pt"
PREV_CHECKPOINT_NAME = "distill_prev.pt"   # the checkpoint before the latest, kept on every save
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# RNG state


def get_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(gauss))
    return state


def set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------
# Writing


def save_checkpoint_atomic(state: dict, path: str | os.PathLike,
                           keep_previous: str | os.PathLike | None = None) -> Path:
    """torch.save ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then
    os.replace. A crash at any point leaves either the old file or the new one, never a torn one.

    keep_previous: a path in the same folder; once the new file is written, the old ``path``
    (if any) becomes this file (a hard link, so no copy and no moment without ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _keep_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically: a hard link (free), or a real copy where the file
    system has none, made under a temp name and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _clean_stale_temps(directory: Path) -> None:
    """Temp files left by a process killed mid-save (never read; removed on the next run)."""
    for name in (CHECKPOINT_NAME, PREV_CHECKPOINT_NAME):
        for p in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


# --------------------------------------------------------------------------------------------
# Reading and resuming


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a distill checkpoint (a dict: version, step, student, optimizer, rng, losses, ...).

    Raises :class:`DistillError` naming the file when it is empty, truncated or corrupt (a
    checkpoint distill() wrote always loads with ``weights_only=True``); OSError (a missing or
    unreadable file) passes through."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:
        size = os.path.getsize(path)
        what = "is empty" if size == 0 else f"is truncated or corrupt ({size} bytes)"
        raise DistillError(f"checkpoint {path} {what}: torch.load failed with {type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise DistillError(f"{path} is not a distill() checkpoint (version {CHECKPOINT_VERSION})")
    return state


@dataclass
class Start:
    """Where a run starts: the checkpoint file (None without checkpoint_dir), the step, the loss
    history and RNG state to restore (resumed runs), and the checkpoint already on disk (or None)."""

    path: Path | None = None
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    rng: dict | None = None
    saved: str | None = None


def open_checkpoint(settings: DistillConfig, module: nn.Module, opt, scaler, config: SpargeConfig) -> Start:
    """Prepare ``checkpoint_dir`` (created, stale temp files removed) and, with ``resume``, load
    its checkpoint into module / optimizer / scaler."""
    if settings.checkpoint_dir is None:
        return Start()
    path = Path(settings.checkpoint_dir) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(path.parent)
    start = Start(path=path)
    if settings.resume and path.exists():
        state = _load_for_resume(path)
        module.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start.step, start.losses, start.rng = int(state["step"]), list(state["losses"]), state["rng"]
        _warn_changed(path, state, config, {name: getattr(settings, name) for name in WARNED})
        logger.info("distill: resumed from %s at step %d", path, start.step)
    start.saved = str(path) if path.exists() else None
    return start


WARNED = ("grad_accum", "seed", "lr_schedule", "warmup_steps")   # settings a resume warns about


def _why(name: str, start: int, old, now) -> str:
    if name == "grad_accum":
        return (f"this run skips {start} x {now} micro-batches of `inputs` (the checkpoint used {start} x "
                f"{old}) and accumulates {now} per step, so it matches an uninterrupted run with neither "
                "setting")
    if name == "seed":
        return ("the checkpoint's RNG state is restored, so the run continues the old seed's random stream; "
                "the new seed reaches only what draws before that (a shuffled DataLoader's order), "
                "which breaks an exact resume")
    return "the learning rate follows the new curve from this step on, not the checkpoint's"


def _warn_changed(path: Path, state: dict, config: SpargeConfig, settings: dict) -> None:
    """Warn when the checkpoint was written with another config or other ``settings``."""
    if state.get("config") not in (None, dataclasses.asdict(config)):
        warn_user(f"resuming from {path} written with config {state['config']}, "
                  f"now {dataclasses.asdict(config)}")
    start = int(state["step"])
    for name, now in settings.items():
        if name in state and state[name] != now:
            old = state[name]
            warn_user(f"resuming from {path} written with {name}={old}, now {name}={now}: "
                      f"{_why(name, start, old, now)}")


def _load_for_resume(path: Path) -> dict:
    """The latest checkpoint, or an error naming it and the ways out (never a silent fall-back to
    the previous checkpoint, which would quietly drop the steps after it)."""
    try:
        return load_checkpoint(path, map_location="cpu")
    except DistillError as err:
        prev = path.parent / PREV_CHECKPOINT_NAME
        if not prev.exists():
            keep = f"There is no previous checkpoint ({prev})."
        else:
            try:
                prev_step = load_checkpoint(prev, map_location="cpu")["step"]
                keep = (f"The previous checkpoint {prev} (step {prev_step}) is intact: move it over {path} "
                        f"(mv {prev} {path}) to resume from step {prev_step}.")
            except (DistillError, OSError) as e2:
                keep = f"The previous checkpoint {prev} cannot be read either ({e2})."
        raise DistillError(f"distill: cannot resume: {err}. {keep} To start over instead, delete {path} "
                           "or pass resume=False (the next checkpoint overwrites it).") from err
