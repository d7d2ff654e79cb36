"""The README's quickstart runs exactly as written (so it cannot rot), and the README stays short."""
import contextlib
import io
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_as_written(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # what a CPU user gets: the PyTorch path
    torch._dynamo.reset()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quickstart(), str(README), "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    assert re.search(r"1 attention site\(s\), 1 rewritten", printed), printed
    err = float(re.search(r"error vs dense: ([0-9.e+-]+)", printed).group(1))
    assert 0 < err < 1   # sparse (not dense), and not garbage


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 130


@pytest.mark.parametrize("path", re.findall(r"\]\(([^)#]+)\)", README.read_text()) if README.exists() else [])
def test_readme_links_resolve(path):
    if path.startswith("http"):
        pytest.skip("external link")
    assert (README.parent / path).exists(), path
