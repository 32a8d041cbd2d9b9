"""Quality of generated shapes-world pictures: an attribute classifier's accuracy (is "a red triangle" red, a
triangle, both?), CLIP prompt-image agreement, and a Frechet distance between feature distributions.

- AttributeClassifier: a small CNN with a colour head (8 colours) and a shape head (6 shapes), trained on real
  rendered single-object pictures. Its 128-d penultimate features are what frechet_distance compares: an
  "FID-like" number on this world's pictures, NOT the Inception FID of the literature (different network,
  different features, not comparable with published FIDs).
- attribute_accuracy: the classifier's predictions against the colour and shape the prompt names, each with n
  and its binomial standard error.
- clip_agreement: cosine between a CLIP's image embedding and its prompt embedding, per picture (mean, stderr),
  and, given candidate prompts, how often the picture's own prompt is CLIP's best match among them.
- frechet_distance: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (Heusel et al. 2017).

Usage:
    from lmstack.multimodal.image_metrics import (train_attribute_classifier, attribute_accuracy, clip_agreement,
                                                  frechet_distance, parse_prompt)
    clf = train_attribute_classifier(images_uint8, [("red", "circle"), ...], steps=300)
    acc = attribute_accuracy(clf, pixels, ["a red circle", ...])     # {"colour": {"acc", "n", "stderr"}, ...}
    fd = frechet_distance(clf.features(real_pixels), clf.features(fake_pixels))
    agree = clip_agreement(clip, tok, pixels, prompts, candidates=all_prompts)
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import tokenize
from lmstack.multimodal.shapes import COLOURS, SHAPES

COLOUR_NAMES, SHAPE_NAMES = tuple(COLOURS), tuple(SHAPES)


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The (colour, shape) a prompt names (the first of each), None where it names none."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def rate(hits: Sequence[bool] | np.ndarray) -> dict:
    """{"acc", "n", "stderr"} of a list of hits (binomial standard error)."""
    h = np.asarray(hits, dtype=np.float64)
    n = int(h.size)
    if n == 0:
        return {"acc": float("nan"), "n": 0, "stderr": float("nan")}
    p = float(h.mean())
    return {"acc": p, "n": n, "stderr": math.sqrt(p * (1 - p) / n)}


class AttributeClassifier(nn.Module):
    """pixels (N, 3, S, S) in [-1, 1] -> colour logits (N, 8), shape logits (N, 6); features() the 128-d layer."""

    def __init__(self, width: int = 32, feat_dim: int = 128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU())
        # mean and max over positions: a shape anywhere in the picture gives the same vector
        self.fc = nn.Linear(4 * width, feat_dim)
        self.colour_head = nn.Linear(feat_dim, len(COLOUR_NAMES))
        self.shape_head = nn.Linear(feat_dim, len(SHAPE_NAMES))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise LmstackError(f"pixels must have shape (N, 3, S, S), got {tuple(pixels.shape)}")
        h = self.convs(pixels.float())
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.gelu(self.fc(pooled))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(pixels)
        return self.colour_head(f), self.shape_head(f)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch_size: int = 256) -> tuple[list[str], list[str]]:
        """The colour and shape names the classifier sees in each picture."""
        self.eval()
        colours, shapes = [], []
        for i in range(0, len(pixels), batch_size):
            c, s = self(pixels[i:i + batch_size])
            colours += [COLOUR_NAMES[j] for j in c.argmax(-1).tolist()]
            shapes += [SHAPE_NAMES[j] for j in s.argmax(-1).tolist()]
        return colours, shapes

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """(N, feat_dim) float64 penultimate features, for frechet_distance."""
        self.eval()
        return torch.cat([self.features(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
                         ).double().numpy()


def train_attribute_classifier(pixels: torch.Tensor, labels: Sequence[tuple[str, str]], steps: int = 300,
                               batch_size: int = 64, lr: float = 2e-3, noise: float = 0.05,
                               seed: int = 0, width: int = 32) -> AttributeClassifier:
    """Fit an AttributeClassifier on real pictures (N, 3, S, S) with (colour, shape) labels. A little Gaussian
    pixel noise (std `noise`) is added to the training pictures so that the sampler's faint residual noise is
    not out of distribution; the labels come only from the renderer."""
    if len(pixels) != len(labels) or len(labels) < 2:
        raise LmstackError(f"need at least 2 pictures with one label each, got {len(pixels)} and {len(labels)}")
    bad = [lab for lab in labels if lab[0] not in COLOURS or lab[1] not in SHAPES]
    if bad:
        raise LmstackError(f"unknown label {bad[0]}: colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = AttributeClassifier(width=width)
    yc = torch.tensor([COLOUR_NAMES.index(c) for c, _ in labels])
    ys = torch.tensor([SHAPE_NAMES.index(s) for _, s in labels])
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    clf.train()
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (min(batch_size, len(labels)),), generator=g)
        x = pixels[pick] + noise * torch.randn(pixels[pick].shape, generator=g)
        c, s = clf(x)
        loss = F.cross_entropy(c, yc[pick]) + F.cross_entropy(s, ys[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


def attribute_accuracy(clf: AttributeClassifier, pixels: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Colour right, shape right, both right: each {"acc", "n", "stderr"} over the pictures of `prompts`."""
    if len(pixels) != len(prompts):
        raise LmstackError(f"{len(pixels)} pictures but {len(prompts)} prompts")
    want = [parse_prompt(p) for p in prompts]
    missing = [p for p, (c, s) in zip(prompts, want) if c is None or s is None]
    if missing:
        raise LmstackError(f"prompt {missing[0]!r} names no colour or no shape of the shapes world")
    colours, shapes = clf.predict(pixels)
    c_ok = [pc == wc for pc, (wc, _) in zip(colours, want)]
    s_ok = [ps == ws for ps, (_, ws) in zip(shapes, want)]
    return {"colour": rate(c_ok), "shape": rate(s_ok), "both": rate([a and b for a, b in zip(c_ok, s_ok)])}


@torch.no_grad()
def clip_agreement(clip, tok, pixels: torch.Tensor, prompts: Sequence[str],
                   candidates: Sequence[str] | None = None) -> dict:
    """Mean cosine (and stderr) of CLIP's image and prompt embeddings, picture i with prompts[i]; with
    `candidates`, also top1: how often prompts[i] is the best-matching candidate for picture i."""
    if len(pixels) != len(prompts) or not len(prompts):
        raise LmstackError(f"clip_agreement needs one prompt per picture, got {len(pixels)} and {len(prompts)}")
    clip.eval()
    max_len = clip.config.text.max_seq_len
    img = torch.cat([clip.encode_image(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    unique = sorted(set(prompts) | set(candidates or ()))
    txt = clip.encode_text(tokenize(tok, unique, max_len))
    index = {p: i for i, p in enumerate(unique)}
    cos = (img * txt[[index[p] for p in prompts]]).sum(-1).double().numpy()
    out = {"mean": float(cos.mean()), "n": int(cos.size),
           "stderr": float(cos.std(ddof=1) / math.sqrt(cos.size)) if cos.size > 1 else float("nan")}
    if candidates:
        cand = [index[p] for p in candidates]
        best = (img @ txt[cand].T).argmax(-1).tolist()
        out["top1"] = rate([candidates[b] == p for b, p in zip(best, prompts)])
    return out


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise LmstackError(f"frechet_distance needs two (N, D) feature sets with the same D and N >= 2, "
                           f"got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: the usual epsilon on the diagonal
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
