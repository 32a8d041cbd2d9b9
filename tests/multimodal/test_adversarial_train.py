"""multimodal/adversarial_train.py: Madry-style training makes a toy classifier more robust to PGD than the same
budget of clean training, is deterministic in its seed, mixes in the clean loss when asked, draws random words on
the asked share of pictures (labels unchanged), and TeCoA's zero-shot loss trains a ViT image tower against fixed
prompt embeddings without touching them."""
from dataclasses import replace as dataclasses_replace

import pytest
import torch
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.adversarial_train import OVERLAY_WORDS, AdvTrainConfig, adversarial_train, \
    adversarial_train_clip, overlay_words, zero_shot_logits, zero_shot_loss
from lmstack.multimodal.attacks import AttackConfig, pgd
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig
from lmstack.multimodal.vit import ViT, VisionConfig


def _data(n, seed):
    """Two classes told apart by a shift of the red channel, under uniform pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.rand(n, 3, 8, 8, generator=gen) * 1.2 - 0.6
    x[:, 0] += (y.float() * 2 - 1).view(-1, 1, 1) * 0.15
    return x.clamp(-1, 1), y


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def _train(eps, steps=150, clean_weight=0.0, seed=0):
    """Madry's mechanics on the toy task: no word overlays (8x8 noise pictures have nothing to read)."""
    x, y = _data(256, 0)
    model = _mlp()
    cfg = AdvTrainConfig(steps=steps, batch_size=64, lr=3e-3, clean_weight=clean_weight, seed=seed, overlay_prob=0.0,
                         attack=AttackConfig(kind="pgd", eps=eps, steps=3))
    history = adversarial_train(model, lambda p, t: F.cross_entropy(model(p), t, reduction="none"), (x, y), cfg)
    return model, history


def _robust_acc(model, eps):
    x, y = _data(256, 1)
    adv = pgd(lambda p: F.cross_entropy(model(p), y, reduction="none"), x, eps, steps=10)
    return (model(adv).argmax(-1) == y).float().mean().item()


def test_adversarial_training_beats_clean_training_under_pgd():
    clean_model, _ = _train(eps=0)
    robust_model, history = _train(eps=8)
    assert history["steps"] == 150 and len(history["adv_loss"]) == 150 and history["seconds"] > 0
    assert history["adv_loss"][-1] < history["adv_loss"][0] / 5  # it learned against the attack
    clean_acc, robust_acc = _robust_acc(clean_model, 8), _robust_acc(robust_model, 8)
    assert robust_acc > clean_acc + 0.05, (clean_acc, robust_acc)  # measured 0.86 -> 0.96
    x, y = _data(256, 1)
    assert (robust_model(x).argmax(-1) == y).float().mean() > 0.95  # clean accuracy kept on this easy task


def test_deterministic_in_seed_and_clean_mix_recorded():
    a, ha = _train(eps=4, steps=5, seed=3)
    b, hb = _train(eps=4, steps=5, seed=3)
    c, hc = _train(eps=4, steps=5, seed=4)
    assert ha["adv_loss"] == hb["adv_loss"] and ha["adv_loss"] != hc["adv_loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ha["clean_loss"] == []
    _, mixed = _train(eps=4, steps=5, clean_weight=0.5)
    assert len(mixed["clean_loss"]) == 5
    assert all(adv >= clean - 1e-6 for adv, clean in zip(mixed["adv_loss"], mixed["clean_loss"]))


def test_frozen_params_and_mode_restored():
    x, y = _data(32, 0)
    model = _mlp()
    first = model[1].weight.detach().clone()
    model.train()
    cfg = AdvTrainConfig(steps=3, batch_size=16, lr=1e-2, attack=AttackConfig(kind="fgsm", eps=4), overlay_prob=0.0)
    adversarial_train(model, lambda p, t: F.cross_entropy(model(p), t, reduction="none"), (x, y), cfg,
                      params=list(model[3].parameters()))
    assert torch.equal(model[1].weight, first) and model.training


def test_tecoa_zero_shot_loss_trains_the_image_tower_only():
    torch.manual_seed(0)
    vit = ViT(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=2))
    proj = torch.nn.Linear(32, 16, bias=False)
    tower = torch.nn.Sequential()
    tower.vit, tower.proj = vit, proj
    text_emb = torch.randn(3, 16, requires_grad=True)  # stands for a text tower's output: must stay as it is
    encode = lambda p: proj(vit.pooled(p))  # noqa: E731
    x = torch.rand(24, 3, 16, 16) * 2 - 1
    y = torch.arange(24) % 3
    logits = zero_shot_logits(encode, text_emb.detach(), x, 10.0)
    assert logits.shape == (24, 3) and logits.abs().max() <= 10.0 + 1e-4  # scale * cosine
    loss_fn = zero_shot_loss(encode, text_emb, scale=10.0)
    before = loss_fn(x, y).mean().item()
    cfg = AdvTrainConfig(steps=30, batch_size=24, lr=3e-3, attack=AttackConfig(kind="pgd", eps=2, steps=2))
    history = adversarial_train(tower, loss_fn, (x, y), cfg)
    assert text_emb.grad is None
    assert loss_fn(x, y).mean().item() < before
    assert history["adv_loss"][-1] < history["adv_loss"][0]


def test_tecoa_on_a_clip_moves_the_image_tower_only():
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                           text=TextConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=8),
                           embed_dim=16))
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1], [0, 9, 10, 1]])
    with torch.no_grad():
        class_emb = clip.encode_text(ids)
    text_before = {n: p.detach().clone() for n, p in clip.named_parameters() if not n.startswith(("vision", "visual"))}
    vision_before = clip.vision.patch_embed.weight.detach().clone()
    x = torch.rand(24, 3, 16, 16) * 2 - 1
    y = torch.arange(24) % 3
    cfg = AdvTrainConfig(steps=20, batch_size=24, lr=3e-3, attack=AttackConfig(kind="pgd", eps=2, steps=2))
    history = adversarial_train_clip(clip, x, y, class_emb, cfg)
    assert history["adv_loss"][-1] < history["adv_loss"][0]
    assert not torch.equal(clip.vision.patch_embed.weight, vision_before)
    assert all(torch.equal(p, text_before[n]) for n, p in clip.named_parameters() if n in text_before)
    assert "logit_scale" in text_before and "text_projection.weight" in text_before
    with pytest.raises(LmstackError, match="index the 3 classes"):
        adversarial_train_clip(clip, x, y + 1, class_emb, cfg)
    with pytest.raises(LmstackError, match="CLIP"):
        adversarial_train_clip(torch.nn.Linear(2, 2), x, y, class_emb, cfg)


def test_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="steps"):
        AdvTrainConfig(steps=0)
    with pytest.raises(ConfigError, match="clean_weight"):
        AdvTrainConfig(clean_weight=1.5)
    with pytest.raises(ConfigError, match="overlay_prob"):
        AdvTrainConfig(overlay_prob=-0.1)
    with pytest.raises(ConfigError, match="overlay_words"):
        AdvTrainConfig(overlay_words=["red", " "])
    assert AdvTrainConfig(overlay_words=["red", "sign"]).overlay_words == ("red", "sign")
    assert AdvTrainConfig(attack={"kind": "fgsm", "eps": 2}).attack.kind == "fgsm"
    with pytest.raises(LmstackError, match="kind"):
        AdvTrainConfig(attack={"kind": "deepfool"})
    model = _mlp()
    with pytest.raises(LmstackError, match="first dimension"):
        adversarial_train(model, lambda p, t: p.sum(), (torch.zeros(4, 3, 8, 8), torch.zeros(3)), AdvTrainConfig())
    with pytest.raises(LmstackError, match="trainable"):
        adversarial_train(model, lambda p, t: p.sum(), (torch.zeros(4, 3, 8, 8), torch.zeros(4)), AdvTrainConfig(),
                          params=[])
    with pytest.raises(LmstackError, match="C, d"):
        zero_shot_loss(lambda p: p, torch.zeros(5))


def _scenes(n):
    """Flat black pictures (32x32; -1 survives the uint8 round trip exactly): any written word shows."""
    return -torch.ones(n, 3, 32, 32)


def test_overlay_words_writes_on_the_chosen_share_deterministically():
    x = _scenes(200)
    out, drawn = overlay_words(x, prob=0.3, seed=7)
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(changed, drawn)  # exactly the chosen pictures carry ink, the others are untouched
    assert 0.2 < drawn.float().mean().item() < 0.4  # about the asked share (n=200)
    assert torch.equal(x, -torch.ones_like(x))  # the input is left as it was
    again, drawn2 = overlay_words(x, prob=0.3, seed=7)
    assert torch.equal(out, again) and torch.equal(drawn, drawn2)
    other, drawn3 = overlay_words(x, prob=0.3, seed=8)
    assert not torch.equal(drawn, drawn3)
    # words vary in place and size: the inked area differs between pictures
    ink = (out[drawn] != -1).any(1).flatten(1).sum(1)
    assert len(set(ink.tolist())) > 5
    assert out.min() >= -1 and out.max() <= 1
    none, mask0 = overlay_words(x, prob=0.0, seed=7)
    full, mask1 = overlay_words(x, prob=1.0, seed=7)
    assert not mask0.any() and torch.equal(none, x) and mask1.all()
    with pytest.raises(LmstackError, match="prob"):
        overlay_words(x, prob=2.0, seed=0)
    with pytest.raises(LmstackError, match="words"):
        overlay_words(x, prob=0.5, seed=0, words=[])


def test_overlay_words_draws_from_the_given_words():
    # a one-letter word writes less ink than a long one at the same sizes: the word list is what gets drawn
    x = _scenes(40)
    short, m1 = overlay_words(x, prob=1.0, seed=1, words=["i"])
    long, m2 = overlay_words(x, prob=1.0, seed=1, words=["wwwwwwww"])
    assert (short != -1).sum() < (long != -1).sum() / 3
    assert {"red", "circle", "sign"} <= set(OVERLAY_WORDS)


def test_adversarial_train_overlays_pictures_and_keeps_labels():
    """The loop hands loss_fn the overlaid pictures (the chosen share only) with the labels of their rows."""
    x = _scenes(64)
    y = torch.arange(64)
    seen = []
    weight = torch.nn.Parameter(torch.zeros(1))

    def loss_fn(p, t):
        seen.append((p.detach().clone(), t.clone()))
        return (p.flatten(1).mean(1) * weight).pow(2) + weight.pow(2)

    cfg = AdvTrainConfig(steps=2, batch_size=64, lr=1e-3, overlay_prob=0.5, seed=3,
                         attack=AttackConfig(kind="pgd", eps=0))
    adversarial_train(torch.nn.Linear(1, 1), loss_fn, (x, y), cfg, params=[weight])
    pixels, labels = seen[0]
    written = (pixels != -1).flatten(1).any(1)
    assert 16 < int(written.sum()) < 48  # about half of the batch carries a word
    assert torch.equal(labels.sort().values, y)  # every row's label travels with it, none changed
    off = dataclasses_replace(cfg, overlay_prob=0.0)
    seen.clear()
    adversarial_train(torch.nn.Linear(1, 1), loss_fn, (x, y), off, params=[weight])
    assert not any((p != -1).any() for p, _ in seen)
