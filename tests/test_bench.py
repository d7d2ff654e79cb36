"""The benchmark report code runs (``python -m bench all --quick``) and writes the fields the
README and the issue tables are built from. On the CPU the quick run uses the ops' PyTorch path."""
from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("tabulate")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from bench.__main__ import main

    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    assert main(["all", "--quick", "--out", str(out)]) == 0
    return out, time.perf_counter() - t0


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_files_written(report):
    out, seconds = report
    for name in ("kernels", "accuracy", "e2e"):
        assert (out / f"{name}.json").exists()
        assert (out / f"{name}.md").read_text().startswith("#")
    assert (out / "report.md").exists()
    summary = _load(out, "summary")
    assert summary["parts"] == {"kernels": "ok", "accuracy": "ok", "e2e": "ok"}
    assert summary["env"]["torch"]
    print(f"bench all --quick: {seconds:.1f} s")


def test_kernels_fields(report):
    k = _load(report[0], "kernels")
    assert k["rows"], "no kernel rows"
    for row in k["rows"]:
        for key in ("N", "D", "sparsity_target", "sparsity", "topk", "predict_ms", "predict_gpu_ms", "sparge_fwd_ms",
                    "sparge_kernel_fwd_ms", "sparge_fwdbwd_ms", "sparge_rel_err", "sdpa_flash_fwd_ms",
                    "speedup_vs_dense_fwd", "sparge_over_flex_fwd", "errors"):
            assert key in row, key
        # the op's PyTorch path is exact up to float32 rounding
        assert row["sparge_rel_err"] is not None and row["sparge_rel_err"] < 1e-4
        assert row["predict_ms"] is not None and row["sparge_fwd_ms"] is not None
        assert abs(row["sparsity"] - row["sparsity_target"]) <= 1.0 / (row["N"] / k["args"]["block_k"])
        assert isinstance(row["errors"], dict)
    assert k["dense"] and "sdpa_cudnn_fwd_ms" in k["dense"][0]


def test_accuracy_fields(report):
    a = _load(report[0], "accuracy")
    src = a["sources"][0]
    assert src["name"] == "video"
    rules = {r["rule"] for r in src["rows"]}
    assert rules == {"topk", "topp", "hybrid"}
    for row in src["rows"]:
        assert 0.0 <= row["sparsity"] < 1.0
        assert row["rel_l1"] >= 0.0
        for key in ("rel_l1_flat_rows", "rel_l1_sink_rows", "rel_l1_other_rows", "topk", "topp"):
            assert key in row
    hyb = [r for r in src["rows"] if r["rule"] == "hybrid"]
    assert all("hybrid_not_worse" in r and "best_single_err_same_sparsity" in r for r in hyb)
    assert src["frontier"] and {"topk_err", "topp_err", "hybrid_err", "hybrid_not_worse"} <= set(src["frontier"][0])
    assert set(src["row_share"]) == {"flat", "sink", "other"}
    # the generator makes both failure kinds appear
    assert src["row_share"]["flat"] > 0 and src["row_share"]["sink"] > 0


def test_e2e_fields(report):
    e = _load(report[0], "e2e")
    rows = e["rows"]
    assert rows[0]["variant"] == "dense" and rows[0]["fwd_ms"] is not None
    assert rows[0]["train_ms"] is not None and rows[0]["attn_share_fwd"] is not None
    assert [r["variant"] for r in rows[1:]] == ["sparge"] * len(e["args"]["sparsities"])
    for row in rows:
        for key in ("sparsity", "fwd_ms", "train_ms", "attn_share_fwd", "attn_share_train",
                    "speedup_fwd", "speedup_train", "rel_err", "errors"):
            assert key in row, key
    for row in rows[1:]:
        # either measured, or the failure is recorded (e.g. the backend is not installed yet)
        assert row["fwd_ms"] is not None or row["errors"]


def test_cli_single_part(tmp_path):
    from bench.__main__ import main

    assert main(["accuracy", "--quick", "--out", str(tmp_path), "--grid", "2,4,8"]) == 0
    assert _load(tmp_path, "accuracy")["sources"][0]["tokens"] == 64


def test_report_merges_runs(report, tmp_path):
    """`python -m bench report A B --out M` merges subset runs (separate device commands)."""
    from bench.__main__ import main

    out = report[0]
    assert main(["report", str(out), str(out), "--out", str(tmp_path)]) == 0
    k = _load(tmp_path, "kernels")
    assert len(k["rows"]) == 2 * len(_load(out, "kernels")["rows"])
    e = _load(tmp_path, "e2e")
    assert [r["variant"] for r in e["rows"]].count("dense") == 1
    assert (tmp_path / "report.md").read_text().count("## ") >= 5


def test_flex_falls_back_to_tiles_that_divide_the_mask():
    """Flex's own tiles first; where they fail (its BLOCK_N = 128 on 64-key blocks) the bench
    retries the forward with kernel_options tiles dividing the mask's blocks, and says so."""
    import types

    from bench import kernels as K

    bm = types.SimpleNamespace(BLOCK_SIZE=(128, 64))
    calls = []

    def flex(q, k, v, block_mask, kernel_options=None):
        calls.append(kernel_options)
        if kernel_options is None:
            raise ValueError("Q and KV block size must be divisible by BLOCK_M and BLOCK_N")
        assert bm.BLOCK_SIZE[0] % kernel_options["BLOCK_M"] == 0 and bm.BLOCK_SIZE[1] % kernel_options["BLOCK_N"] == 0
        return q * 1.0

    x = torch.ones(2, requires_grad=True)
    cpu = torch.device("cpu")
    errors: dict = {}
    ms, opts = K.time_flex(flex, bm, (x, x, x), None, cpu, {"cpu_iters": 1}, errors, "f")
    assert ms is not None and opts == K.flex_tiles(bm) and errors == {}
    assert calls[0] is None and all(c == opts for c in calls[1:])
    # forward+backward: no tile fallback (torch drops the configs before kernel_options apply)
    assert K.time_flex(flex, bm, (x, x, x), torch.ones(2), cpu, {}, errors, "b") == (None, None)
    assert "divisible" in errors["b"] and "b_own_tiles" not in errors

    def broken(q, k, v, block_mask, kernel_options=None):
        raise RuntimeError("no choices" if kernel_options else "own tiles")

    assert K.time_flex(broken, bm, (x, x, x), None, cpu, {}, errors, "g") == (None, None)
    assert "no choices" in errors["g"] and "own tiles" in errors["g_own_tiles"]
