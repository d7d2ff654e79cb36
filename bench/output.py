"""The one output helper of every benchmark: JSON, markdown tables and reports, PNG figures.

``write_result(out, name, title, result, sections)`` writes ``<name>.json`` and ``<name>.md``
(and ``<name>.png`` given a plot function) under ``out``. Tables use tabulate's "github"
format when tabulate is installed, otherwise the same layout from :func:`_plain_table`.
"""
from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------
# JSON


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
    """``data`` as indented JSON (non-finite floats as null), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file
    return path


# --------------------------------------------------------------------------------------------
# Tables and markdown


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


def _plain_table(body: list[list[str]], headers: list[str]) -> str:
    """A github-style markdown table without tabulate."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in body)])


def table(rows: list[dict], columns: list[tuple[str, str]], fmt_digits: int = 3) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    body = [[fmt(r.get(k), fmt_digits) for k, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    try:
        from tabulate import tabulate
    except ImportError:
        return _plain_table(body, headers)
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


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


def print_sections(sections: list[tuple[str, str]], prefix: str = "") -> None:
    for heading, body in sections:
        print(f"\n## {prefix}{heading}\n\n{body}", flush=True)


def command_line() -> str:
    """The command that produced a result, as the user would type it."""
    return "python -m " + " ".join(["bench"] + sys.argv[1:]) if sys.argv else "python -m bench"


# --------------------------------------------------------------------------------------------
# Figures


def plt():
    """matplotlib.pyplot with a non-interactive backend, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

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
    from matplotlib import pyplot

    pyplot.close(fig)
    return path


def write_png_grid(path: Path, rows: list[torch.Tensor], scale: int = 1) -> Path:
    """An image grid as PNG with no dependencies. rows: tensors (n, 3, H, W) in [-1, 1]; one
    grid row each, 2-pixel gaps."""
    import torch.nn.functional as F

    tiles = []
    for r in rows:
        r = ((r.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        r = F.pad(r, (1, 1, 1, 1), value=255)
        tiles.append(torch.cat(list(r), dim=2))   # (3, H+2, n*(W+2))
    img = torch.cat(tiles, dim=1)
    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    h, w = img.shape[1:]
    raw = img.permute(1, 2, 0).contiguous().numpy().tobytes()
    lines = b"".join(b"\x00" + raw[i * w * 3:(i + 1) * w * 3] for i in range(h))

    def chunk(tag, data):
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(lines, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


# --------------------------------------------------------------------------------------------
# One benchmark's files


def write_result(out: Path, name: str, title: str, result: dict, sections: list[tuple[str, str]],
                 plot: Callable[[dict, Path], Path | None] | None = None,
                 plot_errors: str = "report_errors") -> dict:
    """``<name>.json`` and ``<name>.md`` under ``out``, and ``<name>.png`` from ``plot`` (a
    failing plot records its error under ``result[plot_errors]["plot"]``). Returns the paths."""
    from bench.common import guarded

    out = Path(out)
    files = {"json": str(write_json(out / f"{name}.json", result))}
    files["md"] = str(write_markdown(out / f"{name}.md", title, sections, result.get("env"),
                                     result.get("command")))
    if plot is not None:
        png = guarded(lambda: plot(result, out / f"{name}.png"), result.setdefault(plot_errors, {}), "plot")
        if png:
            files["png"] = str(png)
    return files
