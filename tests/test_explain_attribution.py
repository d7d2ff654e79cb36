"""sc.explain(model) lists exactly the sites the model runs, and the backend owns what it collects.

Attention calls are counted independently of our report: a TorchFunctionMode counts the
``scaled_dot_product_attention`` calls of one eager forward.
"""
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from _backend_util import SDPACalls, TinyAttention, allow_broken_torchvision

import sparge_compile as sc
from sparge_compile import site_ops

pytestmark = pytest.mark.usefixtures("one_thread")
OPTS = dict(topk=0.25, topp=0.0, block_q=16, block_k=16, min_seq_len=0, inner="aot_eager")


def eager_sdpa_calls(model, *args, **kwargs) -> int:
    with torch.no_grad(), SDPACalls() as mode:
        model(*args, **kwargs)
    return mode.calls


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_hf(kind):
    allow_broken_torchvision()
    transformers = pytest.importorskip("transformers")
    cls, cfg = {"llama": (transformers.LlamaModel, transformers.LlamaConfig),
                "qwen2": (transformers.Qwen2Model, transformers.Qwen2Config)}[kind]
    layers = {"llama": 2, "qwen2": 1}[kind]
    config = cfg(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


def test_explain_keeps_models_behind_a_shared_wrapper_apart():
    llama, qwen = _tiny_hf("llama"), _tiny_hf("qwen2")
    ids = torch.randint(0, 64, (1, 32))
    expected = {"llama": eager_sdpa_calls(llama, ids), "qwen2": eager_sdpa_calls(qwen, ids)}
    assert expected == {"llama": 2, "qwen2": 1}
    cl = torch.compile(llama, backend="sparge", options=OPTS)
    cq = torch.compile(qwen, backend="sparge", options=OPTS)
    with torch.no_grad():
        cl(ids)
        cq(ids)
    assert len(sc.explain(cl)) == expected["llama"]
    assert len(sc.explain(cq)) == expected["qwen2"]


def test_explain_of_a_module_compiled_directly():
    layer = nn.TransformerEncoderLayer(64, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 32, 64)
    compiled = torch.compile(layer, backend="sparge", options=OPTS)
    compiled(x)   # training mode: the decomposed path, one MultiheadAttention
    rep = sc.explain(compiled)
    assert len(rep) == 1 and rep.sites[0].calls == 1


def test_second_instance_reusing_the_cached_graph_is_reported():
    a, b = TinyAttention(), TinyAttention()
    x = torch.randn(1, 64, 64)
    ca = torch.compile(a, backend="sparge", options=OPTS)
    cb = torch.compile(b, backend="sparge", options=OPTS)
    ca(x)
    assert len(sc.explain(ca)) == 1 and len(sc.explain(cb)) == 0   # b has run nothing yet
    cb(x)
    rep = sc.explain(cb)
    assert len(rep) == 1 and rep.rewritten and rep.sites[0].sparsity is not None
    assert len(sc.explain(ca)) == 1


def test_explain_of_another_model_lists_nothing():
    a, other = TinyAttention(), TinyAttention()
    torch.compile(a, backend="sparge", options=OPTS)(torch.randn(1, 64, 64))
    assert len(sc.explain(other)) == 0


def test_recorded_masks_are_released_with_their_backend():
    be = sc.backend(config=sc.SpargeConfig(**{k: v for k, v in OPTS.items() if k != "inner"}),
                    inner="aot_eager")
    torch.compile(TinyAttention(), backend=be)(torch.randn(1, 64, 64))
    st = be.report().rewritten[0].state
    mask = weakref.ref(st.kv_indices)
    key = be.report().rewritten[0].key
    assert key in site_ops._SITES
    be.reset()
    del st
    gc.collect()
    assert mask() is None and key not in site_ops._SITES


def test_reset_backend_code_raises_a_clear_error():
    be = sc.backend(config=sc.SpargeConfig(**{k: v for k, v in OPTS.items() if k != "inner"}),
                    inner="aot_eager")
    f = torch.compile(TinyAttention(), backend=be)
    x = torch.randn(1, 64, 64)
    f(x)
    be.reset()
    gc.collect()
    with pytest.raises(RuntimeError, match="compile the model again"):
        f(x)
