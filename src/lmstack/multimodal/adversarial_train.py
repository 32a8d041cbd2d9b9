"""Adversarial training (Madry et al., 2018) for vision models: each step first attacks the batch (PGD or FGSM,
multimodal/attacks.py) against the current weights, then takes the optimizer step on the attacked pictures,
min over weights of max over the eps ball of the loss.

- adversarial_train: the loop, for ANY `loss_fn(pixels, *targets)` (a VLM's answer loss, a classifier's CE),
  over tensors whose first is the pixels; a fraction `clean_weight` of the loss may stay on clean pictures.
- Word overlays (on by default, `overlay_prob`): before the attack, a share of each batch's pictures get a random
  word drawn on them (attacks.typographic: colour, shape and neutral words, random size, place and ink), labels
  unchanged. Why: Madry training on PGD pictures alone made the VQA VLM fragile to ANY word written on the picture
  (benchmarks/vision_adversarial: 0.72 with a wrong colour word against 0.98 for the eps-0 fine-tune); the eps
  ball never holds a word, so the model must meet words in training to keep ignoring them.
- TeCoA (Mao et al., 2023, "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models"): a CLIP's
  image tower fine-tuned on adversarial pictures against the FIXED text embeddings of the class prompts, i.e.
  cross-entropy of the zero-shot logits scale * cos(image, prompt). zero_shot_loss builds that loss from any
  `encode_image(pixels) -> (N, d)` and a (C, d) table of prompt embeddings (a CLIP's text tower, run once);
  adversarial_train_clip runs it on a multimodal/clip.py CLIP: its ViT and visual projection train, its text
  tower and temperature stay as they were.

The attack runs with the model in eval mode (no dropout noise in the gradient it follows), the update in the
mode the model came in with. Every run is a pure function of its config (seeded batches and attack starts).

Usage:
    from lmstack.multimodal.adversarial_train import AdvTrainConfig, adversarial_train, zero_shot_loss
    cfg = AdvTrainConfig(steps=200, batch_size=32, lr=1e-4, attack=AttackConfig(kind="pgd", eps=4, steps=3))
    loss_fn = zero_shot_loss(vit_and_proj, prompt_embeddings, scale=20.0)     # loss_fn(pixels, labels)
    history = adversarial_train(model, loss_fn, (pixels, labels), cfg)        # {"steps", "seconds", "loss", ...}
    x_words, drawn = overlay_words(pixels, prob=0.25, seed=0)                   # the augmentation on its own
    class_emb = label_embeddings(clip, tok, ["red", "blue"])                   # clip.py: prompts, ensembled
    history = adversarial_train_clip(clip, pixels, labels, class_emb, cfg)    # TeCoA on the image tower
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.multimodal.attacks import POSITIONS, AttackConfig, attack, typographic
from lmstack.multimodal.clip import CLIP
from lmstack.multimodal.images import from_pixels, to_pixels
from lmstack.multimodal.shapes import COLOURS, SHAPES
from lmstack.progress import BudgetBar
from lmstack.runtime.validation import check_int, check_number, need


# the words overlays draw: every colour and shape the shapes world names (the words that could mislead a colour or
# shape answer) and neutral words (signs, labels); benchmarks keep their own control words apart from these
OVERLAY_WORDS = tuple(sorted(COLOURS)) + SHAPES + ("note", "sale", "stop", "open", "exit", "logo", "menu", "info",
                                                  "sign", "tag")
# ink and outline pairs: the attack's white-on-black, its reverse, and a few coloured inks
INKS = (((255, 255, 255), (0, 0, 0)), ((0, 0, 0), (255, 255, 255)), ((255, 255, 0), (0, 0, 0)),
        ((255, 0, 0), (255, 255, 255)), ((0, 0, 255), (255, 255, 255)))


@dataclass
class AdvTrainConfig:
    """Madry-style adversarial training."""

    attack: AttackConfig = field(default_factory=lambda: AttackConfig(kind="pgd", eps=4.0, steps=3))
    """The attack each training batch meets (a few PGD steps is the usual trade of cost for strength)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Pictures per step (drawn without replacement within an epoch, seeded)."""
    lr: float = 1e-4
    """AdamW learning rate (a fine-tune: small)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clean_weight: float = 0.0
    """Share of the loss on the clean pictures: 0 is Madry's pure adversarial loss, 0.5 an even mix."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    max_seconds: float = 0.0
    """Stop after this many seconds (0 = no time cap)."""
    overlay_prob: float = 0.25
    """Share of each batch's pictures that get a random word drawn on before the attack, label unchanged
    (overlay_words); 0 turns it off. Keeps the model blind to written words, which PGD pictures alone do not."""
    overlay_words: tuple = OVERLAY_WORDS
    """The words overlays draw from (default: the shapes world's colours and shapes, and neutral words)."""
    seed: int = 0
    """Seed of the batch order, of each step's attack start and of its overlays."""
    progress: bool = False
    """Show a progress bar."""

    def __post_init__(self):
        if isinstance(self.attack, dict):  # a YAML recipe gives the nested section as a mapping
            self.attack = AttackConfig(**self.attack)
        need(isinstance(self.attack, AttackConfig), f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("clean_weight", self.clean_weight, low=0, high=1)
        check_number("grad_clip", self.grad_clip, low=0)
        check_number("max_seconds", self.max_seconds, low=0)
        check_number("overlay_prob", self.overlay_prob, low=0, high=1)
        if isinstance(self.overlay_words, list):  # a YAML recipe gives a list
            self.overlay_words = tuple(self.overlay_words)
        need(isinstance(self.overlay_words, tuple) and len(self.overlay_words) > 0
             and all(isinstance(w, str) and w.strip() for w in self.overlay_words),
             f"overlay_words must be a non-empty list of non-empty words, got {self.overlay_words!r}")
        check_int("seed", self.seed)


def _batches(n: int, batch_size: int, seed: int):
    """Endless seeded minibatch indices: a fresh permutation each epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


def overlay_words(pixels: torch.Tensor, prob: float, seed: int,
                  words: Sequence[str] = OVERLAY_WORDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a random word (attacks.typographic) on each picture with probability `prob`: the word, its size
    (a fifth to a third of the side), place (a named position or any corner point) and ink are all drawn from
    random.Random(seed). Returns (new pixels, (N,) bool mask of the pictures written on); the rest are untouched."""
    if not 0 <= prob <= 1:
        raise LmstackError(f"overlay prob must be in [0, 1], got {prob!r}")
    if not words or any(not isinstance(w, str) or not w.strip() for w in words):
        raise LmstackError(f"overlay words must be a non-empty list of non-empty words, got {words!r}")
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise LmstackError("overlay_words takes (N, 3, S, S) pixels in [-1, 1]")
    rng = random.Random(seed)
    side = pixels.shape[-1]
    mask = torch.tensor([rng.random() < prob for _ in range(pixels.shape[0])], dtype=torch.bool)
    out = pixels.detach().clone()
    idx = mask.nonzero().flatten().tolist()
    if not idx:
        return out, mask
    images = from_pixels(out[idx])
    for k, img in enumerate(images):
        size = rng.randint(max(4, side // 5), max(4, side // 3))
        where = rng.choice(POSITIONS + ("anywhere",))
        if where == "anywhere":  # the text's corner anywhere it still starts inside the picture
            where = (rng.randint(0, max(0, side - 2 * size)), rng.randint(0, max(0, side - size)))
        fill, stroke = rng.choice(INKS)
        images[k] = typographic(img, rng.choice(list(words)), font_size=size, position=where, fill=fill,
                                stroke=stroke)[0]
    out[idx] = to_pixels(images, side).to(out.device, out.dtype)
    return out, mask


def adversarial_train(model: nn.Module, loss_fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                      cfg: AdvTrainConfig, params: Sequence[nn.Parameter] | None = None) -> dict:
    """Train `params` (default: every parameter of `model` that requires grad) on attacked batches of `tensors`.

    tensors[0] holds the pixels (N, 3, S, S) in [-1, 1], the others the targets, row-aligned with them;
    loss_fn(pixels, *targets) returns a scalar or one loss per picture. A share cfg.overlay_prob of each batch's
    pictures first get a random word drawn on (overlay_words), targets unchanged; the attack then starts from
    them. Returns the history: steps done, seconds,
    the adversarial loss per step (and the clean one when clean_weight > 0)."""
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise LmstackError("adversarial_train needs a sequence of tensors: pixels first, then the targets")
    n = tensors[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in tensors):
        raise LmstackError(f"the tensors must be non-empty and share their first dimension, got "
                           f"{[tuple(t.shape) for t in tensors]}")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise LmstackError("adversarial_train has no trainable parameters (all are frozen)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    was_training = model.training
    history = {"adv_loss": [], "clean_loss": [], "steps": 0, "seconds": 0.0}
    start = time.perf_counter()
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc="adversarial train", enabled=cfg.progress)
    batches = _batches(n, cfg.batch_size, cfg.seed)
    try:
        for step in range(cfg.steps):
            idx = next(batches)
            pixels, *targets = (t[idx] for t in tensors)
            step_seed = cfg.seed * 1_000_003 + step
            if cfg.overlay_prob > 0:
                pixels, _ = overlay_words(pixels, cfg.overlay_prob, step_seed, cfg.overlay_words)
            model.eval()
            step_attack = AttackConfig(**{**cfg.attack.__dict__, "seed": step_seed})
            adv = attack(step_attack, lambda x: loss_fn(x, *targets), pixels)
            model.train(was_training)
            adv_loss = loss_fn(adv, *targets).mean()
            loss = (1 - cfg.clean_weight) * adv_loss
            if cfg.clean_weight > 0:
                clean_loss = loss_fn(pixels, *targets).mean()
                loss = loss + cfg.clean_weight * clean_loss
                history["clean_loss"].append(clean_loss.item())
            if not math.isfinite(loss.item()):
                raise LmstackError(f"adversarial training diverged at step {step}: loss {loss.item()}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            history["adv_loss"].append(adv_loss.item())
            history["steps"] = step + 1
            bar.update(1)
            bar.set_postfix(adv_loss=f"{adv_loss.item():.3f}")
            if cfg.max_seconds and time.perf_counter() - start >= cfg.max_seconds:
                break
    finally:
        bar.close()
        model.train(was_training)
    history["seconds"] = time.perf_counter() - start
    return history


def zero_shot_logits(encode_image: Callable[[torch.Tensor], torch.Tensor], text_emb: torch.Tensor,
                     pixels: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot logits: scale * cos(image embedding, each class's prompt embedding), (N, C)."""
    img = F.normalize(encode_image(pixels), dim=-1)
    return scale * img @ F.normalize(text_emb, dim=-1).t()


def zero_shot_loss(encode_image: Callable[[torch.Tensor], torch.Tensor], text_emb: torch.Tensor,
                   scale: float | torch.Tensor = 100.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TeCoA's loss: per-picture cross-entropy of the zero-shot logits against FIXED prompt embeddings (C, d)."""
    if not isinstance(text_emb, torch.Tensor) or text_emb.ndim != 2 or text_emb.shape[0] < 2:
        raise LmstackError("text_emb must be a (C, d) tensor of at least 2 class prompt embeddings")
    text_emb = text_emb.detach()  # the text side is a fixed target: no gradient reaches the text tower

    def loss_fn(pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(zero_shot_logits(encode_image, text_emb, pixels, scale), labels, reduction="none")

    return loss_fn


def adversarial_train_clip(clip: CLIP, pixels: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                           cfg: AdvTrainConfig) -> dict:
    """TeCoA on a CLIP: its image tower (ViT + visual projection) trained on adversarial pictures against the
    fixed class embeddings `class_emb` (C, embed_dim), e.g. clip.label_embeddings(clip, tok, labels), at the
    CLIP's own temperature; labels (N,) index the classes. Returns adversarial_train's history."""
    if not isinstance(clip, CLIP):
        raise LmstackError(f"adversarial_train_clip takes a multimodal.clip.CLIP, got {type(clip).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != pixels.shape[0]:
        raise LmstackError("labels must be a (N,) tensor with one class index per picture")
    n_classes = class_emb.shape[0] if isinstance(class_emb, torch.Tensor) and class_emb.ndim == 2 else 0
    if n_classes and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise LmstackError(f"labels must index the {n_classes} classes, got {int(labels.min())}..{int(labels.max())}")
    params = list(clip.vision.parameters()) + list(clip.visual_projection.parameters())
    scale = clip.scale().detach()
    return adversarial_train(clip, zero_shot_loss(clip.encode_image, class_emb, scale), (pixels, labels), cfg,
                             params=params)


__all__ = ["AdvTrainConfig", "OVERLAY_WORDS", "overlay_words", "adversarial_train", "adversarial_train_clip",
           "zero_shot_logits", "zero_shot_loss"]
