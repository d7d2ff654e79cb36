"""The bad-input list of DESIGN.md §2 and the README as one table: every public entry point, given
a bad argument, raises a clear error naming that argument, before any kernel runs.

Each row: an id, a callable making the bad call, the exception type, and a regex the message
must match (it names the argument). Rows that reach the attention kernels run on both CPU paths
(Triton's interpreter and the PyTorch implementation); the kernels are wrapped to count calls,
and no row may run one. Errors raised inside ``torch.compile`` count when Dynamo's wrapper
carries them (its ``inner_exception`` / ``__cause__`` chain).
"""
from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge_compile as sc
from sparge_compile import kernels
from sparge_compile.block_mask import SpargeBlockMask
from sparge_compile.plan import PlanFormatError, PlanSite

CFG = sc.SpargeConfig(topk=0.25, topp=0.0, block_q=16, block_k=16, min_seq_len=0)


@dataclass
class Row:
    id: str
    call: Callable
    exc: type
    match: str
    paths: tuple = ("-",)   # TRITON_INTERPRET values to run it under ("-": not a kernel input)


BOTH = ("1", "0")   # the interpreter and the PyTorch path


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype).to(device)


def _qkv(B=1, H=2, N=64, D=32):
    return _t(B, H, N, D), _t(B, H, N, D), _t(B, H, N, D)


def attn(**over):
    """sparse_attention on good q, k, v with some arguments replaced."""
    q, k, v = _qkv()
    kw = {"q": q, "k": k, "v": v, "config": CFG, **over}
    return lambda: sc.sparse_attention(**kw)


def predict(**over):
    q, k, _ = _qkv()
    kw = {"q": q, "k": k, "config": CFG, **over}
    return lambda: sc.predict_block_mask(**kw)


def _good_mask():
    """A valid mask for 64 x 64 tokens in 16 x 16 blocks: each query block keeps key blocks 0, 1."""
    num = torch.full((1, 2, 4), 2, dtype=torch.int32)
    return num, torch.arange(4, dtype=torch.int32).expand(1, 2, 4, 4).contiguous()


def with_mask(make):
    """sparse_attention with block_mask=make(num, idx): a mask built from a good one."""
    def call():
        num, idx = _good_mask()
        q, k, v = _qkv()
        return sc.sparse_attention(q, k, v, config=CFG, block_mask=make(num, idx))
    return call


def mask(num, idx, q_len=64, kv_len=64, block_q=16, block_k=16):
    return SpargeBlockMask(num, idx, q_len, kv_len, block_q, block_k)


def compiled(**options):
    """Compile SDPA with backend="sparge" and these options, and run it."""
    def call():
        torch._dynamo.reset()
        q, k, v = _qkv()
        f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="sparge",
                          options=dict({"min_seq_len": 0, "inner": "eager"}, **options))
        return f(q, k, v)
    return call


def set_config(**changes):
    return lambda: sc.backend(CFG).set_config(**changes)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], -1, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def _batches():
    return [(_t(1, 64, 64),)]


def calibrate(**over):
    kw = {"model": _Attn().eval(), "inputs": _batches(), "target_sparsity": 0.5, "config": CFG, **over}
    return lambda: sc.calibrate(**kw)


def distill(**over):
    kw = {"model": _Attn(), "inputs": _batches(), "steps": 1, "config": CFG, "progress": False, **over}
    return lambda: sc.distill(**kw)


def _plan_dict():
    site = PlanSite(topk=0.1, topp=0.2, kind="sdpa", shapes=[{"q": [2, 64, 32], "k": [2, 64, 32]}])
    return sc.SpargePlan(config=CFG, sites={"s#0": site}).to_dict()


def load(edit=None, text=None, raw=None):
    """SpargePlan.load of a file: ``raw`` bytes, ``text``, or a good plan changed by ``edit``."""
    def call(tmp_path):
        p = tmp_path / "plan.json"
        if raw is not None:
            p.write_bytes(raw)
        elif text is not None:
            p.write_text(text)
        else:
            d = _plan_dict()
            edit(d)
            p.write_text(json.dumps(d))
        return sc.SpargePlan.load(p)
    return needs_tmp(call)


def needs_tmp(call):
    """Mark a row's callable as taking pytest's tmp_path."""
    call.needs_tmp = True
    return call


def _site(field, value):
    return lambda d: d["sites"]["s#0"].__setitem__(field, value)


def _drop(field):
    return lambda d: d.pop(field)


q64 = _qkv()[0]
ROWS = [
    # ---- sparse_attention / predict_block_mask: q, k, v
    Row("q not a tensor", attn(q=q64.tolist()), TypeError, r"^q must be a torch.Tensor", BOTH),
    Row("q rank 3", attn(q=_t(2, 64, 32)), ValueError, r"^q must have rank 4", BOTH),
    Row("k rank 5", attn(k=_t(1, 1, 2, 64, 32)), ValueError, r"^k must have rank 4", BOTH),
    Row("v rank 3", attn(v=_t(2, 64, 32)), ValueError, r"^v must have rank 4", BOTH),
    Row("int q", attn(q=torch.ones(1, 2, 64, 32, dtype=torch.int32)), TypeError, r"^q has dtype torch.int32", BOTH),
    Row("k dtype differs", attn(k=_t(1, 2, 64, 32, dtype=torch.float16)), TypeError, r"^k has dtype .* but q", BOTH),
    Row("v dtype differs", attn(v=_t(1, 2, 64, 32, dtype=torch.bfloat16)), TypeError, r"^v has dtype .* but q",
        BOTH),
    Row("k on another device", attn(k=_t(1, 2, 64, 32, device="meta")), ValueError, r"^k is on meta but q", BOTH),
    Row("v on another device", attn(v=_t(1, 2, 64, 32, device="meta")), ValueError, r"^v is on meta but q", BOTH),
    Row("batch differs", attn(k=_t(2, 2, 64, 32), v=_t(2, 2, 64, 32)), ValueError, r"^k has batch 2", BOTH),
    Row("k head dim differs", attn(k=_t(1, 2, 64, 64)), ValueError, r"^k has head dim 64", BOTH),
    Row("Hq % Hkv != 0", attn(q=_t(1, 3, 64, 32)), ValueError, r"q heads \(3\).*k heads \(2\).*Hq % Hkv", BOTH),
    Row("v heads differ", attn(v=_t(1, 1, 64, 32)), ValueError, r"^v shape .* must match k", BOTH),
    Row("v length differs", attn(v=_t(1, 2, 48, 32)), ValueError, r"^v shape .* must match k", BOTH),
    Row("v head dim differs", attn(v=_t(1, 2, 64, 64)), ValueError, r"^v head dim 64", BOTH),
    Row("head dim 44", attn(q=_t(1, 2, 64, 44), k=_t(1, 2, 64, 44), v=_t(1, 2, 64, 44)), ValueError,
        r"^head dim 44 .*not supported.*multiple of 8 up to 256", BOTH),  # not a multiple of 8
    Row("head dim 264", attn(q=_t(1, 2, 64, 264), k=_t(1, 2, 64, 264), v=_t(1, 2, 64, 264)), ValueError,
        r"^head dim 264 .*not supported", BOTH),  # over 256
    Row("empty q", attn(q=_t(1, 2, 0, 32)), ValueError, r"sequence lengths must be positive.*Nq=0", BOTH),
    Row("empty k", attn(k=_t(1, 2, 0, 32), v=_t(1, 2, 0, 32)), ValueError, r"sequence lengths.*Nk=0", BOTH),
    Row("scale nan", attn(scale=float("nan")), ValueError, r"^scale must be a finite float", BOTH),
    Row("scale str", attn(scale="0.1"), ValueError, r"^scale must be", BOTH),
    Row("scale bool", attn(scale=True), ValueError, r"^scale must be", BOTH),
    Row("is_causal str", attn(is_causal="False"), TypeError, r"^is_causal must be True or False", BOTH),
    Row("is_causal int", attn(is_causal=1), TypeError, r"^is_causal must be True or False", BOTH),
    Row("return_mask str", attn(return_mask="yes"), TypeError, r"^return_mask must be True or False", BOTH),
    Row("config dict", attn(config={"topk": 0.1}), TypeError, r"^config must be a SpargeConfig", BOTH),
    Row("predict: q rank 3", predict(q=_t(2, 64, 32)), ValueError, r"^q must have rank 4", BOTH),
    Row("predict: k dtype", predict(k=_t(1, 2, 64, 32, dtype=torch.float16)), TypeError, r"^k has dtype", BOTH),
    Row("predict: Hq % Hkv", predict(k=_t(1, 3, 64, 32)), ValueError, r"Hq % Hkv", BOTH),
    Row("predict: head dim 36", predict(q=_t(1, 2, 64, 36), k=_t(1, 2, 64, 36)), ValueError, r"^head dim 36", BOTH),
    Row("predict: device", predict(k=_t(1, 2, 64, 32, device="meta")), ValueError, r"^k is on meta", BOTH),
    Row("predict: is_causal str", predict(is_causal="yes"), TypeError, r"^is_causal must be", BOTH),
    Row("predict: scale inf", predict(scale=float("inf")), ValueError, r"^scale must be", BOTH),
    Row("predict: config str", predict(config="fast"), TypeError, r"^config must be a SpargeConfig", BOTH),
    # ---- a key-padding mask that does not fit q/k
    Row("kv_keep not bool", attn(kv_keep=torch.ones(1, 64, dtype=torch.long)), TypeError, r"^kv_keep must be", BOTH),
    Row("kv_keep shape", attn(kv_keep=torch.ones(1, 63, dtype=torch.bool)), ValueError, r"^kv_keep has shape", BOTH),
    Row("kv_keep device", attn(kv_keep=torch.ones(1, 64, dtype=torch.bool, device="meta")), ValueError,
        r"^kv_keep is on meta", BOTH),
    Row("predict kv_keep shape", predict(kv_keep=torch.ones(2, 64, dtype=torch.bool)), ValueError,
        r"^kv_keep has shape", BOTH),
    # ---- a block_mask that does not fit q/k
    Row("mask not a SpargeBlockMask", attn(block_mask=torch.ones(1, 2, 4, 4, dtype=torch.bool)), TypeError,
        r"^block_mask must be a SpargeBlockMask", BOTH),
    Row("mask fewer heads", with_mask(lambda n, i: mask(n[:, :1], i[:, :1])), ValueError,
        r"block_mask.kv_num_blocks has shape \(1, 1, 4\); q/k need \(1, 2, 4\)", BOTH),
    Row("mask fewer batches", with_mask(lambda n, i: mask(n[:0], i[:0])), ValueError,
        r"block_mask.kv_num_blocks has shape", BOTH),
    Row("mask wrong nk", with_mask(lambda n, i: mask(n, i[..., :-1])), ValueError,
        r"block_mask.kv_indices has shape \(1, 2, 4, 3\); q/k need \(1, 2, 4, 4\)", BOTH),
    Row("mask wrong q_len", with_mask(lambda n, i: mask(n, i, q_len=60)), ValueError,
        r"block_mask was built for q_len=60", BOTH),
    Row("mask wrong kv_len", with_mask(lambda n, i: mask(n, i, kv_len=128)), ValueError,
        r"block_mask was built for .*kv_len=128", BOTH),
    Row("mask block_q other than the indices", with_mask(lambda n, i: mask(n, i, block_q=32)), ValueError,
        r"block_mask.kv_num_blocks has shape", BOTH),
    Row("mask block_q 0", with_mask(lambda n, i: mask(n, i, block_q=0)), ValueError,
        r"block_mask.block_q must be", BOTH),
    Row("mask block_k float", with_mask(lambda n, i: mask(n, i, block_k=16.0)), ValueError,
        r"block_mask.block_k must be", BOTH),
    Row("mask block_q 24 (not a power of two)",
        with_mask(lambda n, i: mask(n[:, :, :3], i[:, :, :3], block_q=24)), ValueError,
        r"block_mask.block_q must be a power of two", BOTH),
    Row("mask block_k 8 (below 16)",
        with_mask(lambda n, i: mask(n, torch.arange(8, dtype=torch.int32).expand(1, 2, 4, 8).contiguous(),
                                    block_k=8)), ValueError, r"block_mask.block_k must be a power of two", BOTH),
    Row("mask int64", with_mask(lambda n, i: mask(n.long(), i.long())), TypeError,
        r"block_mask.kv_num_blocks must be int32", BOTH),
    Row("mask indices int64", with_mask(lambda n, i: mask(n, i.long())), TypeError,
        r"block_mask.kv_indices must be int32", BOTH),
    Row("mask not tensors", with_mask(lambda n, i: mask(n.tolist(), i)), TypeError,
        r"block_mask.kv_num_blocks must be a tensor", BOTH),
    Row("mask on another device", with_mask(lambda n, i: mask(n.to("meta"), i.to("meta"))), ValueError,
        r"block_mask.kv_num_blocks is on meta", BOTH),
    Row("mask kv_num > nk", with_mask(lambda n, i: mask(torch.full_like(n, 7), i)), ValueError,
        r"block_mask.kv_num_blocks must lie in \[0, 4\]", BOTH),
    Row("mask kv_num < 0", with_mask(lambda n, i: mask(torch.full_like(n, -1), i)), ValueError,
        r"block_mask.kv_num_blocks must lie in \[0, 4\]", BOTH),
    Row("mask index out of range", with_mask(lambda n, i: mask(n, i + 100)), ValueError,
        r"block_mask.kv_indices: a used entry .* outside \[0, 4\)", BOTH),
    Row("mask negative index", with_mask(lambda n, i: mask(n, i - 100)), ValueError,
        r"block_mask.kv_indices: a used entry .* outside", BOTH),
    Row("mask repeated index", with_mask(lambda n, i: mask(n.clamp(min=2), torch.zeros_like(i))), ValueError,
        r"block_mask.kv_indices: a row names the same key block twice", BOTH),
    # ---- SpargeConfig
    Row("topk > 1", lambda: sc.SpargeConfig(topk=1.5), ValueError, r"SpargeConfig.topk must be in \[0, 1\]"),
    Row("topk < 0", lambda: sc.SpargeConfig(topk=-0.1), ValueError, r"SpargeConfig.topk must be in \[0, 1\]"),
    Row("topk nan", lambda: sc.SpargeConfig(topk=float("nan")), ValueError, r"SpargeConfig.topk must be in"),
    Row("topk str", lambda: sc.SpargeConfig(topk="0.1"), TypeError, r"SpargeConfig.topk must be a float"),
    Row("topk bool", lambda: sc.SpargeConfig(topk=True), TypeError, r"SpargeConfig.topk must be a float"),
    Row("topp > 1", lambda: sc.SpargeConfig(topp=2), ValueError, r"SpargeConfig.topp must be in \[0, 1\]"),
    Row("topp < 0", lambda: sc.SpargeConfig(topp=-1e-3), ValueError, r"SpargeConfig.topp must be in \[0, 1\]"),
    Row("topp None", lambda: sc.SpargeConfig(topp=None), TypeError, r"SpargeConfig.topp must be a float"),
    Row("mode", lambda: sc.SpargeConfig(mode="fast"), ValueError, r"SpargeConfig.mode must be one of"),
    Row("block_q 24", lambda: sc.SpargeConfig(block_q=24), ValueError, r"SpargeConfig.block_q must be a power of two"),
    Row("block_q 512", lambda: sc.SpargeConfig(block_q=512), ValueError, r"SpargeConfig.block_q must be a power"),
    Row("block_k 8", lambda: sc.SpargeConfig(block_k=8), ValueError, r"SpargeConfig.block_k must be a power"),
    Row("block_k float", lambda: sc.SpargeConfig(block_k=64.0), TypeError, r"SpargeConfig.block_k must be an int"),
    Row("min_seq_len < 0", lambda: sc.SpargeConfig(min_seq_len=-1), ValueError, r"SpargeConfig.min_seq_len"),
    Row("min_seq_len float", lambda: sc.SpargeConfig(min_seq_len=1.5), ValueError, r"SpargeConfig.min_seq_len"),
    Row("replace unknown field", lambda: CFG.replace(topq=0.1), TypeError, r"unknown SpargeConfig field.*topq"),
    Row("replace topk > 1", lambda: CFG.replace(topk=3), ValueError, r"SpargeConfig.topk must be in"),
    # ---- the backend: sc.backend(...), torch.compile options, set_config
    Row("backend config dict", lambda: sc.backend(config={"topk": 0.1}), TypeError, r"config must be a SpargeConfig"),
    Row("backend inner", lambda: sc.backend(inner="tvm"), ValueError, r"inner must be one of"),
    Row("backend inner int", lambda: sc.backend(inner=5), ValueError, r"inner must be one of"),
    Row("backend record_masks str", lambda: sc.backend(record_masks="no"), TypeError, r"record_masks must be True"),
    Row("backend plan int", lambda: sc.backend(plan=5), TypeError, r"plan must be a SpargePlan"),
    Row("backend plan missing file", lambda: sc.backend(plan="no/such/plan.json"), FileNotFoundError,
        r"no/such/plan.json"),
    Row("set_config block_q", set_config(block_q=32), ValueError, r"\['block_q'\] cannot change at run time"),
    Row("set_config topk > 1", set_config(topk=5.0), ValueError, r"SpargeConfig.topk must be in"),
    Row("option unknown", compiled(topq=0.1), ValueError, r"unknown option\(s\) \['topq'\]", BOTH),
    Row("option topk > 1", compiled(topk=1.5), ValueError, r"SpargeConfig.topk must be in", BOTH),
    Row("option block_q", compiled(block_q=20), ValueError, r"SpargeConfig.block_q must be a power", BOTH),
    Row("option inner", compiled(inner="tvm"), ValueError, r"inner must be one of", BOTH),
    Row("option inductor int", compiled(inductor=5), TypeError, r"option 'inductor' must be a dict", BOTH),
    Row("option record_masks str", compiled(record_masks="no"), TypeError, r"'record_masks' must be True or", BOTH),
    Row("option plan int", compiled(plan=5), TypeError, r"plan must be a SpargePlan", BOTH),
    # ---- calibrate() arguments
    Row("calibrate model", calibrate(model=5), TypeError, r"model must be an nn.Module"),
    Row("calibrate inputs a module", calibrate(inputs=nn.Linear(2, 2)), sc.CalibrationError, r"\binputs must be"),
    Row("calibrate inputs an int", calibrate(inputs=5), sc.CalibrationError, r"\binputs must be"),
    Row("calibrate no batches", calibrate(inputs=[]), sc.CalibrationError, r"no input batches"),
    Row("calibrate config", calibrate(config={"topk": 0.1}), TypeError, r"config must be a SpargeConfig"),
    Row("calibrate both objectives", calibrate(max_error=0.1), ValueError, r"exactly one of .*target_sparsity and "
        r".*max_error"),
    Row("calibrate no objective", calibrate(target_sparsity=None), ValueError, r"exactly one of .*target_sparsity"),
    Row("calibrate target_sparsity str", calibrate(target_sparsity="high"), TypeError, r"target_sparsity"),
    Row("calibrate target_sparsity bool", calibrate(target_sparsity=True), TypeError, r"target_sparsity"),
    Row("calibrate target_sparsity 1.5", calibrate(target_sparsity=1.5), ValueError, r"target_sparsity must be in"),
    Row("calibrate inputs one tensor", calibrate(inputs=_t(1, 64, 64)), sc.CalibrationError,
        r"\binputs must be .*wrap a single batch"),
    Row("calibrate target_sparsity 1", calibrate(target_sparsity=1.0), ValueError, r"target_sparsity must be in"),
    Row("calibrate max_error str", calibrate(target_sparsity=None, max_error="x"), TypeError, r"max_error"),
    Row("calibrate max_error bool", calibrate(target_sparsity=None, max_error=True), TypeError, r"max_error"),
    Row("calibrate max_error nan", calibrate(target_sparsity=None, max_error=float("nan")), ValueError,
        r"max_error must be"),
    Row("calibrate max_error 0", calibrate(target_sparsity=None, max_error=0), ValueError, r"max_error must be"),
    Row("calibrate batches -1", calibrate(batches=-1), ValueError, r"batches must be >= 1"),
    Row("calibrate batches float", calibrate(batches=1.5), TypeError, r"batches"),
    Row("calibrate batches bool", calibrate(batches=True), TypeError, r"batches"),
    Row("calibrate sample_blocks -2", calibrate(sample_blocks=-2), ValueError, r"sample_blocks must be >= 0"),
    Row("calibrate max_rounds -1", calibrate(max_rounds=-1), ValueError, r"max_rounds must be >= 0"),
    Row("calibrate max_rounds float", calibrate(max_rounds=2.0), TypeError, r"max_rounds"),
    Row("calibrate per_site str", calibrate(per_site="no"), TypeError, r"per_site"),
    Row("calibrate verbose str", calibrate(verbose="yes"), TypeError, r"verbose"),
    Row("calibrate inner int", calibrate(inner=5), TypeError, r"inner"),
    Row("calibrate inner name", calibrate(inner="tvm"), ValueError, r"inner must be one of"),
    Row("calibrate topks None item", calibrate(topks=[0.1, None]), TypeError, r"topks"),
    Row("calibrate topks > 1", calibrate(topks=[0.1, 2.0]), ValueError, r"topks"),
    Row("calibrate topks empty", calibrate(topks=[]), ValueError, r"topks must not be empty"),
    Row("calibrate topps str", calibrate(topps="abc"), TypeError, r"topps"),
    # ---- distill() arguments
    Row("distill model", distill(model=5), TypeError, r"\bmodel must be a torch.nn.Module"),
    Row("distill inputs a module", distill(inputs=nn.Linear(2, 2)), TypeError, r"\binputs must be"),
    Row("distill inputs an int", distill(inputs=5), TypeError, r"\binputs must be"),
    Row("distill steps < 0", distill(steps=-1), ValueError, r"\bsteps must be"),
    Row("distill steps float", distill(steps=2.5), TypeError, r"\bsteps must be"),
    Row("distill steps bool", distill(steps=True), TypeError, r"\bsteps must be"),
    Row("distill grad_accum 0", distill(grad_accum=0), ValueError, r"\bgrad_accum must be"),
    Row("distill grad_accum str", distill(grad_accum="2"), TypeError, r"\bgrad_accum must be"),
    Row("distill grad_accum float", distill(grad_accum=1.5), TypeError, r"\bgrad_accum must be"),
    Row("distill checkpoint_every 0", distill(checkpoint_every=0), ValueError, r"checkpoint_every"),
    Row("distill log_every str", distill(log_every="10"), TypeError, r"log_every"),
    Row("distill lr str", distill(lr="1e-5"), TypeError, r"\blr must be"),
    Row("distill lr < 0", distill(lr=-1.0), ValueError, r"\blr must be"),
    Row("distill max_grad_norm str", distill(max_grad_norm="1"), TypeError, r"\bmax_grad_norm must be"),
    Row("distill max_grad_norm 0", distill(max_grad_norm=0.0), ValueError, r"\bmax_grad_norm must be"),
    Row("distill amp_dtype str", distill(amp_dtype="bf16"), TypeError, r"\bamp_dtype must be"),
    Row("distill seed str", distill(seed="0"), TypeError, r"\bseed must be"),
    Row("distill on_interrupt", distill(on_interrupt="ignore"), ValueError, r"\bon_interrupt must be"),
    Row("distill config", distill(config={"topk": 0.1}), TypeError, r"\bconfig must be a SpargeConfig"),
    Row("distill loss name", distill(loss="huber"), ValueError, r"\bloss must be"),
    Row("distill loss int", distill(loss=5), ValueError, r"\bloss must be"),
    Row("distill optimizer factory", distill(optimizer=lambda params: 5), TypeError,
        r"^optimizer factory must return"),
    Row("distill backend_inner", distill(backend_inner="tvm"), ValueError, r"inner must be one of"),
    Row("distill trainable int", distill(trainable=5), TypeError, r"\btrainable must be"),
    Row("distill optimizer int", distill(optimizer=5), TypeError, r"\boptimizer must be"),
    Row("distill teacher int", distill(teacher=5), TypeError, r"\bteacher must be"),
    Row("distill checkpoint_dir int", distill(checkpoint_dir=5), TypeError, r"\bcheckpoint_dir must be"),
    Row("distill callback int", distill(callback=5), TypeError, r"\bcallback must be"),
    Row("distill compile_fn int", distill(compile_fn=5), TypeError, r"\bcompile_fn must be"),
    *[Row(f"distill {flag} str", distill(**{flag: "no"}), TypeError, rf"\b{flag} must be True or False")
      for flag in ("resume", "progress", "inplace", "train_mode", "check_rewrite")],
    # ---- SpargePlan.load of bad files
    Row("plan missing file", needs_tmp(lambda tmp_path: sc.SpargePlan.load(tmp_path / "none.json")), FileNotFoundError,
        r"none.json"),
    Row("plan empty file", load(text=""), PlanFormatError, r"plan.json: not a sparge plan \(invalid JSON"),
    Row("plan truncated JSON", load(text='{"format": "sparge-plan", '), PlanFormatError, r"plan.json: .*invalid JSON"),
    Row("plan binary file", load(raw=b"\x80\x81\xfe\xff"), PlanFormatError, r"plan.json: not a sparge plan \(not a text"),
    Row("plan a list", load(text="[1, 2]"), PlanFormatError, r"plan.json: not a sparge plan \(expected format"),
    Row("plan other format", load(lambda d: d.__setitem__("format", "x")), PlanFormatError, r"plan.json: not a sparge"),
    Row("plan other version", load(lambda d: d.__setitem__("version", 99)), PlanFormatError, r"plan.json: .*version 99"),
    Row("plan without config", load(_drop("config")), PlanFormatError, r"plan.json: field 'config' is missing"),
    Row("plan config a list", load(lambda d: d.__setitem__("config", [1])), PlanFormatError,
        r"plan.json: field 'config' must be an object"),
    Row("plan config block_q str", load(lambda d: d["config"].__setitem__("block_q", "16")), PlanFormatError,
        r"plan.json: field 'config'.*block_q"),
    Row("plan config unknown field", load(lambda d: d["config"].__setitem__("topq", 0.1)), PlanFormatError,
        r"plan.json: field 'config'.*topq"),
    Row("plan sites a list", load(lambda d: d.__setitem__("sites", [])), PlanFormatError,
        r"plan.json: field 'sites' must be an object"),
    Row("plan strict str", load(lambda d: d.__setitem__("strict", "yes")), PlanFormatError, r"plan.json: field 'strict'"),
    Row("plan site not an object", load(lambda d: d["sites"].__setitem__("s#0", 5)), PlanFormatError,
        r"plan.json: site 's#0' must be an object"),
    Row("plan site topk 5", load(_site("topk", 5.0)), PlanFormatError, r"plan.json: site 's#0': field 'topk'.*\[0, 1\]"),
    Row("plan site topp < 0", load(_site("topp", -0.5)), PlanFormatError, r"site 's#0': field 'topp'.*\[0, 1\]"),
    Row("plan site topk str", load(_site("topk", "0.1")), PlanFormatError, r"site 's#0': field 'topk'.*number"),
    Row("plan site topk alone", load(_site("topp", None)), PlanFormatError, r"site 's#0': field 'topp'.*together"),
    Row("plan site dense str", load(_site("dense", "yes")), PlanFormatError, r"site 's#0': field 'dense'.*bool"),
    Row("plan site kind int", load(_site("kind", 3)), PlanFormatError, r"site 's#0': field 'kind'.*string"),
    Row("plan site shapes str", load(_site("shapes", "2x64x32")), PlanFormatError, r"site 's#0': field 'shapes'.*list"),
    Row("plan site shapes float", load(_site("shapes", [{"q": [2, 64.5, 32], "k": [2, 64, 32]}])), PlanFormatError,
        r"site 's#0': field 'shapes'.*int"),
    Row("plan site shapes negative", load(_site("shapes", [{"q": [2, -1, 32], "k": [2, 64, 32]}])), PlanFormatError,
        r"site 's#0': field 'shapes'"),
    Row("plan site measured_error list", load(_site("measured_error", [1])), PlanFormatError,
        r"site 's#0': field 'measured_error'.*number"),
]


def _params():
    for row in ROWS:
        for path in row.paths:
            suffix = {"-": "", "1": " [interpreter]", "0": " [torch path]"}[path]
            yield pytest.param(row, path, id=row.id + suffix)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = collections.Counter()
    for name in ("predict_mask", "attention_fwd", "attention_bwd"):
        def refuse(*args, _name=name):
            calls[_name] += 1
            raise AssertionError(f"kernel {_name} ran before the argument check")
        monkeypatch.setattr(kernels, name, refuse)
    return calls


def _carried(exc, typ, pattern):
    """The exception of type ``typ`` matching ``pattern`` in ``exc``'s chain (Dynamo wraps backend
    errors), or None."""
    import re

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, typ) and re.search(pattern, str(exc)):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def test_table_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row, path", list(_params()))
def test_bad_input_raises_naming_the_argument(row, path, kernel_calls, monkeypatch, tmp_path):
    if path != "-":
        monkeypatch.setenv("TRITON_INTERPRET", path)
    call = (lambda: row.call(tmp_path)) if getattr(row.call, "needs_tmp", False) else row.call
    with pytest.raises(Exception) as info:
        call()
    err = _carried(info.value, row.exc, row.match)
    assert err is not None, f"expected {row.exc.__name__} matching {row.match!r}, got {info.value!r}"
    assert not kernel_calls, f"a kernel ran: {dict(kernel_calls)}"
