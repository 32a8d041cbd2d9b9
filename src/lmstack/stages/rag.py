"""The speedrun's RAG stage: the honest fix for a small model that cannot store the world's facts.

A 4M-parameter model pretrained for minutes answers almost none of the world's held-out QA closed-book. The
facts are in the world's bios, so the stage
1. indexes one paraphrased bio per person (rag.answer.world_bio_documents) into run/rag/index, a SQLite
   index with MiniLM vectors (so `lmstack serve --rag_index` and `lmstack rag ask` can use it after the
   run), searched in `mode` (BM25 by default: at k=2 it puts the right bio in the prompt as often as the
   hybrid search, and costs no query embedding; see `retrieval_recall`);
2. writes retrieval-formatted chats of the QA train split (`training_records`: the exact prompt `RAG.ask`
   builds, and the answer citing its passage) that the SFT stage mixes into its data, kind "rag", so the
   chat model learns to read and cite a context in the same fine-tuning run;
3. scores each chat model (SFT, aligned) closed-book against with RAG on held-out people and phrasings
   (`rag_stage`), through `lmstack.LLM` as a user would, into run/rag/results.json and run/rag/report.md
   (a section of the report card).

Only bios go in the prompt, whole (one chunk per bio: a bio sentence such as "She majored in chemistry."
names nobody, so smaller chunks would lose the person); k=2 bios fit a 256-token context with the answer.

Usage:
    from lmstack.stages.rag import build_world_index, training_records, rag_stage
    index = build_world_index(world, "runs/x/rag/index")
    records = training_records(index, tok, world, "train", max_model_len=256)      # kind "rag" SFT chats
    rag_stage("runs/x", {"sft": "runs/x/sft/merged"}, world, index, n_eval=100)
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from lmstack.config import atomic_write_text
from lmstack.infer.llm import LLM
from lmstack.rag.answer import RAG, evaluate_world_qa, retrieval_training_chats, world_bio_documents, world_qa_items
from lmstack.rag.chunking import ChunkConfig
from lmstack.rag.index import Index
from lmstack.rag.prompt import RagPromptWarning

KIND = "rag"
"""The record kind of the retrieval-formatted chats in the SFT stage's mix."""
MAX_TOKENS = 24
"""Answer budget of a RAG prompt: the world's answers are a few tokens plus a citation."""
MIN_CONTEXT = 160
"""The shortest model context the stage runs with: the template, one bio, the question and the answer budget."""
# A bio is ~60 words (~100 tokens); one chunk per bio, never split.
BIO_CHUNK = ChunkConfig(method="tokens", size=400, overlap=0)


def build_world_index(world: Any, path: str | Path | None, embedder: Any = "minilm") -> Index:
    """An Index of the world's bios at `path` (overwritten; None: in memory)."""
    return Index.build(world_bio_documents(world), embedder, path=path, chunk=BIO_CHUNK, overwrite=True)


def training_records(index: Any, tokenizer: Any, world: Any, split: str, max_model_len: int, k: int = 2,
                     mode: str = "bm25", n: int | None = None, seed: int = 0) -> list[dict]:
    """SFT chat records (kind "rag") for `n` QA items of `split`: the prompt `RAG.ask` would build with this
    index, tokenizer and context, and the answer citing the passage that holds it."""
    items = world_qa_items(world, split=split, n=n, seed=seed)
    chats = retrieval_training_chats(index, [(it["question"], it["answer"]) for it in items],
                                     gold=[it["answer"] for it in items], tokenizer=tokenizer,
                                     max_model_len=max_model_len, k=k, mode=mode, max_tokens=MAX_TOKENS)
    return [{"id": f"rag/{it['id']}", "kind": KIND, "split": split, **chat} for it, chat in zip(items, chats)]


def retrieval_recall(index: Any, items: list[dict], k: int, modes: tuple[str, ...]) -> dict:
    """For each mode, the share of `items` whose person's bio is among the top k hits."""
    out = {}
    for mode in modes:
        found = [any(h.chunk.doc_id == f"bio/{it['person']}" for h in index.search(it["question"], k=k, mode=mode))
                 for it in items]
        out[mode] = sum(found) / max(1, len(found))
    return out


def rag_stage(run_dir: str | Path, models: dict[str, str], world: Any, index: Any, n_eval: int = 100, k: int = 2,
              mode: str = "bm25", seed: int = 0, log=print) -> dict:
    """Closed-book against RAG for each chat model in `models` ({label: model dir}) on `n_eval` held-out QA
    items; writes run/rag/results.json and run/rag/report.md and returns the results."""
    out = Path(run_dir) / "rag"
    out.mkdir(parents=True, exist_ok=True)
    items = world_qa_items(world, split="test", n=n_eval, seed=seed)
    results: dict[str, Any] = {"k": k, "mode": mode, "n_eval": len(items), "split": "test (held-out people and phrasing)",
                               "index": index.store.location, "models": {}}
    results["recall_at_k"] = retrieval_recall(index, items, k, tuple(dict.fromkeys((mode, "hybrid"))))
    for label, model_dir in models.items():
        t0 = time.perf_counter()
        llm = LLM(str(model_dir), max_num_seqs=32)  # the questions decode together
        rag = RAG(llm, index, k=k, mode=mode, max_tokens=MAX_TOKENS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RagPromptWarning)
            metrics = evaluate_world_qa(rag, world, items)
        metrics["prompts_trimmed"] = sum(issubclass(w.category, RagPromptWarning) for w in caught)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["model"] = str(model_dir)
        results["models"][label] = metrics
        log(f"RAG [{label}]: world QA closed-book {metrics['accuracy_closed_book']['value']:.1%} -> "
            f"with RAG {metrics['accuracy_rag']['value']:.1%} (n={len(items)}, {metrics['seconds']:.0f}s)")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(out / "report.md", report_md(results))
    return results


def _pct(rate: dict) -> str:
    return f"{rate['value']:.1%} ± {rate['stderr']:.1%}"


def report_md(results: dict) -> str:
    """The report card's RAG section: per model, closed-book against RAG, and what the prompts held."""
    lines = [f"## RAG: world QA closed-book vs with retrieval ({results['split']}, n={results['n_eval']}, "
             f"top {results['k']} bios by {results['mode']})", "",
             "| model | closed-book | with RAG | hallucinated, closed-book | hallucinated, RAG | answer cites a passage "
             "| citations check out |", "|---|---|---|---|---|---|---|"]
    for label, m in results["models"].items():
        lines.append(f"| {label} | {_pct(m['accuracy_closed_book'])} | {_pct(m['accuracy_rag'])} | "
                     f"{_pct(m['hallucination_closed_book'])} | {_pct(m['hallucination_rag'])} | "
                     f"{_pct(m['citations_present'])} | {_pct(m['citations_ok'])} |")
    recall = ", ".join(f"{mode} {v:.1%}" for mode, v in results["recall_at_k"].items())
    lines += ["", f"The right bio is in the top {results['k']}: {recall}. Accuracy: the answer states the true fact "
              "(World.is_correct); hallucinated: it states something, but not the truth; ± is the binomial "
              "standard error.", ""]
    return "\n".join(lines)

