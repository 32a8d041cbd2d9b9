"""multimodal/adversarial_train.py: Madry-style training makes a toy classifier more robust to PGD than the same
budget of clean training, is deterministic in its seed, mixes in the clean loss when asked, and TeCoA's
zero-shot loss trains a ViT image tower against fixed prompt embeddings without touching them."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.adversarial_train import AdvTrainConfig, adversarial_train, adversarial_train_clip, \
    zero_shot_logits, zero_shot_loss
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
    x, y = _data(256, 0)
    model = _mlp()
    cfg = AdvTrainConfig(steps=steps, batch_size=64, lr=3e-3, clean_weight=clean_weight, seed=seed,
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
    cfg = AdvTrainConfig(steps=3, batch_size=16, lr=1e-2, attack=AttackConfig(kind="fgsm", eps=4))
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
