"""The shapes world's text side: every sentence the world can say, and one small BPE tokenizer trained on them
with an `<image>` placeholder token, shared by CLIP's text encoder, the VLMs and the server.

The tokenizer is a real lmstack Tokenizer (byte-level BPE with the chat specials), so a VLM saved with it loads
in `lmstack serve` and `lmstack chat` like any model directory. `<image>` marks where a picture's tokens go in
a prompt; the VLM replaces it by the picture's vectors (multimodal/vlm.py).

Usage:
    from lmstack.multimodal.text import IMAGE_TOKEN, collate, shapes_texts, shapes_tokenizer
    tok = shapes_tokenizer(vocab_size=512)                  # trained on a fixed 400-image world, seed 0
    ids = tok.encode("A picture of a small red circle.")
    image_id = tok.token_to_id(IMAGE_TOKEN)
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.tokenizer.vocab_ops import add_tokens

IMAGE_TOKEN = "<image>"
IGNORE = -100
"""The label of a position that is not a target (torch's cross_entropy ignore_index)."""


def shapes_texts(records: list[dict]) -> list[str]:
    """Every caption, question, answer, referring expression and reasoning step of the records."""
    out: list[str] = []
    for rec in records:
        out.extend(rec["captions"])
        for item in rec["vqa"]:
            out += [item["question"], item["answer"]]
        out.extend(r["expression"] for r in rec["referring"])
        for item in rec["multistep"]:
            out += [item["question"], item["answer"]] + [step["text"] for step in item["chain"]]
    return out


def shapes_tokenizer(vocab_size: int = 512, n_images: int = 400, seed: int = 0) -> Tokenizer:
    """A BPE tokenizer for the shapes world, `<image>` added as a special token (deterministic in its args).

    The world's vocabulary is closed (a few hundred words), so a few hundred merges make most words one token:
    short sequences, which is what a 2-core budget needs."""
    if vocab_size < 300:
        raise LmstackError(f"vocab_size={vocab_size} is too small for a byte-level BPE (256 bytes + specials); "
                           "use 300 or more")
    texts = shapes_texts(build_vision_world(n_images=n_images, size=64, seed=seed))
    tok = train_tokenizer(type="bpe", vocab_size=vocab_size, texts=texts, show_progress=False)
    return add_tokens(tok, [IMAGE_TOKEN], special=True)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) rows -> right-padded (B, T) tensors; padding is never a target, and a causal model never
    looks right, so right padding changes no real position's output."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, lab) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(lab)] = torch.tensor(lab)
    return ids, labels
