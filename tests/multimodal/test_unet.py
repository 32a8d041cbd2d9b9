"""The conv UNet denoiser (multimodal/unet.py) and its wiring into ImageGenerator / DiffusionTrainConfig."""
import json

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.diffusion_train import DiffusionTrainConfig, ImageGenerator, fit_dit, single_object_world
from lmstack.multimodal.dit import DiT
from lmstack.multimodal.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: two threads only contend on a busy machine


def tiny_unet(**kw):
    torch.manual_seed(0)
    base = dict(image_size=16, channels=8, channel_mults=(1, 2), groups=4, n_heads=2, text_dim=8)
    return UNet(UNetConfig(**{**base, **kw}))


def randomise_output(unet):
    with torch.no_grad():  # a non-zero output conv, so the prediction depends on the input and the condition
        unet.out.weight.normal_(0, 0.5)
    return unet


@pytest.mark.parametrize("mults", [(1, 2), (1, 2, 2)])
def test_shapes_and_zero_init(mults):
    unet = tiny_unet(channel_mults=mults)
    x = torch.randn(2, 3, 16, 16)
    eps = unet(x, torch.tensor([3, 800]), torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool())
    assert eps.shape == x.shape
    assert float(eps.detach().abs().max()) == 0.0  # zero-initialised output conv: untrained, it predicts no noise
    assert float(unet.out.weight.detach().abs().sum()) == 0.0


def test_condition_reaches_the_output_and_padding_does_not():
    for cross in (True, False):
        unet = randomise_output(tiny_unet(cross_attn=cross))
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
        a, b = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        assert not torch.allclose(unet(x, t, a), unet(x, t, b), atol=1e-5)  # the prompt matters
        assert not torch.allclose(unet(x, t, a), unet(x, torch.tensor([700]), a), atol=1e-5)  # so does t
        c = a.clone()
        c[0, 2] = 100.0  # a masked-out (padding) token changes nothing, neither in the pooled vector nor attention
        mask = torch.tensor([[True, True, False]])
        assert torch.allclose(unet(x, t, a, mask), unet(x, t, c, mask), atol=1e-5)


def test_null_condition_differs_from_a_real_prompt():
    gen = ImageGenerator.random(tiny=True, seed=0, denoiser="unet", image_size=16)
    randomise_output(gen.dit)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([400])
    real, real_mask = gen.condition(["a red circle"])
    null, null_mask = gen.condition([""])  # what CFG's unconditional half and training's prompt dropout use
    with torch.no_grad():
        assert not torch.allclose(gen.dit(x, t, real, real_mask), gen.dit(x, t, null, null_mask), atol=1e-5)
    # guidance 3 therefore moves the sample away from the conditional one (w=1)
    assert not torch.allclose(gen.sample(["a red circle"], steps=2, guidance=3.0),
                              gen.sample(["a red circle"], steps=2, guidance=1.0))


def test_generator_save_load_round_trip(tmp_path):
    gen = ImageGenerator.random(tiny=True, seed=0, denoiser="unet")
    randomise_output(gen.dit)
    gen.save(tmp_path / "g")
    data = json.loads((tmp_path / "g" / "config.json").read_text())
    assert data["denoiser"] == "unet" and "unet" in data and "dit" not in data
    back = ImageGenerator.from_dir(tmp_path / "g")
    assert back.kind == "unet" and isinstance(back.dit, UNet)
    assert back.dit.config == gen.dit.config
    assert torch.equal(back.sample(["a blue star"], seed=3, steps=3), gen.sample(["a blue star"], seed=3, steps=3))
    # a DiT directory still says dit, and a directory from before the choice existed (no "denoiser") loads as one
    dit_dir = ImageGenerator.random(tiny=True, seed=0).save(tmp_path / "d")
    old = json.loads((dit_dir / "config.json").read_text())
    assert old["denoiser"] == "dit"
    del old["denoiser"]
    (dit_dir / "config.json").write_text(json.dumps(old))
    assert isinstance(ImageGenerator.from_dir(dit_dir).dit, DiT)


def test_bad_denoiser_is_refused(tmp_path):
    gen_dir = ImageGenerator.random(tiny=True, seed=0, denoiser="unet").save(tmp_path / "g")
    data = json.loads((gen_dir / "config.json").read_text())
    data["denoiser"] = "gan"
    (gen_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(LmstackError, match="denoiser"):
        ImageGenerator.from_dir(gen_dir)
    with pytest.raises(LmstackError, match="denoiser"):
        DiffusionTrainConfig(denoiser="gan")
    with pytest.raises(LmstackError, match="image_size"):
        UNetConfig(image_size=18, channel_mults=(1, 2, 2))
    with pytest.raises(LmstackError, match="shape"):
        tiny_unet()(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.randn(1, 3, 8))


def test_tiny_training_run_lowers_the_loss():
    torch.manual_seed(0)
    gen = ImageGenerator.random(tiny=True, seed=0, denoiser="unet", image_size=16)
    images, labels = single_object_world(64, 16, seed=0)
    cfg = DiffusionTrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5, ema=0.0, log_every=1, progress=False,
                               denoiser="unet", device="cpu")
    rows = fit_dit(gen, images, labels, cfg)
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert len(rows) == 60 and last < 0.7 * first, (first, last)


def strong_unet(**kw):
    """The unet2 options on a tiny UNet, every zero-initialised layer randomised so each path is live."""
    unet = tiny_unet(cond="film", attn_levels=(0, 1), pool="eos", text_adapter=True, **kw)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.3)
    return unet


def test_film_adapter_and_attention_levels_carry_the_prompt_and_ignore_padding():
    unet = strong_unet()
    assert len([m for m in unet.modules() if type(m).__name__ == "CrossAttention"]) == 5  # 2 down, mid, 2 up
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    a = torch.randn(1, 3, 8)
    mask = torch.tensor([[True, True, False]])
    base = unet(x, t, a, mask)
    for pos in (0, 1):  # every real token reaches the output (through the adapter, the attentions, the EOS vector)
        b = a.clone()
        b[0, pos] += torch.randn(8)  # not a constant: the adapter's LayerNorm would remove that
        assert not torch.allclose(base, unet(x, t, b, mask), atol=1e-5), pos
    c = a.clone()
    c[0, 2] = 100.0  # padding changes nothing
    assert torch.allclose(base, unet(x, t, c, mask), atol=1e-5)
    # FiLM carries the pooled (EOS) vector: with every cross-attention cut, the EOS token still matters
    for m in unet.modules():
        if type(m).__name__ == "CrossAttention":
            m.attn.out_proj.weight.data.zero_()
            m.attn.out_proj.bias.data.zero_()
    b = a.clone()
    b[0, 1] += torch.randn(8)
    assert not torch.allclose(unet(x, t, a, mask), unet(x, t, b, mask), atol=1e-5)
    b = a.clone()
    b[0, 0] += torch.randn(8)  # not the EOS (the last real token): the pooled vector ignores it
    assert torch.allclose(unet(x, t, a, mask), unet(x, t, b, mask), atol=1e-5)


def test_default_unet_options_keep_the_saved_layout():
    old = tiny_unet()
    assert not any(k.startswith(("adapter", "down_attn", "up_attn")) for k in old.state_dict())
    assert old.down[0][0].cond.out_features == 8  # add: one bias per channel
    new = tiny_unet(cond="film", attn_levels=(1,), text_adapter=True)
    assert new.down[0][0].cond.out_features == 16  # film: a scale and a shift per channel
    assert any(k.startswith("up_attn") for k in new.state_dict()) and any(k.startswith("adapter")
                                                                           for k in new.state_dict())
    for bad in (dict(cond="mul"), dict(pool="max"), dict(attn_levels=(2,))):
        with pytest.raises(LmstackError, match="cond|pool|attn_levels"):
            UNetConfig(image_size=16, channels=8, channel_mults=(1, 2), groups=4, n_heads=2, text_dim=8, **bad)


def test_strong_unet_round_trips_through_a_generator_directory(tmp_path):
    gen = ImageGenerator.random(tiny=True, seed=0, denoiser="unet")
    cfg = UNetConfig(**{**gen.dit.config.to_dict(), "cond": "film", "attn_levels": [0], "pool": "eos",
                        "text_adapter": True})
    gen = ImageGenerator(randomise_output(UNet(cfg)), gen.text, gen.text_config, gen.tok, gen.schedule,
                         gen.known_words)
    back = ImageGenerator.from_dir(gen.save(tmp_path / "g"))
    assert back.dit.config == cfg
    assert torch.equal(back.sample(["a red star"], seed=1, steps=2), gen.sample(["a red star"], seed=1, steps=2))
