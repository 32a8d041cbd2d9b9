"""Retrieval-augmented generation: ingestion, chunking, embeddings, BM25, hybrid search, a persistent index,
cited answers and fact checking.

Usage:
    from lmstack.rag import Index, RAG, FactChecker, read_path
    index = Index.build(read_path("docs/"), "minilm", path="idx")      # SQLite store; backend="faiss"|"pgvector"
    hits = index.search("Where was Ada Ashford born?", k=5, mode="hybrid")
    answer = RAG(lmstack.LLM("runs/sft"), index).ask("Where was Ada Ashford born?")   # text + checked [n] citations
    verdicts = FactChecker(llm, index).check("Ada Ashford was born in Coldwater.")  # supported/contradicted/unverifiable

Modules: types (shared shapes), ingest, chunking, embed, bm25, hybrid, rerank, encoder_train, store,
faiss_store, pgvector_store, index, prompt, answer, factcheck, commands (`lmstack rag`).
"""
from lmstack.rag.answer import RAG, RagAnswer
from lmstack.rag.bm25 import BM25
from lmstack.rag.chunking import ChunkConfig, chunk_document
from lmstack.rag.embed import TransformerEmbedder, load_embedder
from lmstack.rag.factcheck import FactChecker
from lmstack.rag.hybrid import blend, rrf
from lmstack.rag.index import Index
from lmstack.rag.ingest import read_path
from lmstack.rag.types import SEARCH_MODES, Chunk, Document, Embedder, Hit, Retriever

__all__ = ["SEARCH_MODES", "BM25", "Chunk", "ChunkConfig", "Document", "Embedder", "FactChecker", "Hit", "Index",
           "RAG", "RagAnswer", "Retriever", "TransformerEmbedder", "blend", "chunk_document", "load_embedder",
           "read_path", "rrf"]
