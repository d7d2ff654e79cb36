"""The sparge backend on hand-written attention: every spelling rewritten, outputs and gradients
equal to the eager code with the same block mask; non-attention and non-plain attention kept dense
and bit-identical to eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _backend_util import CFG, compile_sparge, masks_of, rel_err, run_same_masks

B, H, N, D = 1, 2, 64, 32
SCALE = 1.0 / math.sqrt(D)


def _qkv(h=H, hkv=H, n=N, nk=None, d=D, layout="bhnd", seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    shapes = {"bhnd": [(B, h, n, d), (B, hkv, nk, d), (B, hkv, nk, d)],
              "bnhd": [(B, n, h, d), (B, nk, hkv, d), (B, nk, hkv, d)],
              "bnc": [(B, n, h * d), (B, nk, hkv * d), (B, nk, hkv * d)],
              "3d": [(B * h, n, d), (B * hkv, nk, d), (B * hkv, nk, d)]}[layout]
    return [torch.randn(*s, generator=g).requires_grad_(True) for s in shapes]


# ----------------------------------------------------------------------------- spellings
def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.3)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def at_transpose_mul(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def matmul_mT_div_sqrt(q, k, v):
    return torch.matmul(F.softmax(torch.matmul(q, k.mT) / math.sqrt(q.shape[-1]), dim=-1), v)


def pow_scale_method_softmax_posdim(q, k, v):
    s = (q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return s.softmax(dim=3) @ v


class TimmStyle(nn.Module):  # pre-scaled q, Tensor.softmax, eval-mode nn.Dropout
    def __init__(self):
        super().__init__()
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        q = q * SCALE
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v


class NnSoftmaxPermute(nn.Module):  # nn.Softmax module, k transposed by permute
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return torch.matmul(self.sm(torch.matmul(q, k.permute(0, 1, 3, 2)) * SCALE), v)


def einsum_bhnd(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_bnhd(q, k, v):  # heads on axis 2: the einsums permute
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def einsum_ellipsis(q, k, v):
    s = torch.einsum("...qd,...kd->...qk", q, k) * SCALE
    return torch.einsum("...qk,...kd->...qd", s.softmax(-1), v)


def bmm_3d(q, k, v):
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * SCALE, dim=2), v)


def baddbmm_3d(q, k, v):  # diffusers' legacy processor: beta=0, alpha=scale
    empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
    s = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=SCALE)
    return torch.bmm(s.softmax(dim=-1), v)


def fp32_upcast_cast_back(q, k, v):
    s = (q @ k.transpose(-1, -2)) * SCALE
    return F.softmax(s.float(), dim=-1).to(q.dtype) @ v


def softmax_dtype_type_as(q, k, v):
    s = (q @ k.transpose(-1, -2)) * SCALE
    return F.softmax(s, dim=-1, dtype=torch.float32).type_as(v) @ v


def dropout_eval_functional(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1)
    return F.dropout(p, 0.1, training=False) @ v


def k_pretransposed_by_permute(q, k, v):  # k (B, N, H, D) -> (B, H, D, N) in one permute
    kt = k.permute(0, 2, 3, 1)
    return torch.softmax(q.transpose(1, 2) @ kt * SCALE, dim=-1) @ v.transpose(1, 2)


class HeadsSplitViewPermute(nn.Module):  # (B, N, C) in, heads split with view/permute, merged back
    def forward(self, q, k, v):
        def split(x):
            return x.view(x.shape[0], x.shape[1], H, -1).permute(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        o = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v
        return o.transpose(1, 2).reshape(o.shape[0], -1, H * D)


def einops_rearrange_sdpa(q, k, v):
    from einops import rearrange

    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=H) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


class TwoLayers(nn.Module):  # the second attention reads the first one's output
    def forward(self, q, k, v):
        o = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v
        return F.scaled_dot_product_attention(o, k, v)


class MHA(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(H * D, H, batch_first=True).eval()
        self.need_weights = need_weights

    def forward(self, q, k, v):
        return self.mha(q, k, v, need_weights=self.need_weights)[0]


CASES = [  # name, model, inputs, sites
    ("sdpa", sdpa, {}, 1),
    ("sdpa_causal", sdpa_causal, {}, 1),
    ("sdpa_scale", sdpa_scale, {}, 1),
    ("sdpa_gqa", sdpa_gqa, dict(h=4, hkv=2), 1),
    ("sdpa_cross_attention", sdpa, dict(nk=96), 1),
    ("sdpa_head_dim_72", sdpa, dict(d=72), 1),  # padded in the kernels to a 128-wide tile
    ("sdpa_head_dim_40", sdpa, dict(d=40), 1),
    ("at_transpose_mul", at_transpose_mul, {}, 1),
    ("matmul_mT_div_sqrt", matmul_mT_div_sqrt, {}, 1),
    ("pow_scale_method_softmax_posdim", pow_scale_method_softmax_posdim, {}, 1),
    ("timm_style_prescaled_q", TimmStyle().eval(), {}, 1),
    ("nn_softmax_permute", NnSoftmaxPermute(), {}, 1),
    ("einsum_bhnd", einsum_bhnd, {}, 1),
    ("einsum_bnhd", einsum_bnhd, dict(layout="bnhd"), 1),
    ("einsum_ellipsis", einsum_ellipsis, {}, 1),
    ("bmm_3d", bmm_3d, dict(layout="3d"), 1),
    ("baddbmm_3d", baddbmm_3d, dict(layout="3d"), 1),
    ("fp32_upcast_cast_back", fp32_upcast_cast_back, {}, 1),
    ("softmax_dtype_type_as", softmax_dtype_type_as, {}, 1),
    ("dropout_eval_functional", dropout_eval_functional, {}, 1),
    ("k_pretransposed_by_permute", k_pretransposed_by_permute, dict(layout="bnhd"), 1),
    ("heads_split_view_permute", HeadsSplitViewPermute(), dict(layout="bnc"), 1),
    ("einops_rearrange_sdpa", einops_rearrange_sdpa, dict(layout="bnc"), 1),
    ("two_layers", TwoLayers(), {}, 2),
    ("mha_eval", MHA(need_weights=False), dict(layout="bnc"), 1),
    ("mha_eval_weights_unused", MHA(need_weights=True), dict(layout="bnc"), 1),
]


@pytest.mark.parametrize("name,model,inputs,n_sites", CASES, ids=[c[0] for c in CASES])
def test_spelling_rewritten(name, model, inputs, n_sites):
    torch._dynamo.reset()
    q, k, v = _qkv(**inputs)
    compiled, be = compile_sparge(model)
    out = compiled(q, k, v)
    rep = be.report()
    assert len(rep.rewritten) == n_sites and not rep.dense, str(rep)
    assert all(s.sparsity is not None for s in rep.rewritten)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = run_same_masks(model, masks_of(be), q, k, v)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-4
    for name_, g, t in zip("qkv", grads, (q, k, v)):
        assert rel_err(g, t.grad) < 1e-4, name_


# ----------------------------------------------------------------------------- negatives
def additive_bias(q, k, v):
    bias = torch.arange(k.shape[-2], dtype=q.dtype) * 0.01
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE + bias, dim=-1) @ v


def softmax_other_axis(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-2) @ v


def probs_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return p @ v, p


def probs_used_elsewhere(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return p @ v + p.amax(-1, keepdim=True)


def scores_used_elsewhere(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    return torch.softmax(s, dim=-1) @ v + s.mean()


def hand_causal_masked_fill(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    m = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1) @ v


def sdpa_attn_mask(q, k, v):
    m = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def not_attention_matmul_chain(q, k, v):  # softmax(x W1) W2: a softmax between matmuls, not attention
    w1 = torch.linspace(-1, 1, D * 48).reshape(D, 48)
    w2 = torch.linspace(-1, 1, 48 * D).reshape(48, D)
    return torch.softmax(q @ w1, dim=-1) @ w2 + (q @ k.transpose(-2, -1)) @ v


def head_dim_44(q, k, v):  # not a multiple of 8
    return F.scaled_dot_product_attention(q[..., :44], k[..., :44], v[..., :44])


NEGATIVES = [  # name, fn, inputs, reason fragment (None: no site reported at all)
    ("additive_bias", additive_bias, {}, "before the softmax"),
    ("softmax_other_axis", softmax_other_axis, {}, "not the key axis"),
    ("probs_returned", probs_returned, {}, "used elsewhere"),
    ("probs_used_elsewhere", probs_used_elsewhere, {}, "used elsewhere"),
    ("scores_used_elsewhere", scores_used_elsewhere, {}, "another user"),
    ("hand_causal_masked_fill", hand_causal_masked_fill, {}, "before the softmax"),
    ("sdpa_attn_mask", sdpa_attn_mask, {}, "attn_mask"),
    ("not_attention_matmul_chain", not_attention_matmul_chain, {}, None),
    ("head_dim_44", head_dim_44, dict(d=64), "head dim 44"),
]


@pytest.mark.parametrize("name,fn,inputs,reason", NEGATIVES, ids=[c[0] for c in NEGATIVES])
def test_negative_kept_dense(name, fn, inputs, reason):
    torch._dynamo.reset()
    q, k, v = _qkv(**inputs)
    compiled, be = compile_sparge(fn)
    out = compiled(q, k, v)
    ref = fn(q, k, v)
    rep = be.report()
    assert not rep.rewritten, str(rep)
    if reason is None:
        assert not rep.sites, str(rep)
    else:
        assert rep.dense and reason in rep.dense[0].reason, str(rep)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_short_sequence_kept_dense():
    torch._dynamo.reset()
    q, k, v = _qkv()
    compiled, be = compile_sparge(sdpa, config=CFG.replace(min_seq_len=128))
    torch.testing.assert_close(compiled(q, k, v), sdpa(q, k, v), rtol=0, atol=0)
    (site,) = be.report().sites
    assert not site.rewritten and site.reason.startswith("short")
