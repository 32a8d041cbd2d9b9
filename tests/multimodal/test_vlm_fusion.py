"""Fusion modules (multimodal/fusion.py, qformer.py): the projector, Flamingo's gated cross-attention (identity
at init), its layer hook, and the Q-Former's fixed number of image tokens."""
import pytest
import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.multimodal.fusion import CrossAttention, GatedCrossAttention, Projector, XAttnHook, xattn_layers
from lmstack.multimodal.qformer import QFormer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on busy cores


def test_projector_maps_each_patch_alone():
    torch.manual_seed(0)
    proj = Projector(d_vision=8, d_lm=12)
    feats = torch.randn(2, 5, 8)
    out = proj(feats)
    assert out.shape == (2, 5, 12)
    feats2 = feats.clone()
    feats2[:, 3] += 1.0
    out2 = proj(feats2)
    assert torch.allclose(out[:, :3], out2[:, :3]) and not torch.allclose(out[:, 3], out2[:, 3])


def test_gated_cross_attention_is_the_identity_at_init_and_reads_the_image_once_open():
    torch.manual_seed(0)
    layer = GatedCrossAttention(d_lm=16, d_ctx=8, n_heads=4)
    x, img = torch.randn(2, 6, 16), torch.randn(2, 9, 8)
    assert torch.equal(layer(x, img), x)
    with torch.no_grad():
        layer.attn_gate.fill_(1.0)
    a, b = layer(x, img), layer(x, img + 1.0)
    assert not torch.allclose(a, x) and not torch.allclose(a, b)


def test_cross_attention_has_no_positions_and_checks_the_batch():
    torch.manual_seed(0)
    attn = CrossAttention(16, 8, n_heads=2)
    x, img = torch.randn(1, 4, 16), torch.randn(1, 7, 8)
    perm = torch.randperm(7)
    assert torch.allclose(attn(x, img), attn(x, img[:, perm]), atol=1e-6)
    with pytest.raises(LmstackError, match="one image per sequence"):
        attn(x, torch.randn(2, 7, 8))
    with pytest.raises(LmstackError, match="divisible"):
        CrossAttention(10, 8, n_heads=4)


def test_xattn_hook_runs_the_chosen_layers_only():
    assert xattn_layers(5, 2) == [0, 2, 4]
    with pytest.raises(LmstackError, match="xattn_every"):
        xattn_layers(4, 0)
    layers = nn.ModuleList(GatedCrossAttention(16, 8, 4) for _ in range(2))
    for layer in layers:
        nn.init.constant_(layer.attn_gate, 1.0)
    hook = XAttnHook(layers, every=2).bind(torch.randn(1, 3, 8))
    x = torch.randn(1, 4, 16)
    assert torch.equal(hook(1, x), x) and torch.equal(hook(3, x), x)
    assert not torch.allclose(hook(2, x), x)
    with pytest.raises(LmstackError, match="needs its image"):
        XAttnHook(layers, every=2)(0, x)


def test_qformer_gives_n_queries_tokens_whatever_the_patch_count():
    torch.manual_seed(0)
    qf = QFormer(d_vision=8, d_lm=12, n_queries=5, d_model=16, n_layers=2, n_heads=4)
    for patches in (4, 16):
        assert qf(torch.randn(3, patches, 8)).shape == (3, 5, 12)
    feats = torch.randn(2, 6, 8)
    out = qf(feats)
    assert torch.allclose(out, qf(feats[:, torch.randperm(6)]), atol=1e-5)  # a set reader: no patch positions
    assert not torch.allclose(out[0], out[1])  # the queries read the patches
    with pytest.raises(LmstackError, match="n_queries"):
        QFormer(8, 12, n_queries=0)
    with pytest.raises(LmstackError, match=r"\(N, patches, d_vision\)"):
        qf(torch.randn(6, 8))
