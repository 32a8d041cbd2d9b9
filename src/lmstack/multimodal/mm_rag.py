"""Multimodal RAG (issue 24 XII.10): stored pictures in the rag issue's Index, found by text or by a picture, and
read by a VLM to answer questions whose answer only a stored picture holds.

The store is rag.index.Index itself (SQLite, the same file, BM25 and dense search), not a parallel one. Index.add
embeds a document's text with the index's embedder, which cannot embed a picture, so an image document is
written beside that path, straight into the Index's own store with an externally computed vector:

    Document(doc_id, text=the picture's caption or the turn that showed it,
             metadata={"kind": "image", "png": <base64 PNG>})     + one Chunk whose vector is CLIP's image vector

The index's embedder is ClipEmbedder (CLIP's text tower, a rag.types.Embedder), so a text query searched in
"dense" mode is CLIP text->image retrieval, "bm25" matches the stored text, and "hybrid" fuses the two; an image
query (search_image) is CLIP image->image retrieval over the same vectors. The picture's PNG travels in the
document's metadata, so an index on disk is whole in its one file (written atomically by the Index).

Answering the world_link questions (answer_link_question):
- image-only ("What shape is the emblem on the flag of Amberhaven?"): with retrieval, the question's text finds
  the flag (bm25 on the stored caption: a CLIP trained on shapes captions has never seen a city name), and the
  reader reads the picture with the entity's name replaced by "this flag"; without, the reader gets the question
  and no picture.
- joins ("<image> What is the population of the city whose flag this is?"): with retrieval, the shown picture
  finds the stored flag (dense, CLIP image vectors) and the text world's fact table answers for its entity;
  without, the reader sees the shown picture and the question, and nothing else.

A reader is anything with read(prompt, pixels) -> text (pixels (1, 3, S, S) in [-1, 1], or None for no
picture), such as VLMReader over multimodal.vlm.VLM; answers are parsed with cot.parse_answer ("Answer: X").
Retrieval is filtered by the question's kind of picture (a badge question never retrieves a flag).

Usage:
    from lmstack.multimodal.mm_rag import ClipEmbedder, ImageIndex, answer_link_question
    index = ImageIndex.create(ClipEmbedder(clip, tok), path=None)          # or a directory
    index.add_images(["flag-Amberhaven"], pixels, ["The flag of Amberhaven: a large red star ..."])
    add_link_records(index, build_world_link(world))                      # every flag and badge
    hits = index.search("flag of Amberhaven", k=1, mode="bm25")          # ImageHit(doc_id, score, text, pixels)
    hits = index.search_image(photo_pixels, k=1, where={"picture": "flag"})
    reader = VLMReader(vlm, tok)                                          # read(prompt, pixels) -> text
    out = answer_link_question(item, index, reader, world, retrieval=True)  # {"answer", "correct", "hit"}
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import tokenize
from lmstack.multimodal.cot import parse_answer
from lmstack.multimodal.images import decode_image, from_pixels, to_pixels
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN
from lmstack.rag.index import Index
from lmstack.rag.types import Chunk, Document

IMAGE_KIND = "image"


class Reader(Protocol):
    """A model that answers a prompt about an optional picture (the VLM)."""

    def read(self, prompt: str, pixels: torch.Tensor | None) -> str:
        ...


class VLMReader:
    """A Reader over multimodal.vlm.VLM: the prompt tokenized (BOS first), `<image>` expanded, greedy decoding to EOS."""

    def __init__(self, vlm, tok, max_new_tokens: int = 32):
        self.vlm, self.tok, self.max_new_tokens = vlm, tok, max_new_tokens

    def read(self, prompt: str, pixels: torch.Tensor | None) -> str:
        ids = [self.tok.bos_id] + self.tok.encode(prompt)
        has_image = self.vlm.image_token_id in ids
        if has_image != (pixels is not None):
            raise LmstackError("a prompt with <image> needs pixels, and pixels need an <image> in the prompt")
        ids = torch.tensor([self.vlm.expand_prompt(ids)])
        room = self.vlm.config.lm.max_seq_len - ids.shape[1]
        if room < 1:
            raise LmstackError(f"prompt of {ids.shape[1]} tokens leaves no room to answer "
                               f"(max_seq_len={self.vlm.config.lm.max_seq_len})")
        new = self.vlm.generate(ids, pixels, max_new_tokens=min(self.max_new_tokens, room),
                                eos_token_id=self.tok.eos_id)
        return self.tok.decode(new[0])


class ClipEmbedder:
    """CLIP as a rag.types.Embedder: embed() is the text tower, embed_images() the vision tower, both unit vectors.

    `name` fingerprints the weights, so an index built with one CLIP refuses to be searched with another."""

    def __init__(self, model, tok, name: str | None = None):
        self.model, self.tok = model, tok
        self.dim = int(model.config.embed_dim)
        self.image_size = int(model.config.vision.image_size)
        if name is None:
            h = hashlib.sha256()
            for key, value in sorted(model.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().float().cpu().numpy().tobytes())
            name = f"clip-{h.hexdigest()[:12]}"
        self.name = name

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        max_len = self.model.config.text.max_seq_len
        out = [self.model.encode_text(tokenize(self.tok, texts[i:i + batch_size], max_len))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = [self.model.encode_image(pixels[i:i + batch_size]) for i in range(0, pixels.shape[0], batch_size)]
        return torch.cat(out).float().cpu().numpy()


@dataclass
class ImageHit:
    """One retrieved picture: its document id, score, stored text, pixels (1, 3, S, S) and metadata."""
    doc_id: str
    score: float
    text: str
    pixels: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)


def _png_b64(pixels: torch.Tensor) -> str:
    buf = io.BytesIO()
    from_pixels(pixels[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ImageIndex:
    """Pictures (and any text documents) in one rag Index; see the module docstring. The embedder is a
    ClipEmbedder, or anything with name, dim, embed(texts) and embed_images(pixels) giving unit vectors."""

    def __init__(self, index: Index, embedder, image_size: int):
        self.index, self.embedder, self.image_size = index, embedder, image_size

    @classmethod
    def create(cls, embedder, path: str | os.PathLike | None = None, image_size: int | None = None,
               overwrite: bool = False) -> "ImageIndex":
        """An empty index (in memory when `path` is None); pictures are read back at `image_size` (CLIP's)."""
        index = Index.build([], embedder, path=path, overwrite=overwrite)
        size = image_size or getattr(embedder, "image_size", None)
        if size is None:
            raise LmstackError("pass image_size=: the embedder does not say what picture size it reads")
        index.store.set_settings({"image_size": int(size)})
        return cls(index, embedder, int(size))

    @classmethod
    def open(cls, path: str | os.PathLike, embedder) -> "ImageIndex":
        """An index `create(path=...)` made, possibly in another process (memory across conversations)."""
        index = Index.open(path, embedder)
        size = index.store.settings().get("image_size")
        if size is None:
            raise LmstackError(f"{path} is a text index, not an image index (no image_size setting)")
        return cls(index, embedder, int(size))

    def __len__(self) -> int:
        return len(self.index)

    def add_images(self, doc_ids: list[str], pixels: torch.Tensor, texts: list[str],
                   metadata: list[dict] | None = None) -> int:
        """Store pictures (N, 3, S, S) in [-1, 1] with their texts; the vector of each is CLIP's image vector."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise LmstackError(f"pixels must be a (N, 3, S, S) tensor, got {getattr(pixels, 'shape', pixels)!r}")
        if not len(doc_ids) == pixels.shape[0] == len(texts):
            raise LmstackError(f"{len(doc_ids)} ids, {pixels.shape[0]} pictures and {len(texts)} texts: "
                               "give one id and one text per picture")
        metadata = metadata or [{} for _ in doc_ids]
        if len(metadata) != len(doc_ids):
            raise LmstackError(f"{len(metadata)} metadata dicts for {len(doc_ids)} pictures")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise LmstackError("every stored picture needs a non-empty text (its caption or the turn that showed it)")
        vectors = self.embedder.embed_images(pixels)
        docs, chunks = [], []
        for doc_id, px, text, meta in zip(doc_ids, pixels, texts, metadata):
            docs.append(Document(doc_id, text, "image", dict(meta, kind=IMAGE_KIND, png=_png_b64(px))))
            chunks.append(Chunk(f"{doc_id}#0", doc_id, text, "image", 0, len(text),
                                metadata=dict(meta, kind=IMAGE_KIND)))
        self.index.store.add(docs, chunks, vectors)  # the Index's BM25 sees the new generation and rebuilds
        return len(docs)

    def add_texts(self, docs: list[Document]) -> int:
        """Text documents, embedded by CLIP's text tower like any rag document."""
        return self.index.add(docs)

    def get(self, doc_id: str) -> ImageHit:
        """The stored picture `doc_id` (score 1.0), read back from the index."""
        return self._hit(doc_id, 1.0)

    def _hit(self, doc_id: str, score: float) -> ImageHit:
        doc = self.index.document(doc_id)
        meta = dict(doc.metadata)
        png = meta.pop("png", None)
        if png is None:
            raise LmstackError(f"document {doc_id!r} is text, not a picture")
        pixels = to_pixels([decode_image(base64.b64decode(png))], self.image_size)
        return ImageHit(doc_id, score, doc.text, pixels, meta)

    @staticmethod
    def _keep(chunk: Chunk, where: dict | None) -> bool:
        meta = chunk.metadata
        return meta.get("kind") == IMAGE_KIND and all(meta.get(k) == v for k, v in (where or {}).items())

    def search(self, query: str, k: int = 1, mode: str = "bm25", where: dict | None = None) -> list[ImageHit]:
        """The k best pictures for a text query (bm25: their texts; dense: CLIP text->image; hybrid: both);
        `where` keeps only pictures whose metadata has those values (e.g. {"picture": "flag"})."""
        hits = self.index.search(query, k=max(4 * k, 20), mode=mode)
        return [self._hit(h.chunk.doc_id, h.score) for h in hits if self._keep(h.chunk, where)][:k]

    def search_image(self, pixels: torch.Tensor, k: int = 1, where: dict | None = None) -> list[ImageHit]:
        """The k stored pictures nearest to `pixels` (1, 3, S, S) by CLIP image vectors (cosine); `where` as in
        search. Exact search over every stored vector, so a filter never starves the result."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] != 1:
            raise LmstackError(f"search_image takes one picture (1, 3, S, S), got {getattr(pixels, 'shape', None)}")
        found = self.index.store.search(self.embedder.embed_images(pixels)[0], len(self.index.store))
        chunks = {c.chunk_id: c for c in self.index.store.get([i for i, _ in found], skip_missing=True)}
        ranked = [(cid, s) for cid, s in found if cid in chunks and self._keep(chunks[cid], where)]
        return [self._hit(chunks[cid].doc_id, s) for cid, s in ranked[:k]]

    def close(self) -> None:
        self.index.close()


def add_link_records(index: ImageIndex, records: list[dict]) -> int:
    """Store world_link flags/badges: id = the record's id, text = its caption, metadata = kind and entity."""
    if not records:
        return 0
    pixels = to_pixels([render(Scene.from_dict(r["scene"])) for r in records], index.image_size)
    return index.add_images([r["id"] for r in records], pixels, [r["caption"] for r in records],
                            [{"picture": r["kind"], "entity": r["entity"]} for r in records])


_OWNER = {"flag_shape": ("flag", "city"), "flag_colour": ("flag", "city"), "badge_shape": ("badge", "person")}
_JOIN_KIND = {"which_city": "flag", "city_fact": "flag", "who_badge": "badge", "person_fact": "badge"}


def reading_prompt(item: dict) -> str:
    """The image-only question with the entity's name replaced by 'this flag'/'this badge', after the picture."""
    kind, arg = _OWNER[item["type"]]
    question = item["question"].replace(f"the {kind} of {item['args'][arg]}", f"this {kind}")
    return f"{IMAGE_TOKEN} Question: {question}"


def answer_link_question(item: dict, index: ImageIndex, reader: Reader, world, retrieval: bool = True,
                         shown: torch.Tensor | None = None, mode: str = "bm25") -> dict:
    """Answer one world_link question; `shown` is the picture the user shows (join questions).

    Returns answer, correct, and with retrieval the retrieved doc id and whether it is the right picture."""
    if item.get("shown") and shown is None:
        raise LmstackError(f"question type {item['type']!r} shows a picture: pass shown= its pixels")
    out: dict = {"type": item["type"], "retrieved": None, "hit": None}
    if item["type"] in _OWNER:
        if retrieval:
            hits = index.search(item["question"], k=1, mode=mode, where={"picture": _OWNER[item["type"]][0]})
            out["retrieved"] = hits[0].doc_id if hits else None
            pixels = hits[0].pixels if hits else None
            text = reader.read(reading_prompt(item), pixels) if hits else ""
        else:
            text = reader.read(f"Question: {item['question']}", None)
        answer = parse_answer(text)
    elif retrieval:
        hits = index.search_image(shown, k=1, where={"picture": _JOIN_KIND[item["type"]]})
        out["retrieved"] = hits[0].doc_id if hits else None
        entity = hits[0].metadata.get("entity") if hits else None
        attr = item["args"].get("attribute")
        answer = None if entity is None else (entity if attr is None else str(world.fact(entity, attr)))
    else:
        question = item["question"].replace(IMAGE_TOKEN, "").strip()
        answer = parse_answer(reader.read(f"{IMAGE_TOKEN} Question: {question}", shown))
    if retrieval:
        out["hit"] = out["retrieved"] == item["record"]
    out["answer"], out["correct"] = answer, answer == item["answer"]
    return out


__all__ = ["VLMReader", "ClipEmbedder", "ImageIndex", "ImageHit", "Reader", "add_link_records", "reading_prompt",
           "answer_link_question"]
