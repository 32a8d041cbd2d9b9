"""A VLM as a model the inference engine can run: pictures become placeholder token ids keyed by their pixels.

The engine (lmstack.infer) runs token ids through a paged KV cache and caches prompt prefixes by a chained hash
of their token ids (block_manager.py). A prefix-token VLM (LLaVA projector or Q-Former: the picture's vectors
take the place of `<image>` tokens in the LM's input) fits it without touching its hot path:

- each distinct picture (multimodal/images.image_hash: its decoded pixels) gets its own range of
  n_image_tokens placeholder ids >= the LM's vocabulary, from a counter that never hands out an id twice;
- its projected vectors (VLM.encode_images) are computed once and kept in a bounded LRU `ImageStore`, pinned
  while a request uses them (a preempted request recomputes its prompt, so they must outlive one step);
- `VLMEngineModel.forward` embeds ids < vocab with the LM's table and placeholder ids from the store, then runs
  the LM with `inputs_embeds` and the engine's cache. A step without placeholders is the LM's own call.
So the block hash IS keyed on the picture: the same picture in another request hits the prefix cache, and a
picture evicted and sent again gets fresh ids, so stale K/V can never be read for a different picture. The
sampler only ever sees the LM's real vocabulary (the head has vocab rows), so it never emits a placeholder.

`ImagePrompt` joins pictures to a rendered chat: each image part becomes a marker character (U+E000, private
use) in the message text, the chat template renders as usual (text still encoded with special tokens off), and
`expand` swaps each marker's ids for that picture's placeholder ids, checking that every marker survived.

Flamingo-style VLMs (fusion="xattn") read the picture through cross-attention at every layer, not as prefix
tokens, so their K/V depend on the picture outside the token stream: `engine_model` refuses them.

Usage:
    model, tok = load_engine_vlm("runs/vlm")       # or engine_model(vlm), or VLMEngineModel(lm, encode, 64, 16)
    engine = LLMEngine(model, tokenizer=tok, cuda_graphs=False)
    prompt = ImagePrompt(model, tok)
    text = prompt.add(pil_image) + " what colour is the circle?"
    ids = tok.render_messages([{"role": "user", "content": text}], True).ids
    ids, lease = prompt.expand(ids)            # placeholders in place of the marker; the picture pinned
    with lease:
        engine.add_request("r1", ids, SamplingParams(max_tokens=8)); engine.run_to_completion()
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.vocab import PAD_LOGIT
from lmstack.multimodal.images import image_hash, to_pixels
from lmstack.multimodal.vlm import load_vlm
from lmstack.tokenizer import load_tokenizer

IMAGE_MARKER = "\ue000"
"""What an image part becomes in the message text before the chat template renders it (a private-use character:
no tokenizer trained on real text merges its bytes with a neighbour's)."""


class _Entry:
    __slots__ = ("key", "slot", "vectors", "pins")

    def __init__(self, key: str, slot: int, vectors: torch.Tensor):
        self.key, self.slot, self.vectors, self.pins = key, slot, vectors, 0


class ImageStore:
    """Picture hash -> (slot, projected vectors (n_tokens, d)). Slots come from a counter that never reuses one;
    unpinned entries past `capacity` are evicted oldest first. Thread-safe: requests are prepared in worker threads
    while the engine steps in another."""

    def __init__(self, n_tokens: int, capacity: int = 64):
        if n_tokens < 1 or capacity < 1:
            raise LmstackError(f"n_tokens and capacity must be >= 1, got {n_tokens} and {capacity}")
        self.n_tokens, self.capacity = n_tokens, capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_slot: dict[int, _Entry] = {}
        self._next_slot = 0
        self.encoded = 0  # pictures run through the encoder, in total
        self.reused = 0  # pictures found already encoded, in total

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, keys: list[str], encode: Callable[[list[int]], torch.Tensor]) -> list[int]:
        """Pin each key's entry (encoding the missing ones in one batch: encode(indices into keys) -> (m, n, d));
        returns each key's slot. A key twice in `keys` is encoded once and pinned twice."""
        slots: dict[str, int] = {}
        with self._lock:
            missing = []
            for k in dict.fromkeys(keys):
                e = self._entries.get(k)
                if e is None:
                    missing.append(k)
                else:
                    e.pins += keys.count(k)
                    self._entries.move_to_end(k)
                    slots[k] = e.slot
                    self.reused += 1
        if missing:  # encoded outside the lock: the engine's forward reads the store meanwhile
            first = {k: keys.index(k) for k in missing}
            vectors = encode([first[k] for k in missing])
            if vectors.shape[:2] != (len(missing), self.n_tokens):
                raise LmstackError(f"the image encoder returned {tuple(vectors.shape)}; expected "
                                   f"({len(missing)}, {self.n_tokens}, d)")
            with self._lock:
                for k, v in zip(missing, vectors):
                    e = self._entries.get(k)
                    if e is None:  # (another thread may have added it meanwhile: keep theirs)
                        e = _Entry(k, self._next_slot, v.detach())
                        self._next_slot += 1
                        self._entries[k] = e
                        self._by_slot[e.slot] = e
                        self.encoded += 1
                    e.pins += keys.count(k)
                    slots[k] = e.slot
                self._evict()
        return [slots[k] for k in keys]

    def release(self, keys: list[str]) -> None:
        """Unpin (once per key given); entries beyond capacity may then be evicted."""
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None or e.pins < 1:
                    raise LmstackError(f"image {k[:12]} released more often than it was acquired")
                e.pins -= 1
            self._evict()

    def _evict(self) -> None:
        if len(self._entries) <= self.capacity:
            return
        for k in [k for k, e in self._entries.items() if e.pins == 0]:
            if len(self._entries) <= self.capacity:
                break
            e = self._entries.pop(k)
            del self._by_slot[e.slot]

    def live(self, slot: int) -> bool:
        with self._lock:
            return slot in self._by_slot

    def table(self, slots: list[int]) -> torch.Tensor:
        """(len(slots), n_tokens, d): the stored vectors of these slots; LmstackError for one not stored."""
        with self._lock:
            gone = [s for s in slots if s not in self._by_slot]
            if gone:
                raise LmstackError(f"image slot {gone[0]} is not in the image store (evicted or never added); "
                                   "a request must hold its images' lease until it finishes")
            return torch.stack([self._by_slot[s].vectors for s in slots])


class VLMEngineModel(nn.Module):
    """The model the engine runs for a prefix-token VLM: the LM's config, head and cache interface, with placeholder
    ids >= vocab_size read from an ImageStore. `encoder` is the module that owns the vision weights (so `.to()`
    moves them); `encode_images(pixels (N, 3, S, S) in [-1, 1]) -> (N, n_image_tokens, d_lm)` is what the LM's
    input takes at an `<image>` position (before any embedding scale: the LM applies that to inputs_embeds too)."""

    def __init__(self, lm: nn.Module, encode_images: Callable[[torch.Tensor], torch.Tensor], image_size: int,
                 n_image_tokens: int, encoder: nn.Module | None = None, store_capacity: int = 64,
                 image_token_id: int | None = None):
        super().__init__()
        cfg = lm.config
        if not cfg.causal or cfg.head != "lm":
            raise LmstackError("a VLM's language model must be causal with an LM head to be served")
        self.lm = lm  # registered first: next(parameters()) is the LM's, the device and dtype the engine reads
        self.encoder = encoder
        self.config = cfg
        self._encode = encode_images
        self.image_size, self.n_image_tokens = int(image_size), int(n_image_tokens)
        self.vocab_size = cfg.vocab_size
        self.image_token_id = image_token_id  # never sampled: a generated <image> has no picture behind it
        self.store = ImageStore(self.n_image_tokens, store_capacity)

    # ---- what the engine's runner reads besides forward
    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm.head(x)
        if self.image_token_id is not None:  # as VLM.generate does
            logits[..., self.image_token_id] = max(PAD_LOGIT, torch.finfo(logits.dtype).min)
        return logits

    @property
    def rope(self):
        return self.lm.rope

    @property
    def alibi_slopes(self) -> torch.Tensor:
        return self.lm.alibi_slopes

    # ---- pictures -> placeholder ids
    def placeholder_ids(self, slot: int) -> list[int]:
        base = self.vocab_size + slot * self.n_image_tokens
        return list(range(base, base + self.n_image_tokens))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.lm.parameters())
        return self._encode(pixels.to(device=p.device, dtype=p.dtype))

    def acquire(self, images: list[Image.Image]) -> tuple[list[str], list[list[int]]]:
        """Pin the pictures (encoding the new ones once, in one batch); (their keys, their placeholder ids)."""
        keys = [image_hash(img) for img in images]
        slots = self.store.acquire(keys, lambda idx: self.encode_pixels(
            to_pixels([images[i] for i in idx], self.image_size)))
        return keys, [self.placeholder_ids(s) for s in slots]

    def check_prompt_ids(self, ids: list[int]) -> bool:
        """Whether every id >= vocab_size in `ids` is a placeholder of a picture now in the store (the engine's
        request builder asks before accepting such a prompt)."""
        n, v = self.n_image_tokens, self.vocab_size
        return all(t >= v and self.store.live((t - v) // n) for t in ids if t >= v) and all(t >= 0 for t in ids)

    # ---- the forward the engine runs
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """ids (B, T) with placeholders -> input vectors (B, T, d_model)."""
        v, n = self.vocab_size, self.n_image_tokens
        mask = idx >= v
        x = self.lm.tok_emb(idx.masked_fill(mask, 0))
        off = idx[mask] - v
        slots, inverse = torch.unique(off // n, return_inverse=True)
        table = self.store.table(slots.tolist()).to(device=x.device, dtype=x.dtype)
        x[mask] = table[inverse, off % n]
        return x

    def forward(self, idx: torch.Tensor, cache=None, *, return_hidden: bool = False, **kwargs):
        if int(idx.max()) < self.vocab_size:  # text only (every decode step): the LM's own call
            return self.lm(idx, cache, return_hidden=return_hidden, **kwargs)
        return self.lm(inputs_embeds=self.embed(idx), cache=cache, return_hidden=return_hidden, **kwargs)


class ImageLease:
    """The pins one request holds on its pictures; release() (or leaving a `with`) unpins them, once."""

    def __init__(self, store: ImageStore | None = None, keys: list[str] | None = None):
        self.store, self.keys = store, list(keys or [])

    def release(self) -> None:
        if self.store is not None and self.keys:
            keys, self.keys = self.keys, []
            self.store.release(keys)

    def __enter__(self) -> "ImageLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ImagePrompt:
    """The pictures of one prompt, in order: `add` returns the marker to put in the message text; after the chat
    template rendered the ids, `expand` puts each picture's placeholder ids where its marker's ids are."""

    def __init__(self, model: VLMEngineModel, tokenizer, max_images: int | None = None):
        self.model, self.tokenizer, self.max_images = model, tokenizer, max_images
        self.images: list[Image.Image] = []
        self.marker_ids = tokenizer.encode(IMAGE_MARKER, allow_special=False)
        if not self.marker_ids:
            raise LmstackError("the tokenizer encodes the image marker U+E000 to nothing; it cannot place pictures")

    def add(self, image: Image.Image) -> str:
        if self.max_images is not None and len(self.images) >= self.max_images:
            raise LmstackError(f"too many images: this server takes at most {self.max_images} per request")
        self.images.append(image)
        return IMAGE_MARKER

    def expand(self, ids: list[int]) -> tuple[list[int], ImageLease]:
        """Rendered ids with markers -> ids with placeholders, and the lease pinning the pictures."""
        if not self.images:
            return list(ids), ImageLease()
        m = self.marker_ids
        at, i = [], 0
        while i <= len(ids) - len(m):
            if ids[i:i + len(m)] == m:
                at.append(i)
                i += len(m)
            else:
                i += 1
        if len(at) != len(self.images):
            raise LmstackError(f"the rendered prompt has {len(at)} image markers for {len(self.images)} images: the "
                               "chat template dropped or merged one, or the text itself contains U+E000 (the "
                               "server's image marker), which message text may not")
        keys, placeholders = self.model.acquire(self.images)
        out, prev = [], 0
        for pos, ph in zip(at, placeholders):
            out += ids[prev:pos] + ph
            prev = pos + len(m)
        return out + ids[prev:], ImageLease(self.model.store, keys)


def check_prefix_vlm(fusion: str) -> None:
    """Refuse a VLM the engine cannot cache: one that reads pictures by cross-attention (Flamingo)."""
    if fusion == "xattn":
        raise LmstackError("this VLM uses Flamingo-style cross-attention (fusion='xattn'): its layers read the "
                           "picture outside the token stream, so the engine's paged KV cache and prefix cache cannot "
                           "hold it; serve a projector or Q-Former VLM (fusion='mlp' or 'qformer'), or caption with "
                           "lmstack mm caption")


def engine_model(vlm: nn.Module, store_capacity: int = 64) -> VLMEngineModel:
    """A VLM (multimodal/vlm.py) as the engine's model; a Flamingo VLM is refused (check_prefix_vlm)."""
    cfg = vlm.config
    check_prefix_vlm(cfg.fusion)
    return VLMEngineModel(vlm.lm, vlm.encode_images, cfg.vision.image_size, vlm.n_image_tokens, encoder=vlm,
                          store_capacity=store_capacity, image_token_id=vlm.image_token_id)


def is_vlm_dir(path: str | os.PathLike) -> bool:
    """Whether a model directory holds a VLM (config.json with a "vlm" section, as save_vlm writes it)."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "vlm" in data


def load_engine_vlm(path: str | os.PathLike, store_capacity: int = 64) -> tuple[VLMEngineModel, object]:
    """(the engine's model, the tokenizer) of a VLM directory written by save_vlm."""
    return engine_model(load_vlm(path), store_capacity), load_tokenizer(path)
