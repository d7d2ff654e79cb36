"""Every ``python -m bench <name>`` runs at a tiny size on the CPU (the ops' PyTorch path: the
conftest sets TRITON_INTERPRET=0 here) and writes the fields the README tables are built from."""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench import cli

pytest.importorskip("tabulate")


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def _bench(*argv) -> None:
    torch._dynamo.reset()
    assert cli.main(list(argv)) == 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    _bench("all", "--quick", "--out", str(out))
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The command line


def test_help_lists_every_name(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, (_, line) in cli.COMMANDS.items():
        assert f"  {name}" in text and line in text
    assert cli.main(["no-such-benchmark"]) == 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_name_has_its_options(name):
    p, module = cli.parser(name)
    assert callable(module.run)
    text = p.format_help()
    assert f"python -m bench {name}" in text and "--out" in text
    if getattr(module, "COMMON_ARGS", True):   # the GPU tools and report have no --quick
        assert "--quick" in text


def test_quick_keeps_explicit_sizes():
    """--quick gives tiny defaults; an option given on the command line wins."""
    from bench import distill

    p, _ = cli.parser("distill")
    args = p.parse_args(["--quick", "--train-steps", "3"])
    distill._sizes(args)
    assert args.train_steps == 3 and args.image_size == distill.QUICK["image_size"]
    assert args.inner == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real tools on a GPU")
@pytest.mark.parametrize("name", ["tune", "profile", "headdim", "lowbit", "linear"])
def test_gpu_tools_say_they_need_cuda(name, tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cli.main([name, "--out", str(tmp_path)])


def test_table_without_tabulate(monkeypatch):
    """The fallback table has tabulate's cells, row for row."""
    from bench import output as O

    rows = [{"a": 1.23456, "b": None}, {"a": True, "b": "x"}]
    cols = [("a", "A"), ("b", "long header")]
    with_tabulate = O.table(rows, cols)
    monkeypatch.setitem(__import__("sys").modules, "tabulate", None)
    plain = O.table(rows, cols)

    def cells(t):
        return [[c.strip() for c in line.strip("|").split("|")] for line in t.splitlines()]
    assert len(plain.splitlines()) == len(with_tabulate.splitlines()) == 4
    for got, want in zip(cells(plain), cells(with_tabulate)):
        if not set("".join(want)) <= set("-:"):  # the rule line may differ in colons
            assert got == want


# --------------------------------------------------------------------------------------------
# all: kernels, accuracy, e2e, report.md, summary.json


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
        for key in ("N", "D", "sparsity_target", "sparsity", "topk", "predict_ms", "predict_gpu_ms",
                    "sparge_fwd_ms", "sparge_kernel_fwd_ms", "sparge_fwdbwd_ms", "sparge_rel_err",
                    "sdpa_flash_fwd_ms", "speedup_vs_dense_fwd", "sparge_over_flex_fwd", "errors"):
            assert key in row, key
        # the op's PyTorch path is exact up to float32 rounding
        assert row["sparge_rel_err"] is not None and row["sparge_rel_err"] < 1e-4
        assert row["predict_ms"] is not None and row["sparge_fwd_ms"] is not None
        assert abs(row["sparsity"] - row["sparsity_target"]) <= 1.0 / (row["N"] / k["args"]["block_k"])
        failed = {key for key in row["errors"] if key.startswith(("sparge", "predict", "tune"))}
        assert not failed, row["errors"]
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
    assert src["frontier"]
    assert {"topk_err", "topp_err", "hybrid_err", "hybrid_not_worse"} <= set(src["frontier"][0])
    assert set(src["row_share"]) == {"flat", "sink", "other"}
    # the generator makes both failure kinds appear
    assert src["row_share"]["flat"] > 0 and src["row_share"]["sink"] > 0


def test_e2e_fields(report):
    e = _load(report[0], "e2e")
    rows, a = e["rows"], e["args"]
    assert rows[0]["variant"] == "dense" and rows[0]["errors"] == {}
    assert rows[0]["fwd_ms"] is not None and rows[0]["train_ms"] is not None
    assert rows[0]["attn_share_fwd"] is not None
    assert [r["variant"] for r in rows[1:]] == ["sparge"] * len(a["sparsities"])
    for row in rows:
        for key in ("sparsity", "fwd_ms", "train_ms", "attn_share_fwd", "attn_share_train",
                    "speedup_fwd", "speedup_train", "rel_err", "errors"):
            assert key in row, key
    nk = a["tokens"] / a["block_k"]
    for row in rows[1:]:
        # every sparse variant compiled and ran: no failure recorded, both steps timed
        assert row["errors"] == {}, row["errors"]
        assert row["fwd_ms"] is not None and row["train_ms"] is not None and row["speedup_fwd"] is not None
        rewritten, sites = map(int, row["sites"].split("/"))
        assert rewritten >= 1 and sites == 2 * rewritten   # self-attention sparse, cross-attention dense
        assert abs(row["sparsity"] - row["sparsity_target"]) <= 1.0 / nk   # measured at the sites
        assert 0.0 < row["rel_err"] < 0.5   # the mask changed the output, a little


def test_report_merges_runs(report, tmp_path):
    """`python -m bench report A B --out M` merges subset runs (separate device commands)."""
    out = report[0]
    _bench("report", str(out), str(out), "--out", str(tmp_path))
    k = _load(tmp_path, "kernels")
    assert len(k["rows"]) == 2 * len(_load(out, "kernels")["rows"])
    e = _load(tmp_path, "e2e")
    assert [r["variant"] for r in e["rows"]].count("dense") == 1
    assert (tmp_path / "report.md").read_text().count("## ") >= 5


# --------------------------------------------------------------------------------------------
# Each benchmark alone


def test_kernels_alone(tmp_path):
    _bench("kernels", "--quick", "--shapes", "128x32", "--sparsities", "50", "--no-bwd",
           "--out", str(tmp_path))
    (row,) = _load(tmp_path, "kernels")["rows"]
    assert (row["N"], row["D"]) == (128, 32) and "sparge_fwdbwd_ms" not in row
    assert row["sparge_rel_err"] < 1e-4 and abs(row["sparsity"] - 0.5) <= 16 / 128


def test_kernels_fa4_peer_gets_fa4_lists(tmp_path, monkeypatch):
    """The FA4 peer (bench.fa4) on the CPU with a stand-in for flash_attn_func that decodes the
    block lists it is handed into a token mask and attends under it: FA4's timings and ratios are
    in the row, and the lists carry the mask at 128x128 blocks with the row's sparsity."""
    from bench import kernels
    from sparge_compile.reference import dense_token_mask

    seen = []

    def fake_fa4(q, k, v, softmax_scale, causal, block_sparse_tensors, block_sparse_tensors_bwd):
        t = block_sparse_tensors
        listed = torch.arange(t.full_block_idx.shape[-1]) < t.full_block_cnt[..., None]
        kept = torch.zeros(listed.shape, dtype=torch.bool).scatter_(-1, t.full_block_idx.long(), listed)
        seen.append((tuple(t.block_size), kept, block_sparse_tensors_bwd.full_block_cnt.sum()))
        tok = dense_token_mask(kept, q.shape[1], k.shape[1], 128, 128, False)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=softmax_scale)
        return o.transpose(1, 2)

    monkeypatch.setattr(kernels, "fa4_or_none", lambda device, errors: fake_fa4)
    _bench("kernels", "--quick", "--shapes", "512x32", "--sparsities", "50", "--out", str(tmp_path))
    (row,) = _load(tmp_path, "kernels")["rows"]
    assert row["fa4_fwd_ms"] > 0 and row["fa4_fwdbwd_ms"] > 0 and row["sparge_kernel_over_fa4_fwd"] > 0
    size, kept, bwd_total = seen[-1]
    assert size == (128, 128) and kept.shape[-2:] == (4, 4)
    assert abs(1 - kept.float().mean().item() - row["fa4_sparsity"]) < 1e-6 and bwd_total == kept.sum()


def test_masks(tmp_path):
    _bench("masks", "--quick", "--out", str(tmp_path))
    r = _load(tmp_path, "masks")
    assert not r["errors"], r["errors"]
    llama, bert = r["rows"]
    assert llama["rewritten"] == llama["sites"] == 1 and bert["rewritten"] == bert["sites"] == 2
    assert 0.2 < bert["padding"] < 0.5 and 0 < bert["sparsity"] < 1
    assert 0 < bert["rel_l2"] < 0.5 and 0 < llama["rel_l2"] < 0.5


def test_accuracy_alone(tmp_path):
    _bench("accuracy", "--quick", "--out", str(tmp_path), "--grid", "2,4,8")
    assert _load(tmp_path, "accuracy")["sources"][0]["tokens"] == 64


def test_e2e_alone(tmp_path):
    _bench("e2e", "--quick", "--depth", "1", "--no-train", "--sparsities", "95", "--out", str(tmp_path))
    rows = _load(tmp_path, "e2e")["rows"]
    assert [r["variant"] for r in rows] == ["dense", "sparge"]
    assert rows[1]["errors"] == {} and rows[1]["train_ms"] is None and rows[1]["fwd_ms"] is not None


def test_calibrate(tmp_path):
    import sparge_compile as sc

    _bench("calibrate", "--quick", "--depth", "1", "--out", str(tmp_path))
    r = _load(tmp_path, "calibrate")
    assert not r["errors"], r["errors"]
    plan, glob = r["rows"]
    assert (plan["variant"], glob["variant"]) == ("calibrated plan (per site)", "one global (topk, topp)")
    for row in r["rows"]:
        assert 0.0 < row["sparsity"] < 1.0 and 0.0 < row["rel_l2"] < 1.0
    assert sc.SpargePlan.load(tmp_path / "plan.json").sites
    assert "calibrated plan" in (tmp_path / "calibrate.md").read_text()


def test_distill(tmp_path):
    _bench("distill", "--quick", "--train-steps", "2", "--modes", "hybrid", "--distill-steps", "2",
           "--out", str(tmp_path))
    r = _load(tmp_path, "distill")
    (row,) = r["rows"]
    assert row["mode"] == "hybrid" and r["teacher"]["steps"] == 2
    assert 0.9 <= row["sparsity"] < 1.0   # --sparsity 0.95 on 16 key blocks: one kept per row
    assert row["vel_err_before"] > 0 and row["vel_err_after"] is not None and len(row) > 10
    png = (tmp_path / "distill_samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"


def test_quality(tmp_path):
    """bench quality at tiny sizes: a row per (sparsity, variant), the linear branch trained by the
    distillation (its student differs from the sparse-only one), the teacher checkpoint reused."""
    ck = tmp_path / "teacher.pt"
    argv = ["quality", "--quick", "--train-steps", "3", "--variants", "hybrid,sla2", "--sparsities", "0.9",
            "--distill-steps", "2", "--teacher-ckpt", str(ck), "--out", str(tmp_path)]
    _bench(*argv)
    r = _load(tmp_path, "quality")
    assert [(x["sparsity_target"], x["variant"]) for x in r["rows"]] == [(0.9, "hybrid"), (0.9, "sla2")]
    hyb, sla2 = r["rows"]
    assert hyb["vel_err_before"] == sla2["vel_err_before"]   # the branch starts as the identity
    assert all(0 < x["sparsity_before"] < 1 and 0 < x["sparsity"] < 1 for x in r["rows"])
    (pair,) = r["paired"]   # sla2 against hybrid, per sample on the same noise
    assert (pair["variant"], pair["against"]) == ("sla2", "hybrid")
    assert pair["samples"] == len(hyb["psnr_each_after"]) > 1
    each = [a - b for a, b in zip(sla2["psnr_each_after"], hyb["psnr_each_after"])]
    assert pair["psnr_diff_db"] == pytest.approx(sum(each) / len(each)) and pair["se_db"] >= 0
    assert hyb["vel_err_after"] != sla2["vel_err_after"]     # ... and distill trained it
    assert 0.0 <= r["teacher_quality"]["class_acc_samples"] <= 1.0 and r["teacher_quality"]["edge_ratio"] > 0
    assert ck.exists() and r["teacher"]["steps"] == 3
    _bench(*argv[:-2], "--out", str(tmp_path / "again"))
    again = _load(tmp_path / "again", "quality")
    assert again["teacher"]["loaded_from"] == str(ck)
    assert again["rows"][0]["vel_err_before"] == hyb["vel_err_before"]   # the same teacher, loaded
    _bench("quality", "--quick", "--train-steps", "2", "--variants", "", "--teacher-ckpt", str(ck),
           "--teacher-continue", "--out", str(tmp_path / "more"))
    more = _load(tmp_path / "more", "quality")
    assert more["teacher"]["steps"] == 5 and more["teacher"]["resumed_at"] == 3   # 3 + 2 steps
    saved = torch.load(ck, weights_only=False)
    assert saved["info"]["steps"] == 5    # saved again, with the steps added up


def test_calibrate_hybrid_picks_the_least_error_mixture():
    """bench quality's hybrid calibration: every candidate is a true mixture (0 < share < 1)
    bisected to the target, the pick reaches it and has the least training-free error of those
    that do (recomputed here), and the grid reports each candidate."""
    import sparge_compile as sc
    from bench import distill as D

    g = torch.Generator().manual_seed(0)
    qkvs = []
    for _ in range(2):
        q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
        k = k + torch.randn(1, 2, 8, 1, generator=g).repeat_interleave(64, dim=2)   # structured blocks
        qkvs.append((q, k, v))
    base = sc.SpargeConfig(block_q=64, block_k=64, min_seq_len=0)
    cfg, grid = D.calibrate_hybrid(qkvs, base, 0.75, iters=12)
    assert [r["share"] for r in grid] == list(D.HYBRID_SHARES) and all(0 < r["share"] < 1 for r in grid)
    ok = [r for r in grid if r["error"] is not None]
    assert ok and all(r["sparsity"] >= 0.75 for r in ok)
    assert cfg.mode == "hybrid" and D.mean_sparsity([x[:2] for x in qkvs], cfg) >= 0.75
    err = D.attention_error(qkvs, cfg)
    assert err == min(r["error"] for r in ok)
    assert err <= D.attention_error(qkvs, D.calibrate([x[:2] for x in qkvs], base, "hybrid", 0.75, iters=12))


@pytest.mark.parametrize("argv,named", [(["--sparsities", "0.95,150"], "--sparsities"),
                                        (["--sparsities", "x"], "--sparsities"),
                                        (["--variants", "hybrid,sla3"], "--variants"),
                                        (["--frames", "5"], "--frames"),
                                        (["--teacher-continue"], "--teacher-continue"),
                                        (["--distill-warmup", "-1"], "--distill-warmup")])
def test_quality_bad_arguments_name_the_option(argv, named, tmp_path):
    with pytest.raises(SystemExit, match=named):
        _bench("quality", "--quick", *argv, "--out", str(tmp_path))


def test_paired_difference_and_its_standard_error():
    from bench.distill import paired

    mean, se = paired([3.0, 5.0], [1.0, 1.0])   # differences 2, 4: sd sqrt(2), se 1
    assert mean == pytest.approx(3.0) and se == pytest.approx(1.0)


def test_shape_clips_move_one_shape():
    from bench.data import shape_clips

    x, y = shape_clips(6, 4, 24, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (6, 3, 48, 48) and y.shape == (6,) and x.min() >= -1 and x.max() <= 1
    frames = x.unflatten(2, (2, 24)).unflatten(4, (2, 24)).permute(0, 2, 4, 1, 3, 5).reshape(6, 4, 3, 24, 24)
    change = (frames[:, 0] - frames[:, -1]).abs().flatten(1)
    assert (change.max(1).values > 0.5).all()             # the front shape moved in every clip
    assert ((change < 1e-2).float().mean(1) > 0.4).all()  # the rest (soft edges aside) stays as it was
    with pytest.raises(ValueError, match="square"):
        shape_clips(2, 3, 8, torch.Generator(), "cpu")


def _diffusers_dit_importable() -> bool:
    from _backend_util import allow_broken_torchvision

    allow_broken_torchvision()   # a torchvision wheel built for another torch: skip its C ops
    try:
        from diffusers import DiTTransformer2DModel  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing or broken install (e.g. a torchvision mismatch)
        return False
    return True


@pytest.mark.skipif(not _diffusers_dit_importable(),
                    reason="diffusers' DiTTransformer2DModel does not import")
def test_dit(tmp_path):
    _bench("dit", "--quick", "--inner", "eager", "--out", str(tmp_path))
    r = _load(tmp_path, "backend_dit")
    assert r["sites"] >= 1 and r["sites_rewritten"] == r["sites"]   # min_seq_len 0 at --quick
    assert 0.0 < r["mean_sparsity"] < 1.0
    assert 0.0 < r["results"]["sparge"]["rel_err_vs_eager"] < 1.0


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
        assert bm.BLOCK_SIZE[0] % kernel_options["BLOCK_M"] == 0
        assert bm.BLOCK_SIZE[1] % kernel_options["BLOCK_N"] == 0
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


def test_models_quick(tmp_path):
    """bench models on tiny diffusers configs (CPU, PyTorch path): every row runs, the sparse row
    reports a measured sparsity and stays close to dense."""
    _bench("models", "--quick", "--models", "wan", "--targets", "0.5", "--reps", "1", "--out", str(tmp_path))
    dense, sparse = _load(tmp_path, "models")["rows"]
    assert dense["variant"] == "inductor dense" and 0 <= dense["attention_share"] <= 1
    assert "error" not in sparse, sparse.get("error")
    assert 0 < sparse["sparsity"] < 1 and sparse["rel_err_vs_dense"] < 0.5 and sparse["step_ms"] > 0
    assert all(0 < r["host_ms"] for r in (dense, sparse))   # on the CPU the host does all the work


@pytest.mark.parametrize("argv,name", [(["--models", "sd3"], "--models"), (["--modes", "max"], "--modes"),
                                       (["--targets", "95"], "--targets")])
def test_models_bad_arguments_name_the_option(argv, name, tmp_path):
    with pytest.raises(SystemExit, match=name):
        _bench("models", "--quick", *argv, "--out", str(tmp_path))


def test_kernel_categories_keep_inductor_prep_out_of_dense_attention():
    """Kernel names as the H200 profile of the Flux step has them (docs/results/2026-12-04e-h200):
    cuDNN's SDPA kernel is dense attention; inductor's norm/RoPE kernel that feeds it (named after
    the SDPA op it precedes) is not, so the dense attention time is the attention kernels' own."""
    from bench import kernel_times as KT

    cudnn = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7"
    assert KT.category(cudnn) == "dense attention"
    assert KT.category("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy") \
        == KT.OTHER
    assert KT.category("_fwd_kernel") == "sparse attention"
    assert KT.category("_select_kernel") == "mask prediction"
    kernels = {"cudnn_sdpa_flash": [2.0, 4], "triton_poi_fused_scaled_dot_product_attention": [1.0, 4],
               "nvjet_gemm": [3.0, 8]}
    assert KT.by_category(kernels) == {"dense attention": 2.0, KT.OTHER: 1.0, "matmul": 3.0}


def test_quality_lowbit_variants_share_hybrids_mask_config():
    """bench quality's int8 / fp8 students run hybrid's calibrated mask rule; only the forward's
    arithmetic differs, so their rows compare precision alone."""
    from types import SimpleNamespace

    import sparge_compile as sc
    from bench.quality import variant_config

    hyb = sc.SpargeConfig(topk=0.02, topp=0.1, min_seq_len=0)
    cache = {("hybrid", (), 0.95): (hyb, ["grid"])}
    ctx = dict(base=sc.SpargeConfig(min_seq_len=0), cal_qkv=[], configs=cache)
    for name in ("int8", "fp8"):
        cfg, grid = variant_config(SimpleNamespace(), name, ctx, 0.95)
        assert cfg.precision == name and cfg.replace(precision="bf16") == hyb and grid == ["grid"]
    assert variant_config(SimpleNamespace(), "hybrid", ctx, 0.95)[0] is hyb
