"""multimodal/vit.py: patch tokens through the one Transformer as an encoder."""
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.vit import ViT, VisionConfig, quick_gelu


def tiny(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(VisionConfig(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, **kw)).eval()


def test_shapes_and_pooling():
    vit = tiny()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert vit.n_patches == 16
    assert vit(x).shape == (3, 17, 32)
    pooled = vit.pooled(x)
    assert pooled.shape == (3, 32)
    # cls pooling is the post-normed class token; mean pooling differs from it
    torch.testing.assert_close(pooled, vit.post_norm(vit(x)[:, 0]))
    mean = tiny(pool="mean")
    assert not torch.allclose(mean.pooled(x), pooled)
    torch.testing.assert_close(mean.pooled(x), mean.post_norm(mean(x)[:, 1:].mean(1)))


def test_layer_selects_hidden_states():
    vit = tiny()
    x = torch.rand(2, 3, 16, 16)
    h0 = vit(x, layer=0)
    torch.testing.assert_close(h0, vit.encoder.emb_norm(vit.embed(x)))  # pre-norm applied to embeddings
    assert not torch.allclose(vit(x, layer=-2), vit(x))
    torch.testing.assert_close(vit(x, layer=-1), vit(x, layer=2))
    with pytest.raises(LmstackError, match="layer=5"):
        vit(x, layer=5)


def test_refusals_name_the_problem():
    with pytest.raises(ConfigError, match="image_size=30 must be a multiple of patch_size=8"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="pool='max'"):
        VisionConfig(pool="max")
    vit = tiny()
    with pytest.raises(LmstackError, match=r"\(N, 3, 16, 16\).*got \(2, 3, 8, 8\)"):
        vit(torch.zeros(2, 3, 8, 8))
    with pytest.raises(LmstackError, match="got \\(3, 16, 16\\)"):
        vit(torch.zeros(3, 16, 16))
    with pytest.raises(LmstackError, match="floats"):
        vit(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_patch_pixels_reach_only_their_own_token_at_layer_zero():
    vit = tiny()
    x = torch.rand(1, 3, 16, 16)
    y = x.clone()
    y[:, :, 4:8, 8:12] += 0.5  # patch at row 1, column 2 -> patch index 1*4+2 = 6 -> token 7 (after the class token)
    diff = (vit.embed(x) - vit.embed(y)).abs().sum(-1)[0]
    assert diff[7] > 0 and torch.count_nonzero(diff) == 1
    # after the blocks the change spreads to every token (bidirectional attention)
    assert torch.count_nonzero((vit(x) - vit(y)).abs().sum(-1)[0] > 1e-6) == 17


def test_quick_gelu_swapped_in_and_config_round_trips():
    vit = tiny()
    assert vit.encoder.blocks[0].mlp.act is quick_gelu
    assert tiny(activation="gelu").encoder.blocks[0].mlp.act is not quick_gelu
    assert not vit.encoder.config.causal and vit.encoder.config.head == "none"
    cfg = vit.config
    assert VisionConfig.from_dict(cfg.to_dict()) == cfg
    # gradients reach the patch projection, class token and positions
    vit.train()
    vit.pooled(torch.rand(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in (vit.patch_embed.weight, vit.cls_token, vit.pos_emb))
