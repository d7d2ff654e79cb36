"""Helpers for the backend tests: compile with sparge, and the eager model with the same masks.

:class:`SameMasks` runs a model eagerly with every softmax / SDPA call seeing the block mask the
compiled model used at the same site (sites in execution order): scores outside the kept blocks
are set to -inf before the softmax, SDPA gets the equivalent boolean ``attn_mask``. That is the
eager model with the same mask applied, written with the model's own code.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import sparge_compile as sc
from bench.common import allow_broken_torchvision  # noqa: F401  (re-exported for the tests)
from sparge_compile.reference import dense_token_mask

CFG = sc.SpargeConfig(topk=0.3, topp=0.5, block_q=16, block_k=16, min_seq_len=0)

@contextlib.contextmanager
def pytorch_path():
    """For module-scoped fixtures (they run before conftest's function-scoped one): the op's
    PyTorch path (TRITON_INTERPRET=0) and a fresh Dynamo."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        torch._dynamo.reset()
        yield


class SameMasks:
    """Context: eager softmax / SDPA calls see ``masks`` (one SpargeBlockMask per site, in order).

    Patches ``torch.softmax``, ``F.softmax``, ``Tensor.softmax`` and
    ``F.scaled_dot_product_attention`` (also what ``nn.MultiheadAttention`` and ``nn.Softmax``
    call), and restores them on exit.
    """

    def __init__(self, masks):
        self.masks = list(masks)
        self.used = 0
        self._inside = False

    def _token_mask(self, nq, nk):
        m = self.masks[self.used]
        self.used += 1
        return dense_token_mask(m.to_dense(), nq, nk, m.block_q, m.block_k, m.is_causal)

    def _softmax(self, orig):
        def softmax(s, *args, **kwargs):
            if self._inside:  # F.softmax calls Tensor.softmax: mask once
                return orig(s, *args, **kwargs)
            tm = self._token_mask(s.shape[-2], s.shape[-1]).reshape(s.shape)
            self._inside = True
            try:
                return orig(s.masked_fill(~tm, float("-inf")), *args, **kwargs)
            finally:
                self._inside = False
        return softmax

    def _sdpa(self, orig):
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]

        def sdpa(*args, **kwargs):
            kw = dict(zip(names, args), **kwargs)
            q, k = kw["query"], kw["key"]
            tm = self._token_mask(q.shape[-2], k.shape[-2])
            tm = tm.reshape(q.shape[:-2] + tm.shape[-2:])
            own = kw.get("attn_mask")   # the model's own mask (e.g. padding) applies as well
            if own is not None:
                tm = tm & own if own.dtype == torch.bool else torch.where(tm, own, float("-inf"))
            kw["attn_mask"] = tm
            kw["is_causal"] = False
            return orig(**kw)
        return sdpa

    def __enter__(self):
        self._saved = [(torch, "softmax", torch.softmax), (F, "softmax", F.softmax),
                       (torch.Tensor, "softmax", torch.Tensor.softmax),
                       (F, "scaled_dot_product_attention", F.scaled_dot_product_attention)]
        for obj, name, orig in self._saved:
            setattr(obj, name, self._sdpa(orig) if "scaled" in name else self._softmax(orig))
        return self

    def __exit__(self, *exc):
        for obj, name, orig in self._saved:
            setattr(obj, name, orig)


class TinyAttention(nn.Module):
    """One SDPA site with a fused qkv projection (x: (1, 64, 64))."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(64, 192), nn.Linear(64, 64)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 64, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 64, 64))


def run_same_masks(model, masks, *args):
    with SameMasks(masks) as mode:
        out = model(*args)
    assert mode.used == len(mode.masks), \
        f"eager model made {mode.used} attention calls, compiled had {len(masks)}"
    return out


def compile_sparge(model, config=CFG, inner="aot_eager", **kw):
    be = sc.backend(config=config, inner=inner)
    return torch.compile(model, backend=be, **kw), be


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def masks_of(be):
    return [s.block_mask() for s in be.report().rewritten]


class SDPACalls(TorchFunctionMode):
    """Records the F.scaled_dot_product_attention calls of eager code (their head dims): an
    attention count independent of our report."""

    def __init__(self):
        super().__init__()
        self.head_dims = []

    @property
    def calls(self) -> int:
        return len(self.head_dims)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:   # diffusers passes query=... by keyword
            self.head_dims.append((args[0] if args else kwargs["query"]).shape[-1])
        return func(*args, **(kwargs or {}))


def tiny_vit(img_size: int):
    """timm's ViT at tiny widths: 2 blocks, 2 heads of 32, patches of 8."""
    allow_broken_torchvision()
    import pytest

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8,
                             embed_dim=64, depth=2, num_heads=2, num_classes=10)


def tiny_dit():
    """diffusers' DiTTransformer2DModel: 2 layers, 2 heads of 32, 16x16 latents (64 tokens), the
    class-label dropout (random in train()) off."""
    allow_broken_torchvision()
    import pytest

    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2,
                                  sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    for m in model.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model


def tiny_bert(max_positions: int):
    """transformers' BertModel (sdpa): 2 layers, 2 heads of 32, no dropout."""
    allow_broken_torchvision()
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=max_positions,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    return transformers.BertModel(cfg)
