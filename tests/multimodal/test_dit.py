"""The DiT denoiser and the ImageGenerator API (save/load, prompt checks, warnings, reproducibility)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.multimodal.diffusion_train import (DiffusionTrainConfig, ImageGenerator, generate_image,
                                                single_object_world, train_diffusion, uint8_to_pixels)
from lmstack.multimodal.dit import DiT, DiTConfig
from lmstack.multimodal.shapes import COLOURS


@pytest.fixture(scope="module")
def gen():
    g = ImageGenerator.random(tiny=True, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero output layer, so pictures depend on the prompt and the weights
        g.dit.out.weight.normal_(0, 0.5)
    return g


def tiny_dit(**kw):
    torch.manual_seed(0)
    return DiT(DiTConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=2, text_dim=8, **kw))


def test_patchify_roundtrip_and_zero_init():
    dit = tiny_dit()
    x = torch.randn(2, 3, 32, 32)
    tokens = dit.patchify(x)
    assert tokens.shape == (2, 16, 3 * 8 * 8)
    assert torch.equal(dit.unpatchify(tokens), x)
    # patch 0 is the top-left 8x8 block of every channel
    assert torch.equal(tokens[0, 0].view(3, 8, 8), x[0, :, :8, :8])
    eps = dit(x, torch.tensor([5, 900]), torch.randn(2, 3, 8))
    assert eps.shape == x.shape and float(eps.detach().abs().max()) == 0.0  # zero-initialised output layer


def test_condition_and_mask_change_the_prediction():
    dit = tiny_dit()
    torch.nn.init.normal_(dit.out.weight, 0, 0.5)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100])
    a, b = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    assert not torch.allclose(dit(x, t, a), dit(x, t, b))
    assert not torch.allclose(dit(x, t, a), dit(x, torch.tensor([700]), a))
    # a masked-out text token changes nothing
    c = a.clone()
    c[0, 2] = 100.0
    mask = torch.tensor([[True, True, False]])
    assert torch.allclose(dit(x, t, a, mask), dit(x, t, c, mask), atol=1e-5)


def test_dit_rejects_bad_shapes():
    dit = tiny_dit()
    with pytest.raises(LmstackError, match="shape"):
        dit(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 3, 8))
    with pytest.raises(LmstackError, match="max_text_len"):
        dit(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 17, 8))
    with pytest.raises(Exception, match="multiple of"):
        DiTConfig(image_size=30, patch_size=4)


def test_generate_shapes_and_seed(gen):
    imgs, warnings = gen.generate("a red circle", n=2, seed=3, steps=5)
    assert warnings == [] and len(imgs) == 2
    assert imgs[0].shape == (gen.size, gen.size, 3) and imgs[0].dtype == np.uint8
    again, _ = gen.generate("a red circle", n=2, seed=3, steps=5)
    other, _ = gen.generate("a red circle", n=2, seed=4, steps=5)
    assert all(np.array_equal(a, b) for a, b in zip(imgs, again))
    assert not np.array_equal(imgs[0], other[0])
    assert not np.array_equal(imgs[0], imgs[1])  # two samples of one call differ
    ddpm, _ = gen.generate("a red circle", n=1, seed=3, steps=5, sampler="ddpm", guidance=1.0)
    assert ddpm[0].shape == (gen.size, gen.size, 3)


def test_unknown_words_warn_but_generate(gen):
    imgs, warnings = gen.generate("a purple hexagon", n=1, steps=3)
    assert len(imgs) == 1 and len(warnings) == 1
    assert "'hexagon'" in warnings[0] and "'purple'" not in warnings[0]
    _, warnings = gen.generate("A Red Circle.", n=1, steps=3)  # case and punctuation are not words
    assert warnings == []


@pytest.mark.parametrize("kw,match", [
    ({"prompt": ""}, "empty"), ({"prompt": "   "}, "empty"),
    ({"prompt": "a red circle " * 10}, "limit"), ({"prompt": "a red circle", "n": 0}, "n must"),
    ({"prompt": "a red circle", "sampler": "euler"}, "sampler"),
    ({"prompt": "a red circle", "steps": 0}, "steps"), ({"prompt": "a red circle", "steps": 5000}, "steps"),
    ({"prompt": "a red circle", "guidance": float("nan")}, "guidance"),
])
def test_bad_requests_raise(gen, kw, match):
    with pytest.raises(LmstackError, match=match):
        gen.generate(**kw)


def test_save_load_roundtrip_and_refusals(gen, tmp_path):
    gen.save(tmp_path / "m")
    loaded = ImageGenerator.from_dir(tmp_path / "m")
    assert loaded.size == gen.size and loaded.known_words == gen.known_words
    a, _ = gen.generate("a blue star", n=1, seed=7, steps=4)
    b, _ = loaded.generate("a blue star", n=1, seed=7, steps=4)
    assert np.array_equal(a[0], b[0])
    with pytest.raises(LmstackError, match="no such directory"):
        ImageGenerator.from_dir(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmstackError, match="config.json is missing"):
        ImageGenerator.from_dir(tmp_path / "empty")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "lmstack-clip"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="not an image generator"):
        ImageGenerator.from_dir(tmp_path / "m")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LmstackError, match="not a directory"):
        gen.save(tmp_path / "f")


def test_single_object_world_is_labelled_and_deterministic():
    imgs, labels = single_object_world(6, size=32, seed=1)
    again, labels2 = single_object_world(6, size=32, seed=1)
    assert imgs.shape == (6, 32, 32, 3) and np.array_equal(imgs, again) and labels == labels2
    assert all((c, s) not in {("green", "star"), ("red", "triangle")} for c, s in labels)
    px = uint8_to_pixels(imgs)
    assert px.shape == (6, 3, 32, 32) and -1.0 <= float(px.min()) and float(px.max()) <= 1.0
    for img, (colour, _) in zip(imgs, labels):  # the object's exact colour is present
        assert (img.reshape(-1, 3) == np.array(COLOURS[colour])).all(axis=1).sum() > 20


def test_train_diffusion_run_writes_a_loadable_model(tmp_path):
    cfg = DiffusionTrainConfig(out=str(tmp_path / "run"), n_images=16, steps=3, batch_size=4, clip_steps=2,
                               dit=DiTConfig(patch_size=8, d_model=32, n_layers=1, n_heads=2), log_every=1,
                               progress=False, device="cpu")
    summary = train_diffusion(cfg)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    gen = ImageGenerator.from_dir(tmp_path / "run")
    assert gen.size == 32 and "circle" in gen.known_words
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    paths = generate_image("a red circle", model=str(tmp_path / "run"), out=str(tmp_path / "a.png"), n=2, steps=2)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a_0.png", "a_1.png"]
    assert Image.open(paths[0]).size == (32, 32)
    with pytest.raises(LmstackError, match="--out"):
        train_diffusion(DiffusionTrainConfig())
    with pytest.raises(Exception, match="p_uncond"):
        DiffusionTrainConfig(p_uncond=1.0)
