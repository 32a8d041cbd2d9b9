"""Unified image tokens (issue 24, XII.6): a VQ-VAE's codes join the LM's vocabulary, so ONE decoder Transformer
reads and writes pictures (Chameleon / "images as a foreign language" at toy scale).

The vocabulary is the text tokenizer's ids, then <boi> and <eoi> (begin/end of image), then one id per code:
    [0, text)  text  |  text  <boi>  |  text+1  <eoi>  |  [text+2, text+2+K)  image codes
Two kinds of training rows share one next-token loss, each scored only on its answer part:
    text -> image:  <bos> caption <boi> c_1 ... c_n <eoi>      (loss on the codes and <eoi>)
    image -> text:  <boi> c_1 ... c_n <eoi> caption <eos>       (loss on the caption and <eos>)
Decoding is constrained to the answer's kind: an image is exactly grid*grid code ids (so it always decodes), a
caption only text ids. Turning ids back into codes refuses, naming it, any id that is not an image code.

Judges for the benchmark, tested here: `caption_pairs` reads the (colour, shape) pairs a caption names, and
`colour_fractions` measures how much of a picture is each named colour of the shapes world, by nearest
palette entry (the colour check of a generated image, tolerant of a decoder's blur).

Usage:
    from lmstack.multimodal.unified import UnifiedVocab, unified_model, train_unified, generate_image_codes
    vocab = UnifiedVocab(tok.vocab_size, codebook_size=256, image_tokens=64)
    model = unified_model(vocab, d_model=128, n_layers=4)                # the one Transformer, bigger vocab
    train_unified(model, vocab, tok, captions, codes, steps=400)         # codes from VQVAE.encode
    codes = generate_image_codes(model, vocab, tok, ["In this image you can see a small red circle."])
    pixels = vq.decode(codes)
    texts = generate_captions(model, vocab, tok, vq.encode(pixels))
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.multimodal.shapes import BACKGROUNDS, COLOURS, SHAPES
from lmstack.multimodal.text import IGNORE, collate



@dataclass(frozen=True)
class UnifiedVocab:
    """Where text, <boi>/<eoi> and the image codes sit in the one vocabulary."""

    text_size: int
    codebook_size: int
    image_tokens: int
    """Codes per image (the VQ grid's cells)."""

    def __post_init__(self):
        if min(self.text_size, self.codebook_size, self.image_tokens) < 1:
            raise LmstackError(f"text_size, codebook_size and image_tokens must be >= 1, got {self}")

    @property
    def boi(self) -> int:
        return self.text_size

    @property
    def eoi(self) -> int:
        return self.text_size + 1

    @property
    def offset(self) -> int:
        """Id of code 0."""
        return self.text_size + 2

    @property
    def size(self) -> int:
        return self.offset + self.codebook_size

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes).long()
        if ((codes < 0) | (codes >= self.codebook_size)).any():
            raise LmstackError(f"a code is outside the codebook (0..{self.codebook_size - 1})")
        return codes + self.offset

    def codes_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids -> codes; an id that is not an image code raises, naming the id."""
        ids = torch.as_tensor(ids).long()
        bad = (ids < self.offset) | (ids >= self.size)
        if bad.any():
            raise LmstackError(f"token id {int(ids[bad][0])} is not an image code: image ids are {self.offset}.."
                               f"{self.size - 1} (codebook of {self.codebook_size})")
        return ids - self.offset


def unified_model(vocab: UnifiedVocab, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                  max_seq_len: int = 160, **overrides) -> Transformer:
    """The one decoder Transformer over the unified vocabulary."""
    return Transformer(ModelConfig(vocab_size=vocab.size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                   max_seq_len=max_seq_len, **overrides))


def text_to_image_row(vocab: UnifiedVocab, tok, caption: str, codes: torch.Tensor) -> tuple[list[int], list[int]]:
    """(ids, labels) for `<bos> caption <boi> codes <eoi>`; labels mark the codes and <eoi> (IGNORE elsewhere)."""
    prompt = [tok.bos_id] + tok.encode(caption) + [vocab.boi]
    answer = vocab.image_ids(codes).tolist() + [vocab.eoi]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def image_to_text_row(vocab: UnifiedVocab, tok, codes: torch.Tensor, caption: str) -> tuple[list[int], list[int]]:
    """(ids, labels) for `<boi> codes <eoi> caption <eos>`; labels mark the caption and <eos>."""
    prompt = [vocab.boi] + vocab.image_ids(codes).tolist() + [vocab.eoi]
    answer = tok.encode(caption) + [tok.eos_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def unified_loss(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the marked positions."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def train_unified(model: Transformer, vocab: UnifiedVocab, tok, captions: list[str], codes: torch.Tensor,
                  steps: int = 400, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                  log_every: int = 0) -> list[dict]:
    """Both directions of every (caption, codes) pair, mixed in each batch; AdamW with a cosine schedule."""
    if len(captions) != len(codes) or not captions:
        raise LmstackError(f"need one caption per image and at least one: {len(captions)} captions, "
                           f"{len(codes)} code rows")
    if codes.shape[1] != vocab.image_tokens:
        raise LmstackError(f"codes have {codes.shape[1]} per image, the vocabulary expects {vocab.image_tokens}")
    rows = [text_to_image_row(vocab, tok, c, x) for c, x in zip(captions, codes)]
    rows += [image_to_text_row(vocab, tok, x, c) for c, x in zip(captions, codes)]
    longest = max(len(r[0]) for r in rows)
    if longest > model.config.max_seq_len:
        raise LmstackError(f"a training row has {longest} tokens, over max_seq_len={model.config.max_seq_len}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    history = []
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(rows), (batch_size,), generator=gen).tolist()
        ids, labels = collate([rows[i] for i in pick], tok.pad_id)
        loss = unified_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (log_every and step % log_every == 0) or step == steps:
            history.append({"step": step, "loss": float(loss.detach())})
    model.eval()
    return history


def _allowed_mask(vocab: UnifiedVocab, kind: str, device) -> torch.Tensor:
    mask = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    if kind == "image":
        mask[vocab.offset:] = True
    else:
        mask[:vocab.text_size] = True
    return mask


@torch.no_grad()
def _decode(model: Transformer, prompt: torch.Tensor, steps: int, allowed: torch.Tensor, temperature: float,
            top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """Constrained incremental decoding with the model's KV cache: (B, P) prompt -> (B, steps) new ids."""
    model.eval()
    cache = model.new_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + steps)
    logits = model(prompt, cache)[:, -1]
    out = []
    for i in range(steps):
        logits = logits.float().masked_fill(~allowed, float("-inf"))
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        out.append(nxt)
        if i + 1 < steps:
            logits = model(nxt[:, None], cache)[:, -1]
    return torch.stack(out, 1)


def generate_image_codes(model: Transformer, vocab: UnifiedVocab, tok, captions: list[str],
                         temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
    """Captions -> (N, image_tokens) codes, sampled token by token from image ids only."""
    gen = torch.Generator().manual_seed(seed)
    allowed = _allowed_mask(vocab, "image", next(model.parameters()).device)
    prompts = [[tok.bos_id] + tok.encode(c) + [vocab.boi] for c in captions]
    out = torch.zeros(len(prompts), vocab.image_tokens, dtype=torch.long)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):  # equal-length groups: no padding inside a batch
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        batch = torch.tensor([prompts[i] for i in idx])
        ids = _decode(model, batch, vocab.image_tokens, allowed, temperature, top_k, gen)
        out[idx] = vocab.codes_of(ids)
    return out


def generate_captions(model: Transformer, vocab: UnifiedVocab, tok, codes: torch.Tensor,
                      max_tokens: int = 40) -> list[str]:
    """(N, image_tokens) codes -> greedy captions, text ids only, each cut at its first <eos>."""
    codes = torch.as_tensor(codes)
    if codes.dim() != 2 or codes.shape[1] != vocab.image_tokens:
        raise LmstackError(f"codes must have shape (N, {vocab.image_tokens}), got {tuple(codes.shape)}")
    allowed = _allowed_mask(vocab, "text", next(model.parameters()).device)
    boi = torch.full((len(codes), 1), vocab.boi)
    eoi = torch.full((len(codes), 1), vocab.eoi)
    ids = _decode(model, torch.cat([boi, vocab.image_ids(codes), eoi], 1), max_tokens, allowed, 0.0, 0, None)
    texts = []
    for row in ids.tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")(?:e?s)?\b")


def caption_pairs(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. 'a small red circle and a blue star' -> {(red, circle),
    (blue, star)}."""
    return {(m.group(1), m.group(2)) for m in _PAIR.finditer(text.lower())}


def colour_fractions(pixels: torch.Tensor, tolerance: float = 100.0) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> (N, len(COLOURS)): the fraction of each picture's pixels that count as each named
    colour, in COLOURS order. A pixel counts as colour c when c is its nearest entry of the world's palette (the
    8 object colours and the 3 backgrounds; Euclidean in 0..255 RGB) and lies within `tolerance` of it: so a
    rendered picture's pixels count exactly, a decoded picture's blurred ones count for the colour they are
    closest to, and a background or texture pixel counts for none."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise LmstackError(f"pixels must have shape (N, 3, S, S), got {tuple(pixels.shape)}")
    rgb = (pixels.clamp(-1, 1) + 1) * 127.5  # (N, 3, S, S)
    palette = torch.tensor(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=rgb.dtype)  # (C+B, 3)
    dist = (rgb[:, None] - palette[None, :, :, None, None]).pow(2).sum(2).sqrt()  # (N, C+B, S, S)
    best, which = dist.min(1)
    n = len(COLOURS)
    hits = F.one_hot(which, len(palette))[..., :n] * (best < tolerance)[..., None]  # (N, S, S, C)
    return hits.float().mean((1, 2))


__all__ = ["UnifiedVocab", "unified_model", "text_to_image_row", "image_to_text_row", "collate", "unified_loss",
           "train_unified", "generate_image_codes", "generate_captions", "caption_pairs", "colour_fractions",
           "IGNORE"]
