"""diffusers models whose head dims are not powers of two run sparse: PixArt (72) and the SD
UNet's cross-attention blocks (40, 80). Sites are counted independently of our report (SDPA
calls of one eager forward); dense settings equal eager, sparse settings equal eager with the
same block masks, gradients equal eager."""
import pytest
import torch
from _backend_util import SDPACalls, allow_broken_torchvision, masks_of, rel_err, run_same_masks

import sparge_compile as sc

pytestmark = pytest.mark.usefixtures("one_thread")
DENSE = sc.SpargeConfig(topk=1.0, topp=0.0, block_q=16, block_k=16, min_seq_len=0)
SPARSE = DENSE.replace(topk=0.4)


def _pixart():
    allow_broken_torchvision()
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=144, sample_size=16, patch_size=2, caption_channels=32,
        norm_type="ada_norm_single", use_additional_conditions=False)
    g = torch.Generator().manual_seed(1)
    kw = dict(encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=torch.tensor([10]))
    return m, (torch.randn(1, 4, 16, 16, generator=g),), kw


def _unet():
    allow_broken_torchvision()
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(80, 160),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
        norm_num_groups=8)
    g = torch.Generator().manual_seed(1)
    return m, (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10])), \
        dict(encoder_hidden_states=torch.randn(1, 8, 32, generator=g))


@pytest.mark.parametrize("build,dims", [(_pixart, {72}), (_unet, {40, 80})], ids=["pixart-72", "unet-40-80"])
def test_head_dims_rewritten_and_exact(build, dims):
    model, args, kw = build()
    model.eval()
    with torch.no_grad(), SDPACalls() as seen:
        ref = model(*args, **kw).sample
    assert set(seen.head_dims) == dims
    torch._dynamo.reset()
    be = sc.backend(config=DENSE, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args, **kw).sample
    rep = be.report()
    assert len(rep.rewritten) == len(seen.head_dims) and not rep.dense, str(rep)
    assert rel_err(out, ref) < 1e-5
    torch._dynamo.reset()
    be = sc.backend(config=SPARSE, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args, **kw).sample
        same = run_same_masks(lambda *a: model(*a, **kw).sample, masks_of(be), *args)
    assert any(s.sparsity > 0 for s in be.report().rewritten)
    assert rel_err(out, same) < 1e-5


def test_unet_gradients_equal_eager():
    model, args, kw = _unet()
    torch._dynamo.reset()
    out = torch.compile(model, backend=sc.backend(config=DENSE, inner="aot_eager"))(*args, **kw).sample
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((model(*args, **kw).sample * w).sum(), params, allow_unused=True)
    top = max(r.abs().max() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert (g - r).abs().max() <= 1e-4 * max(r.abs().max(), 1e-2 * top)
