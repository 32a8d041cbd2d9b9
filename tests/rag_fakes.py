"""A deterministic fake embedder for the RAG tests (the real ones live in src/lmstack/rag/embed.py).

Usage:
    from rag_fakes import HashEmbedder
    index = Index.build(docs, HashEmbedder(dim=64, name="hash-64"))
"""
import re
import zlib

import numpy as np


class HashEmbedder:
    """Bag of hashed lowercase words -> unit vector: texts sharing words are close."""

    def __init__(self, dim: int = 256, name: str = "hash-bow"):
        self.dim, self.name = dim, name

    def embed(self, texts, batch_size=64):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def tokenize(self, texts):
        return [t.split() for t in texts]
