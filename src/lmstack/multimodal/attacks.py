"""Adversarial attacks on vision models (issue 24 §3, XII.12): FGSM and PGD under an L-inf budget, and the
typographic attack (a wrong word written onto the picture).

FGSM and PGD attack ANY differentiable `loss_fn(pixels) -> loss` over pixels in [-1, 1] (the to_pixels
convention of multimodal/images.py): a CLIP's zero-shot cross-entropy, a VLM's answer loss, a toy linear
model. The attack ascends the loss. `loss_fn` may return a scalar or one loss per image (shape (N,)); with
per-image losses, PGD keeps, for each image, the iterate with the highest loss seen (the strongest attack it
found, as robustness papers report), and the gradient is that of their sum (each image's gradient is its own).

The budget `eps` is given in 1/255 units of [0, 1] pixels, as papers quote it ("eps = 8/255" is eps=8). Our
pixels span [-1, 1], twice that range, so the budget in pixel units is 2 * eps / 255 (eps_in_pixels). Every
adversarial image stays inside the eps ball around the clean one and inside [-1, 1].

Gradients are taken with torch.autograd.grad with respect to the pixels only, so an attack never writes
`.grad` into the model's parameters (an attack in the middle of adversarial training leaves them clean).
The model's train/eval mode is the caller's: attack an eval-mode model unless dropout is meant to be in play.

Usage:
    from lmstack.multimodal.attacks import AttackConfig, attack, fgsm, pgd, typographic
    loss_fn = lambda x: F.cross_entropy(model(x), labels, reduction="none")   # one loss per image
    x_adv = fgsm(loss_fn, pixels, eps=4)                                       # eps = 4/255
    x_adv = pgd(loss_fn, pixels, eps=8, steps=10, seed=0)                      # step 2.5 * eps / steps
    x_adv = attack(AttackConfig(kind="pgd", eps=2, steps=5), loss_fn, pixels)
    img, box = typographic(image, "green", font_size=14, position="center")    # PIL image, text bbox
    x_typo = typographic_pixels(pixels, ["green", "blue"], font_size=14)       # the same on a batch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from lmstack.errors import LmstackError
from lmstack.multimodal.images import from_pixels, to_pixels

LO, HI = -1.0, 1.0  # the pixel range every encoder reads (images.to_pixels)
POSITIONS = ("center", "top", "bottom", "top-left", "bottom-right")

LossFn = Callable[[torch.Tensor], torch.Tensor]


def eps_in_pixels(eps: float) -> float:
    """An L-inf budget in 1/255 units of [0, 1] pixels -> the same budget on our [-1, 1] pixels (2 * eps / 255)."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps <= 255:
        raise LmstackError(f"eps must be a number in 0..255 (in 1/255 units, e.g. 8 for 8/255), got {eps!r}")
    return 2.0 * float(eps) / 255.0


def _check_pixels(pixels: torch.Tensor) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise LmstackError(f"pixels must be a (N, 3, S, S) tensor, got {shape}")
    if not pixels.is_floating_point():
        raise LmstackError(f"pixels must be a float tensor in [-1, 1], got dtype {pixels.dtype}")
    if pixels.numel() and (pixels.min() < LO - 1e-6 or pixels.max() > HI + 1e-6):
        raise LmstackError(f"pixels must lie in [-1, 1] (images.to_pixels), got [{pixels.min():.3f}, "
                           f"{pixels.max():.3f}]")


def _loss_and_grad(loss_fn: LossFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image or scalar loss, detached; d sum(loss) / d x)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # an attack run under torch.no_grad() (an eval loop) still needs its gradient
        loss = loss_fn(x)
        if not isinstance(loss, torch.Tensor) or loss.ndim > 1 or (loss.ndim == 1 and loss.shape[0] != x.shape[0]):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LmstackError(f"loss_fn must return a scalar or one loss per image ({x.shape[0]},), got {shape}")
        if not loss.requires_grad:
            raise LmstackError("loss_fn's loss does not depend on the pixels (no gradient flows to them)")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _project(x: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the eps ball around `clean`, then into the valid pixel range (both are boxes, so this is exact)."""
    return torch.min(torch.max(x, clean - eps), clean + eps).clamp(LO, HI)


def fgsm(loss_fn: LossFn, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size eps along the gradient's sign."""
    _check_pixels(pixels)
    budget = eps_in_pixels(eps)
    clean = pixels.detach()
    _, grad = _loss_and_grad(loss_fn, clean)
    return _project(clean + budget * grad.sign(), clean, budget)


def pgd(loss_fn: LossFn, pixels: torch.Tensor, eps: float, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al., 2018) under L-inf: from a uniform random start in the eps ball,
    `steps` signed-gradient steps of `step_size` (in 1/255 units; default 2.5 * eps / steps, Madry's choice),
    each projected back into the ball and the pixel range. The same seed gives the same images."""
    _check_pixels(pixels)
    budget = eps_in_pixels(eps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LmstackError(f"steps must be an integer >= 1, got {steps!r}")
    alpha = 2.5 * budget / steps if step_size is None else eps_in_pixels(step_size)
    clean = pixels.detach()
    x = clean
    if random_start and budget > 0:
        gen = torch.Generator(device=clean.device).manual_seed(int(seed))
        noise = torch.rand(clean.shape, generator=gen, device=clean.device, dtype=clean.dtype)
        x = _project(clean + (2 * noise - 1) * budget, clean, budget)
    best, best_loss = x, None
    for _ in range(steps):
        loss, grad = _loss_and_grad(loss_fn, x)
        best, best_loss = _keep_best(best, best_loss, x, loss)
        x = _project(x + alpha * grad.sign(), clean, budget)
    loss, _ = _loss_and_grad(loss_fn, x)  # the last step's result is scored too
    best, _ = _keep_best(best, best_loss, x, loss)
    return best.detach()


def _keep_best(best: torch.Tensor, best_loss: torch.Tensor | None, x: torch.Tensor,
               loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image losses: keep each image's strongest iterate. A scalar loss cannot rank images: keep the latest."""
    if loss.ndim == 0:
        return x, loss
    if best_loss is None:
        return x, loss
    better = loss > best_loss
    mask = better.view(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, x, best), torch.where(better, loss, best_loss)


@dataclass
class AttackConfig:
    """One attack, for attack() and adversarial training."""

    kind: str = "pgd"
    """Which attack: fgsm | pgd."""
    eps: float = 8.0
    """L-inf budget in 1/255 units of [0, 1] pixels (8 means 8/255)."""
    steps: int = 10
    """PGD iterations (ignored by fgsm)."""
    step_size: float | None = None
    """PGD step in 1/255 units; None for 2.5 * eps / steps."""
    random_start: bool = True
    """PGD starts from a uniform random point in the eps ball."""
    seed: int = 0
    """Seed of PGD's random start."""

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise LmstackError(f"unknown attack kind {self.kind!r}; allowed: {', '.join(ATTACKS)}")
        eps_in_pixels(self.eps)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise LmstackError(f"attack steps must be an integer >= 1, got {self.steps!r}")
        if self.step_size is not None:
            eps_in_pixels(self.step_size)


ATTACKS = {"fgsm": lambda cfg, fn, x: fgsm(fn, x, cfg.eps),
           "pgd": lambda cfg, fn, x: pgd(fn, x, cfg.eps, cfg.steps, cfg.step_size, cfg.random_start, cfg.seed)}


def attack(cfg: AttackConfig, loss_fn: LossFn, pixels: torch.Tensor) -> torch.Tensor:
    """Run the attack `cfg` names on `pixels` (eps 0 returns the clean pixels)."""
    if cfg.eps == 0:
        _check_pixels(pixels)
        return pixels.detach().clone()
    return ATTACKS[cfg.kind](cfg, loss_fn, pixels)


def _font(font_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if not isinstance(font_size, int) or isinstance(font_size, bool) or not 4 <= font_size <= 256:
        raise LmstackError(f"font_size must be an integer in 4..256 pixels, got {font_size!r}")
    return ImageFont.load_default(size=font_size)  # Pillow's bundled font: the same glyphs on every machine


def _place(position, text_w: int, text_h: int, side_w: int, side_h: int) -> tuple[int, int]:
    if isinstance(position, (tuple, list)) and len(position) == 2 and all(isinstance(v, int) for v in position):
        return int(position[0]), int(position[1])
    table = {"center": ((side_w - text_w) // 2, (side_h - text_h) // 2),
             "top": ((side_w - text_w) // 2, 1), "bottom": ((side_w - text_w) // 2, side_h - text_h - 1),
             "top-left": (1, 1), "bottom-right": (side_w - text_w - 1, side_h - text_h - 1)}
    if position not in table:
        raise LmstackError(f"unknown text position {position!r}; allowed: {', '.join(POSITIONS)} or an (x, y) pair")
    return table[position]


def typographic(image: Image.Image, word: str, font_size: int = 14, position="center",
                fill: tuple = (255, 255, 255), stroke: tuple | None = (0, 0, 0),
                box_fill: tuple | None = None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The typographic attack (Goh et al., 2021: an 'iPod' label on an apple): `word` written on a copy of the
    picture, in `fill` with a 1-pixel `stroke` outline so it reads on any background, optionally on a label of
    `box_fill`. Returns (new image, (x0, y0, x1, y1)): every changed pixel lies inside that box (x1, y1 exclusive).

    `position`: center | top | bottom | top-left | bottom-right, or the (x, y) of the text's top-left corner."""
    if not isinstance(word, str) or not word.strip():
        raise LmstackError(f"the typographic word must be a non-empty string, got {word!r}")
    if not isinstance(image, Image.Image):
        raise LmstackError(f"typographic() takes a PIL image, got {type(image).__name__}")
    font = _font(font_size)
    out = image.convert("RGB")  # a copy: the caller's picture is left as it was
    if out is image:
        out = image.copy()
    draw = ImageDraw.Draw(out)
    width = 1 if stroke is not None else 0
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=width)
    x, y = _place(position, right - left, bottom - top, *out.size)
    x, y = x - left, y - top  # textbbox's origin offset: the ink then starts at the placed corner
    pad = 1 if box_fill is not None else 0
    box = (x + left - pad, y + top - pad, x + right + pad, y + bottom + pad)
    if box_fill is not None:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=tuple(box_fill))
    draw.text((x, y), word, font=font, fill=tuple(fill), stroke_width=width,
              stroke_fill=tuple(stroke) if stroke is not None else None)
    w, h = out.size
    clipped = (max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3]))
    return out, clipped


def typographic_pixels(pixels: torch.Tensor, words: list[str], **kwargs) -> torch.Tensor:
    """typographic() on a batch of [-1, 1] pixels, one word per image (same kwargs); returns new pixels."""
    _check_pixels(pixels)
    if len(words) != pixels.shape[0]:
        raise LmstackError(f"typographic_pixels needs one word per image: {len(words)} words for "
                           f"{pixels.shape[0]} images")
    images = [typographic(img, word, **kwargs)[0] for img, word in zip(from_pixels(pixels), words)]
    return to_pixels(images, pixels.shape[-1]).to(pixels.device, pixels.dtype)


__all__ = ["AttackConfig", "ATTACKS", "attack", "fgsm", "pgd", "eps_in_pixels", "typographic", "typographic_pixels",
           "POSITIONS"]
