"""`lmstack rag`: build an index, search it, answer with citations, check claims, and measure it all.

Usage:
    lmstack rag index --docs docs/ --out idx                      # .txt .md .html .pdf .jsonl, recursively
    lmstack rag index --docs bios.jsonl --out idx --embedder runs/encoder --chunk.method sentences --chunk.size 120
    lmstack rag index --world 0 --out idx                          # the synthetic world's bios (seed 0)
    lmstack rag query "Where was Ada Ashford born?" --index idx --mode bm25 --k 5
    lmstack rag ask "Where was Ada Ashford born?" --model runs/sft --index idx
    lmstack rag query "Where was Ada Ashford born?" --index idx --rerank runs/cross-encoder   # cross-encoder pass
    lmstack rag check --index idx --text "Ada Ashford was born in Coldwater and works for Zentrix."
    lmstack rag check --index idx --text "..." --judge lm --model runs/sft --revise
    lmstack rag eval --model runs/sft --index idx --world runs/x/world --n 200 --out rag_eval.json
    lmstack rag train-encoder --world 0 --out runs/encoder --train.steps 200 --train.init minilm

The question of `query` and `ask` is the positional word. Every command prints a plain table or line by
default, or one JSON object with --json_output.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import LmstackError
from lmstack.infer.llm import LLM
from lmstack.rag.answer import RAG, evaluate_world_qa, world_bio_documents, world_qa_items
from lmstack.rag.chunking import ChunkConfig
from lmstack.rag.encoder_train import EncoderTrainConfig, train_encoder, world_training_data
from lmstack.rag.factcheck import FactChecker
from lmstack.rag.index import BACKENDS, Index
from lmstack.rag.ingest import read_path
from lmstack.rag.rerank import load_reranker
from lmstack.runtime.device import pick_device
from lmstack.threads import set_threads
from lmstack.world import World

Mode = Literal["bm25", "dense", "hybrid"]


def _need(value: Any, flag: str, command: str) -> Any:
    if value is None or value == "":
        raise LmstackError(f"`lmstack rag {command}` needs --{flag}")
    return value


def load_world(world: str | None) -> Any:
    """A world from a seed ('0') or a generated world's folder / manifest.json."""
    if world is None:
        return None
    if world.isdigit():
        return World(seed=int(world))
    return World.from_manifest(world)


def open_llm(model: str, device: str = "auto", threads: int = 0, max_num_seqs: int = 16) -> LLM:
    if model.lower().endswith(".gguf"):
        raise LmstackError(f"GGUF models are not supported yet: --model {model}")
    if not (Path(model) / "config.json").is_file():
        raise LmstackError(f"--model {model}: no config.json there; give a model directory (lmstack or HF layout)")
    set_threads(threads)
    dev, dtype = pick_device(device, "auto")
    return LLM(model, device=dev, dtype=dtype, max_num_seqs=max_num_seqs)


def _emit(payload: dict, json_output: bool, lines: list[str]) -> dict:
    print(json.dumps(payload, ensure_ascii=False) if json_output else "\n".join(lines))
    return payload


def index(docs: str | None = None, out: str | None = None, world: str | None = None, embedder: str = "minilm",
          chunk: ChunkConfig = ChunkConfig(), backend: Literal["sqlite", "faiss", "pgvector"] = "sqlite",
          overwrite: bool = False, threads: int = 0, json_output: bool = False) -> dict:
    """Build an index from documents (or the synthetic world's bios).

    Args:
        docs: a file or folder of .txt .md .html .pdf .jsonl (jsonl: a `text` field plus metadata).
        out: the index directory to write (a postgresql:// DSN with --backend pgvector).
        world: index the bios of a synthetic world instead: a seed ('0') or a generated world's folder.
        embedder: 'minilm' (all-MiniLM-L6-v2 through our encoder) or an encoder directory (rag train-encoder).
        chunk: how documents are cut (--chunk.method recursive|tokens|sentences, --chunk.size, --chunk.overlap).
        backend: sqlite (exact numpy search), faiss (HNSW / IVF-PQ) or pgvector (Postgres).
        overwrite: replace an existing index at --out.
        threads: CPU threads for torch (0 = auto).
        json_output: print one JSON object instead of a summary line.
    """
    _need(out, "out", "index")
    if (docs is None) == (world is None):
        raise LmstackError("`lmstack rag index` needs exactly one of --docs DIR and --world SEED|DIR")
    if backend not in BACKENDS:
        raise LmstackError(f"--backend {backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    set_threads(threads)
    skipped: list = []
    if world is not None:
        documents = world_bio_documents(load_world(world))
    else:
        report = read_path(docs)
        documents, skipped = report.documents, report.skipped
    if not documents:
        raise LmstackError(f"no readable documents in {docs} ({len(skipped)} skipped); nothing to index")
    t0 = time.perf_counter()
    with Index.build(documents, embedder, path=out, chunk=chunk, backend=backend, overwrite=overwrite,
                     progress=sys.stderr.isatty()) as idx:
        n_chunks, name, dim = len(idx), idx.embedder_name, idx.dim
    payload = {"index": out, "documents": len(documents), "chunks": n_chunks, "skipped": len(skipped),
               "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:50]], "embedder": name, "dim": dim,
               "seconds": round(time.perf_counter() - t0, 3)}
    lines = [f"indexed {len(documents)} documents as {n_chunks} chunks ({name}, dim {dim}) into {out} in "
             f"{payload['seconds']} s; {len(skipped)} files skipped"] + [f"  skipped {p}: {r}" for p, r in skipped[:20]]
    return _emit(payload, json_output, lines)


def query(question: str, index: str | None = None, mode: Mode = "hybrid", k: int = 5, embedder: str | None = None,
          rerank: str | None = None, json_output: bool = False) -> dict:
    """Search an index and print the ranked chunks.

    Args:
        question: what to search for.
        index: the index directory (or postgresql:// DSN).
        mode: bm25 (sparse), dense (embeddings) or hybrid (both, reciprocal-rank fused).
        k: how many chunks.
        embedder: the embedder to search with (default: the one the index was built with).
        rerank: a cross-encoder directory (rag train_cross_encoder) that reorders the top candidates.
        json_output: print one JSON object instead of a table.
    """
    reranker = load_reranker(rerank) if rerank else None
    with Index.open(_need(index, "index", "query"), embedder=embedder) as idx:
        hits = idx.search(question, k=k, mode=mode, rerank=reranker)
    rows = [{"rank": h.rank, "score": round(h.score, 5), "chunk_id": h.chunk.chunk_id, "doc_id": h.chunk.doc_id,
             "source": h.chunk.source, "scores": h.scores, "text": h.chunk.text} for h in hits]
    lines = [f"[{r['rank']}] {r['score']:.4f} {r['chunk_id']} ({r['source']}): {' '.join(r['text'].split())[:160]}"
             for r in rows] or ["no hits"]
    return _emit({"query": question, "mode": mode, "hits": rows}, json_output, lines)


def ask(question: str, model: str | None = None, index: str | None = None, k: int = 5, mode: Mode = "hybrid",
        max_tokens: int = 48, closed_book: bool = False, rerank: str | None = None, device: str = "auto",
        threads: int = 0, json_output: bool = False) -> dict:
    """Answer a question from the index with [n] citations, and check each citation.

    Args:
        question: the question.
        model: the chat model directory.
        index: the index directory (or postgresql:// DSN).
        k: how many chunks go into the prompt (fewer when they would not fit the model's context).
        mode: bm25, dense or hybrid retrieval.
        max_tokens: most tokens in the answer.
        closed_book: ask the model with no retrieved context (the baseline).
        rerank: a cross-encoder directory that reorders the retrieved candidates before the top k go in.
        device: auto, cpu or cuda.
        threads: CPU threads for torch (0 = auto).
        json_output: print one JSON object instead of the answer and its sources.
    """
    llm = open_llm(_need(model, "model", "ask"), device, threads, max_num_seqs=1)
    with Index.open(_need(index, "index", "ask")) as idx:
        rag = RAG(llm, idx, k=k, mode=mode, max_tokens=max_tokens, rerank=load_reranker(rerank) if rerank else None)
        ans = rag.ask_closed_book(question) if closed_book else rag.ask(question)
    payload = ans.to_dict()
    lines = [ans.text or "(empty answer)"]
    for c in payload["checks"]:
        mark = "ok" if c["ok"] else "NOT SUPPORTED" if c["doc_id"] else "NO SUCH SOURCE"
        lines.append(f"  [{c['n']}] {mark}: {c['doc_id']} {c['span']} {c['span_text']!r}")
    for t in ans.trimmed:
        lines.append(f"  (trimmed to fit the context: {t})")
    return _emit(payload, json_output, lines)


def check(text: str | None = None, index: str | None = None, text_file: str | None = None, k: int = 5,
          mode: Mode = "hybrid", judge: Literal["nli", "lm"] = "nli", model: str | None = None, revise: bool = False,
          device: str = "auto", threads: int = 0, json_output: bool = False) -> dict:
    """Split a text into claims and label each supported, contradicted or unverifiable against the index.

    Args:
        text: the text to check.
        index: the index directory (or postgresql:// DSN).
        text_file: read the text from this file instead.
        k: evidence chunks retrieved per claim.
        mode: bm25, dense or hybrid retrieval.
        judge: nli (a small classifier trained on the world's true and false facts) or lm (the model's
            likelihood of 'yes' under a verification prompt; needs --model).
        model: the model directory for --judge lm.
        revise: also print the text with every unsupported claim dropped.
        device: auto, cpu or cuda.
        threads: CPU threads for torch (0 = auto).
        json_output: print one JSON object instead of a claim table.
    """
    if (text is None) == (text_file is None):
        raise LmstackError("`lmstack rag check` needs exactly one of --text and --text_file")
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmstackError(f"cannot read --text_file {text_file}: {e}") from None
    llm = open_llm(model, device, threads, max_num_seqs=2) if judge == "lm" and model else None
    with Index.open(_need(index, "index", "check")) as idx:
        checker = FactChecker(llm, idx, k=k, mode=mode, judge=judge)
        verdicts = checker.check(text)
        revised = checker.revise(text, verdicts) if revise else None
    payload = {"claims": [v.to_dict() for v in verdicts], "revised": revised}
    width = max((len(v.label) for v in verdicts), default=0)
    lines = [f"{v.label:<{width}}  {v.score:.2f}  {v.claim}" for v in verdicts] or ["no claims found"]
    if revise:
        lines.append(f"revised: {revised}")
    return _emit(payload, json_output, lines)


def evaluate(model: str | None = None, index: str | None = None, world: str = "0", n: int = 200, k: int = 5,
         mode: Mode = "hybrid", max_tokens: int = 32, split: Literal["test", "val", "train"] = "test",
         fact_check: bool = True, out: str | None = None, device: str = "auto", threads: int = 0,
         json_output: bool = False) -> dict:
    """World QA accuracy closed-book against RAG, hallucination and citation rates (n and stderr for each).

    Args:
        model: the chat model directory.
        index: an index of the same world's bios (`lmstack rag index --world ...`).
        world: the world the questions come from: a seed ('0') or a generated world's folder.
        n: how many QA items (a fixed random sample of the split).
        k: chunks per prompt.
        mode: bm25, dense or hybrid retrieval.
        max_tokens: most tokens per answer.
        split: test (people and phrasings held out of training), val or train.
        fact_check: also label the answers' claims and measure revision (the nli judge).
        out: also write the metrics to this JSON file.
        device: auto, cpu or cuda.
        threads: CPU threads for torch (0 = auto).
        json_output: print the whole JSON object instead of a summary.
    """
    llm = open_llm(_need(model, "model", "eval"), device, threads)
    w = load_world(world)
    with Index.open(_need(index, "index", "eval")) as idx:
        rag = RAG(llm, idx, k=k, mode=mode, max_tokens=max_tokens)
        checker = FactChecker(None, idx, k=k, mode=mode) if fact_check else None
        metrics = evaluate_world_qa(rag, w, world_qa_items(w, split, n), checker)
    metrics["config"] = {"model": model, "index": index, "world": world, "n": n, "k": k, "mode": mode, "split": split}
    if out:
        tmp = f"{out}.tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    lines = [f"{name:<32} {m['value']:.3f} ± {m['stderr']:.3f} (n={m['n']})"
             for name, m in metrics.items() if isinstance(m, dict) and "stderr" in m]
    return _emit(metrics, json_output, lines)


def train_encoder_command(out: str | None = None, world: str = "0", bios_per_person: int = 1,
                          train: EncoderTrainConfig = EncoderTrainConfig(), json_output: bool = False) -> dict:
    """Train a retrieval encoder contrastively (in-batch and BM25 hard negatives) on a world's train-split QA
    questions paired with their people's bios; `--embedder OUT` then uses it in `lmstack rag index`.

    Args:
        out: the encoder directory to write.
        world: a seed ('0') or a generated world's folder.
        bios_per_person: bio paraphrases per person among the passages.
        train: the training run (--train.init minilm|scratch|DIR, --train.steps, --train.batch_size, ...).
        json_output: print one JSON object instead of a summary line.
    """
    _need(out, "out", "train-encoder")
    passages, pairs = world_training_data(load_world(world), bios_per_person=bios_per_person)
    t0 = time.perf_counter()
    path = train_encoder(passages, pairs, out, train)
    payload = {"encoder": str(path), "passages": len(passages), "pairs": len(pairs), "steps": train.steps,
               "seconds": round(time.perf_counter() - t0, 3)}
    return _emit(payload, json_output, [f"trained an encoder on {len(pairs)} (question, bio) pairs over "
                                        f"{len(passages)} bios in {payload['seconds']} s; wrote {path}"])


COMMANDS = {"index": index, "query": query, "ask": ask, "check": check, "eval": evaluate,
            "train-encoder": train_encoder_command}
