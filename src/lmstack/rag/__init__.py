"""Retrieval-augmented generation: ingestion, chunking, embeddings, BM25, hybrid search, a persistent index,
cited answers and fact checking. The modules fill in as issue 20 is built; `types` holds the shared shapes.

Usage:
    from lmstack.rag.types import Chunk, Document, Hit
"""
from lmstack.rag.types import SEARCH_MODES, Chunk, Document, Embedder, Hit, Retriever

__all__ = ["SEARCH_MODES", "Chunk", "Document", "Embedder", "Hit", "Retriever"]
