"""multimodal/perceiver.py: latents cross-attending to patches or raw pixels, FLOPs by formula."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.multimodal.perceiver import Perceiver, PerceiverConfig, fourier_positions, perceiver_flops, vit_flops
from lmstack.multimodal.vit import ViT, VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention_flops(cfg: PerceiverConfig) -> int:
    """Scores and weighted sums, which FlopCounterMode does not count for CPU sdpa: 4*N*M*d per cross-attention,
    4*N*N*d per latent layer."""
    n, d = cfg.n_latents, cfg.d_model
    return cfg.n_cross * (4 * n * cfg.n_inputs * d + cfg.self_layers * 4 * n * n * d)


@pytest.mark.parametrize("cfg", [PerceiverConfig(image_size=32, patch_size=8),
                                 PerceiverConfig(image_size=16, input="pixels", n_cross=3, n_latents=8),
                                 PerceiverConfig(image_size=16, patch_size=4, self_layers=0)])
def test_flops_formula_matches_counted_matmuls(cfg):
    model = Perceiver(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, cfg.image_size, cfg.image_size))
    counted = counter.get_total_flops()  # one image; torch counts a multiply-add as 2 FLOPs, as the formula does
    formula = perceiver_flops(cfg) - _attention_flops(cfg)
    # the formula also counts norm weights and biases as 2 FLOPs each (Kaplan), a few percent at this size
    assert counted == pytest.approx(formula, rel=0.03)


def test_vit_flops_formula_matches_counted_matmuls():
    vc = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=4)
    with FlopCounterMode(display=False) as counter:
        ViT(vc)(torch.randn(1, 3, 32, 32))
    attention = vc.n_layers * 4 * 17 * 17 * vc.d_model
    assert counter.get_total_flops() == pytest.approx(vit_flops(vc) - attention, rel=0.03)


def test_cost_after_the_cross_attention_does_not_depend_on_input_length():
    small = PerceiverConfig(image_size=16, input="pixels")
    big = PerceiverConfig(image_size=64, input="pixels")
    assert big.n_inputs == 16 * small.n_inputs
    growth = perceiver_flops(big) - perceiver_flops(small)
    # all of the growth is the cross-attention's per-input work: K/V projections plus scores and sums
    per_input = 2 * small.input_dim * small.d_model * 2 + 4 * small.n_latents * small.d_model
    assert growth == per_input * (big.n_inputs - small.n_inputs)
    # and one model reads both lengths' latents at the same shape
    assert Perceiver(big).encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 64)


def test_shapes_and_input_features():
    cfg = PerceiverConfig(image_size=16, patch_size=4, n_latents=6, d_model=32, n_outputs=5)
    model = Perceiver(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = model.inputs(x)
    assert feats.shape == (2, 16, 3 * 16 + 2 * 17) == (2, cfg.n_inputs, cfg.input_dim)
    assert torch.equal(feats[0, 1, :48], x[0, :, 0:4, 4:8].reshape(-1))  # patch 1 = row 0, column 1
    assert model.encode(x).shape == (2, 6, 32) and model(x).shape == (2, 5)
    assert isinstance(model.blocks[0], Transformer) and not model.blocks[0].config.causal
    pix = Perceiver(PerceiverConfig(image_size=8, input="pixels", n_fourier_bands=2))
    assert pix.inputs(torch.zeros(1, 3, 8, 8)).shape == (1, 64, 3 + 2 * 5)
    with pytest.raises(LmstackError, match=r"pixels must have shape \(N, 3, 16, 16\)"):
        model(torch.zeros(2, 3, 32, 32))


def test_fourier_positions_tell_inputs_apart():
    pos = fourier_positions(8, 4)
    assert pos.shape == (64, 2 * 9)
    assert torch.unique(pos, dim=0).shape[0] == 64  # every grid cell has its own features
    assert pos[0, 0] == -1 and pos[0, 9] == -1 and pos[63, 0] == 1 and pos[63, 9] == 1  # (y, x) coordinates


def test_latents_see_where_things_are():
    """Without position features the cross-attention is permutation-invariant over its inputs; with them,
    shuffling the pixels changes the output."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    perm = torch.randperm(64)
    shuffled = x.flatten(2)[:, :, perm].reshape(1, 3, 8, 8)
    blind = Perceiver(PerceiverConfig(image_size=8, input="pixels", n_fourier_bands=0, self_layers=1))
    blind.positions.zero_()  # drop the raw coordinates too
    assert torch.allclose(blind(x), blind(shuffled), atol=1e-5)
    seeing = Perceiver(PerceiverConfig(image_size=8, input="pixels", self_layers=1))
    assert not torch.allclose(seeing(x), seeing(shuffled), atol=1e-4)


def test_iterative_cross_attention_shares_weights_after_the_first():
    shared = Perceiver(PerceiverConfig(image_size=16, n_cross=4, share_weights=True))
    separate = Perceiver(PerceiverConfig(image_size=16, n_cross=4, share_weights=False))
    assert len(shared.cross) == 2 and len(separate.cross) == 4
    one = Perceiver(PerceiverConfig(image_size=16, n_cross=1))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(separate) > n(shared) > n(one)
    assert perceiver_flops(shared.config) == perceiver_flops(separate.config)  # same work, fewer weights


def test_learns_a_shapes_world_attribute():
    """A few steps on pictures of one big square, left half or right half: the Perceiver learns which side."""
    torch.manual_seed(0)
    imgs, labels = [], []
    for i in range(32):
        x = torch.full((3, 16, 16), -1.0)
        left = i % 2 == 0
        x[:, 4:12, 1:7] = 1.0 if left else -1.0
        x[:, 4:12, 9:15] = -1.0 if left else 1.0
        imgs.append(x)
        labels.append(int(left))
    x, y = torch.stack(imgs), torch.tensor(labels)
    model = Perceiver(PerceiverConfig(image_size=16, input="pixels", n_latents=4, d_model=32, self_layers=1,
                                      n_outputs=2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="input='audio'"):
        PerceiverConfig(input="audio")
    with pytest.raises(ConfigError, match="image_size=30 must be a multiple of patch_size=4"):
        PerceiverConfig(image_size=30)
    with pytest.raises(ConfigError, match="n_latents must be >= 1"):
        PerceiverConfig(n_latents=0)
    with pytest.raises(ConfigError, match="divisible by the head count 3"):
        PerceiverConfig(n_heads=3)
