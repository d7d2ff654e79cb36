"""The install gives what the README says: one pinned torch, Triton optional, the CPU path without it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pins():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from check_env import pins
    finally:
        sys.path.pop(0)
    return pins(str(ROOT / "constraints.txt"))


def test_readme_setup_names_the_pinned_torch_and_the_constraints():
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("pip install torch=="))
    torch_pin = re.match(r"pip install torch==(\S+)", line).group(1)
    assert torch_pin == _pins()["torch"]
    assert "-c constraints.txt" in line
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci and "check_env.py constraints.txt" in ci


def test_triton_is_linux_only_and_model_libraries_are_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=;\s]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    assert "sys_platform == 'linux'" in deps["triton"]
    assert not {"timm", "diffusers", "transformers"} & set(deps)
    assert set(project["optional-dependencies"]["models"]) == {"timm", "diffusers", "transformers"}
    assert project["license"] and project["urls"]


def test_cpu_path_runs_without_triton():
    script = """
import sys
sys.modules["triton"] = None          # import triton now raises ImportError
import torch, sparge_compile as sc
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 300, 32, dtype=torch.float64) for _ in range(3))
cfg = sc.SpargeConfig(topk=0.5, topp=0.0)
out = sc.sparse_attention(q, k, v, config=cfg)
m = sc.predict_block_mask(q, k, config=cfg)
ref = sc.sparse_attention(q, k, v, block_mask=m)
assert torch.equal(out, ref), (out - ref).abs().max()
layer = torch.nn.TransformerEncoderLayer(32, 2, batch_first=True).eval()
x = torch.randn(1, 1100, 32)
y = torch.compile(layer, backend="sparge")(x)
assert y.shape == x.shape and torch.isfinite(y).all()
print("ok")
"""
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
