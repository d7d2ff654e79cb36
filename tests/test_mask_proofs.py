"""Masks built in the graph: proved causal (or all true) from their construction and rewritten;
anything else kept dense with the reason. Outputs equal eager at dense settings, and eager with
the same block masks at sparse settings; attention calls counted independently of the report."""
import pytest
import torch
import torch.nn.functional as F
from _backend_util import allow_broken_torchvision, masks_of, rel_err, run_same_masks

import sparge_compile as sc

pytestmark = pytest.mark.usefixtures("one_thread")
DENSE = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=16, block_k=16, min_seq_len=0)
SPARSE = DENSE.replace(topk=0.3)


def _pos(q, k):
    return torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]


def le_arange(q, k, v):
    i, j = _pos(q, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i)


def lt_shifted_unsqueeze(q, k, v):
    n = q.shape[-2]
    m = torch.arange(n).unsqueeze(0) < torch.arange(n).unsqueeze(1) + 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def ge_with_ones_and_window_wider_than_the_sequence(q, k, v):
    i, j = _pos(q, k)
    m = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool) & (i >= j) & (j > i - 4096)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def eager_additive(q, k, v):
    i, j = _pos(q, k)
    bias = torch.where(j <= i, 0.0, torch.finfo(q.dtype).min)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


def sliding_window(q, k, v):
    i, j = _pos(q, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 8))


def anti_causal(q, k, v):
    i, j = _pos(q, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j >= i)


def shifted_causal(q, k, v):
    i, j = _pos(q, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + 3)


def mask_from_data(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


PROVED = [le_arange, lt_shifted_unsqueeze, ge_with_ones_and_window_wider_than_the_sequence, eager_additive]


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 64, 32, generator=g, requires_grad=True) for _ in range(3)]


def _run(fn, cfg, *extra):
    torch._dynamo.reset()
    be = sc.backend(config=cfg, inner="aot_eager")
    q, k, v = _qkv()
    out = torch.compile(fn, backend=be)(q, k, v, *extra)
    return be, (q, k, v), out


@pytest.mark.parametrize("fn", PROVED, ids=lambda f: f.__name__)
def test_proved_causal_mask_is_rewritten_and_exact(fn):
    be, (q, k, v), out = _run(fn, DENSE)
    site, = be.report().sites
    assert site.rewritten and site.is_causal and "proved" in site.reason, site.reason
    assert rel_err(out, fn(q, k, v)) < 1e-5


@pytest.mark.parametrize("fn", PROVED, ids=lambda f: f.__name__)
def test_proved_causal_mask_sparse_equals_eager_with_the_same_masks(fn):
    be, (q, k, v), out = _run(fn, SPARSE)
    assert be.report().rewritten[0].sparsity > 0
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = run_same_masks(fn, masks_of(be), q, k, v)   # the model's own code, the same block masks
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for g, t in zip(grads, (q, k, v)):
        assert rel_err(g, t.grad) < 1e-4


@pytest.mark.parametrize("fn,why", [(sliding_window, "sliding window"), (anti_causal, "anti-causal"),
                                    (shifted_causal, "offset")], ids=["window", "anti", "shifted"])
def test_unproved_masks_stay_dense_with_the_reason(fn, why):
    be, (q, k, v), out = _run(fn, SPARSE)
    site, = be.report().sites
    assert not site.rewritten and why in site.reason, site.reason
    assert torch.equal(out, fn(q, k, v))


def test_mask_given_as_data_stays_dense():
    m = torch.rand(64, 64) < 0.5
    m[:, 0] = True
    be, (q, k, v), out = _run(mask_from_data, SPARSE, m)
    site, = be.report().sites
    assert not site.rewritten and "input" in site.reason
    assert torch.equal(out, mask_from_data(q, k, v, m))


def _hf(name, impl):
    allow_broken_torchvision()
    tr = pytest.importorskip("transformers")
    if name == "gpt2":
        cfg = tr.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=256)
        model_cls = tr.GPT2Model
    else:
        cfg_cls, model_cls = {"llama": (tr.LlamaConfig, tr.LlamaModel), "qwen2": (tr.Qwen2Config,
                                                                                  tr.Qwen2Model),
                              "mistral": (tr.MistralConfig, tr.MistralModel)}[name]
        cfg = cfg_cls(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
def test_hf_decoder_causal_sites_rewritten(name, impl):
    """Decoders (Llama/Qwen2/Mistral with GQA, GPT2): transformers builds the causal mask in the
    graph; every site is rewritten and the output at dense settings equals eager."""
    model = _hf(name, impl)
    ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids, use_cache=False).last_hidden_state
        ref = model(ids, use_cache=False).last_hidden_state
    rep = be.report()
    assert len(rep.rewritten) == 2 and not rep.dense, str(rep)
    assert all(s.is_causal for s in rep.rewritten)
    assert rel_err(out, ref) < 1e-5


def _encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_transformer_encoder_is_causal_beside_a_mask_is_honoured():
    enc, x = _encoder(), torch.randn(2, 64, 64, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(64)
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    out = torch.compile(enc, backend=be)(x, mask=mask, is_causal=True)
    rep = be.report()
    assert len(rep.rewritten) == 2 and all(s.is_causal for s in rep.rewritten), str(rep)
    w = torch.randn(out.shape)   # a random projection (the layer norm makes |out|^2 nearly constant)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    ref = enc(x, mask=mask, is_causal=True)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert rel_err(out, ref) < 1e-5 and rel_err(g, g_ref) < 1e-4


def test_encoder_fast_path_is_reported_and_can_be_turned_off(monkeypatch):
    enc, x = _encoder().eval(), torch.randn(2, 64, 64)
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    with torch.no_grad():
        torch.compile(enc, backend=be)(x)
    rep = be.report()
    assert len(rep.dense) == 2 and all("fast path" in s.reason for s in rep.dense), str(rep)
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(enc, backend=be)(x)
        ref = enc(x)
    assert len(be.report().rewritten) == 2 and rel_err(out, ref) < 1e-5


def _padded_ids(n=128):
    ids = torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 77:] = 0   # right padding: whole key blocks of padding and a partly padded one
    return ids, mask


def _check_padded(model, be, ids, mask, **kw):
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids, attention_mask=mask, **kw).last_hidden_state
        ref = model(ids, attention_mask=mask, **kw).last_hidden_state
    rep = be.report()
    assert len(rep.rewritten) == 2 and not rep.dense, str(rep)
    assert all("key-padding" in s.reason for s in rep.rewritten)
    return out, ref


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_hf_padding_mask_runs_sparse_and_exact(name, impl):
    """A tokenizer's attention_mask: key blocks of padding are dropped, the rest masked in the kernels."""
    model = _hf(name, impl)
    ids, mask = _padded_ids()
    torch._dynamo.reset()
    out, ref = _check_padded(model, sc.backend(config=DENSE, inner="aot_eager"), ids, mask, use_cache=False)
    assert rel_err(out, ref) < 1e-5
    torch._dynamo.reset()
    be = sc.backend(config=SPARSE, inner="aot_eager")
    out, _ = _check_padded(model, be, ids, mask, use_cache=False)
    with torch.no_grad():
        same = run_same_masks(lambda i: model(i, attention_mask=mask, use_cache=False).last_hidden_state,
                              masks_of(be), ids)
    assert rel_err(out, same) < 1e-5


def test_bert_with_a_padding_mask_is_rewritten_and_gradients_match():
    allow_broken_torchvision()
    tr = pytest.importorskip("transformers")
    cfg = tr.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tr.BertModel(cfg)
    ids, mask = _padded_ids()
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    out = torch.compile(model, backend=be)(ids, attention_mask=mask).last_hidden_state
    rep = be.report()
    assert len(rep.rewritten) == 2 and not rep.dense and not any(s.is_causal for s in rep.rewritten), str(rep)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * w).sum(), list(model.parameters()), allow_unused=True)
    ref = model(ids, attention_mask=mask).last_hidden_state
    ref_grads = torch.autograd.grad((ref * w).sum(), list(model.parameters()), allow_unused=True)
    assert rel_err(out, ref) < 1e-5
    top = max(r.abs().max() for r in ref_grads if r is not None)   # (the key bias's is ~0 analytically)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert (g - r).abs().max() <= 1e-4 * max(r.abs().max(), 1e-2 * top)
