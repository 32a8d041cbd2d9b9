"""Cited answers: retrieve the top-k chunks for a question, put them numbered before it, generate through
`lmstack.LLM`, and check every `[n]` the answer cites (rag/prompt.py). `ask_closed_book` asks the same model
with no context, the baseline that retrieval must beat.

Several questions go to the engine as one batch (`ask_many`), so a benchmark's questions share decode steps.

Usage:
    import lmstack
    from lmstack.rag.answer import RAG
    rag = RAG(lmstack.LLM("runs/sft"), index, k=5)           # index: a rag.index.Index or any Retriever
    ans = rag.ask("Where was Ada Ashford born?")
    ans.text, ans.citations, [h.chunk.doc_id for h in ans.hits], [c.ok for c in ans.checks]
    base = rag.ask_closed_book("Where was Ada Ashford born?")   # the same model, no retrieval

World QA (the numbers `lmstack rag eval` and benchmarks/rag.py report):
    docs = world_bio_documents(world)                         # one bio per person, doc_id "bio/<name>"
    metrics = evaluate_world_qa(rag, world, world_qa_items(world, n=200), checker=FactChecker(None, index))
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import LmstackError
from lmstack.infer.llm import LLM
from lmstack.infer.sampling_params import SamplingParams
from lmstack.rag.prompt import (SYSTEM_PROMPT, CitationCheck, Prompt, RagPromptWarning, build_prompt, check_citations,
                                parse_citations, training_chat)
from lmstack.rag.types import SEARCH_MODES, Document, Hit, Retriever
from lmstack.world.bios import paraphrase_bio


@dataclass
class RagAnswer:
    """An answer: its `text`, the numbers it cites, the hits its prompt numbered ([1] is hits[0]), one
    CitationCheck per cited number, what the prompt trimmed, and the seconds spent retrieving and generating."""
    question: str
    text: str
    citations: list[int] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    checks: list[CitationCheck] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)
    retrieve_s: float = 0.0
    generate_s: float = 0.0

    @property
    def cited_hits(self) -> list[Hit]:
        """The hits the answer cites that exist, in citation order."""
        return [self.hits[n - 1] for n in self.citations if 1 <= n <= len(self.hits)]

    @property
    def citations_ok(self) -> bool:
        """At least one citation, and every one names an existing chunk that supports its sentence."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        """JSON-ready: text, citations (number, chunk id, doc id, source, span) and checks."""
        cites = []
        for c in self.checks:
            hit = self.hits[c.n - 1] if c.exists else None
            cites.append({"n": c.n, "ok": c.ok, "overlap": round(c.overlap, 3),
                          "span": list(c.span) if c.span else None, "span_text": c.span_text,
                          "chunk_id": hit.chunk.chunk_id if hit else None,
                          "doc_id": hit.chunk.doc_id if hit else None, "source": hit.chunk.source if hit else None})
        return {"question": self.question, "answer": self.text, "citations": self.citations, "checks": cites,
                "hits": [{"n": i, "chunk_id": h.chunk.chunk_id, "doc_id": h.chunk.doc_id, "score": h.score,
                          "text": h.chunk.text} for i, h in enumerate(self.hits, 1)],
                "trimmed": self.trimmed, "retrieve_s": self.retrieve_s, "generate_s": self.generate_s}


def search(retriever: Retriever, question: str, k: int, mode: str, rerank: Any = None) -> list[Hit]:
    """The retriever's top k hits; `rerank` is passed only when set (a plain Retriever need not take it)."""
    if rerank is not None:
        return list(retriever.search(question, k=k, mode=mode, rerank=rerank))
    return list(retriever.search(question, k=k, mode=mode))


def as_llm(llm: Any) -> LLM:
    """An lmstack.LLM as given, or one loaded from a model directory."""
    if isinstance(llm, LLM):
        return llm
    if isinstance(llm, str) or hasattr(llm, "__fspath__"):
        return LLM(str(llm))
    raise LmstackError(f"llm must be an lmstack.LLM or a model directory, got {type(llm).__name__}")


class RAG:
    """Retrieval-augmented generation with citations over any Retriever (the Index, or a list in a test)."""

    def __init__(self, llm: Any, retriever: Retriever, k: int = 5, mode: str = "hybrid", max_tokens: int = 48,
                 system: str | None = SYSTEM_PROMPT, min_overlap: float = 0.5, rerank: Any = None):
        """rerank: a reranker for the retriever's top candidates (an Index's `rerank=`; rag/rerank.py)."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise LmstackError(f"k={k!r} is not allowed; k must be an integer >= 1")
        if mode not in SEARCH_MODES:
            raise LmstackError(f"mode={mode!r} is not allowed; choose one of {', '.join(SEARCH_MODES)}")
        if not hasattr(retriever, "search"):
            raise LmstackError(f"retriever must have search(query, k, mode); got {type(retriever).__name__}")
        self.llm = as_llm(llm)
        self.retriever, self.k, self.mode, self.max_tokens = retriever, k, mode, max_tokens
        self.system, self.min_overlap, self.rerank = system, min_overlap, rerank

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def params(self) -> SamplingParams:
        """Greedy decoding: an answer to check should not depend on a sampler's luck."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0)

    def retrieve(self, question: str) -> list[Hit]:
        return search(self.retriever, question, self.k, self.mode, self.rerank)

    def prompt(self, question: str, hits: list[Hit]) -> Prompt:
        return build_prompt(question, hits, tokenizer=self.llm.tokenizer, max_model_len=self.max_model_len,
                            max_tokens=self.max_tokens, system=self.system)

    def ask(self, question: str) -> RagAnswer:
        """Retrieve, prompt, generate and check one question."""
        return self.ask_many([question])[0]

    def ask_many(self, questions: list[str]) -> list[RagAnswer]:
        """Every question answered in one engine batch; retrieval time is per question, generation time is the
        batch's wall time shared equally."""
        if isinstance(questions, str):
            questions = [questions]
        prompts, retrieve_s = [], []
        for q in questions:
            t0 = time.perf_counter()
            hits = self.retrieve(q)
            retrieve_s.append(time.perf_counter() - t0)
            prompts.append(self.prompt(q, hits))
        t0 = time.perf_counter()
        outs = self.llm.chat([p.messages for p in prompts], self.params()) if prompts else []
        share = (time.perf_counter() - t0) / max(1, len(prompts))
        answers = []
        for p, out, r_s in zip(prompts, outs, retrieve_s):
            text = out.outputs[0].text.strip()
            answers.append(RagAnswer(question=p.question, text=text, citations=parse_citations(text), hits=p.hits,
                                     checks=check_citations(text, p.hits, self.min_overlap), trimmed=p.trimmed,
                                     retrieve_s=r_s, generate_s=share))
        return answers

    def training_chats(self, pairs: list[tuple[str, str]], gold: list[str] | None = None) -> list[dict]:
        """Retrieval-formatted SFT records {'messages': [...]} for (question, answer) pairs: the exact prompt
        `ask` would build (same retrieval, numbering and trimming) and the answer citing the chunk that holds
        `gold[i]` (default: the answer itself), so a model fine-tuned on them learns to read and cite its context."""
        return retrieval_training_chats(self.retriever, pairs, gold, tokenizer=self.llm.tokenizer,
                                        max_model_len=self.max_model_len, k=self.k, mode=self.mode,
                                        max_tokens=self.max_tokens, system=self.system, rerank=self.rerank)

    def ask_closed_book(self, question: str) -> RagAnswer:
        """The same model asked with no retrieved context (the baseline)."""
        return self.ask_closed_book_many([question])[0]

    def ask_closed_book_many(self, questions: list[str]) -> list[RagAnswer]:
        prompts = [build_prompt(q, [], tokenizer=self.llm.tokenizer, max_model_len=self.max_model_len,
                                max_tokens=self.max_tokens, system=None) for q in questions]
        t0 = time.perf_counter()
        # the bare question as the user turn, the shape a chat model was fine-tuned on
        convs = [[{"role": "user", "content": p.question}] for p in prompts]
        outs = self.llm.chat(convs, self.params()) if convs else []
        share = (time.perf_counter() - t0) / max(1, len(prompts))
        return [RagAnswer(question=p.question, text=o.outputs[0].text.strip(), trimmed=p.trimmed, generate_s=share)
                for p, o in zip(prompts, outs)]


def retrieval_training_chats(retriever: Retriever, pairs: list[tuple[str, str]], gold: list[str] | None = None,
                             tokenizer: Any = None, max_model_len: int | None = None, k: int = 5,
                             mode: str = "hybrid", max_tokens: int = 48, system: str | None = SYSTEM_PROMPT,
                             rerank: Any = None) -> list[dict]:
    """The records of `RAG.training_chats` without a loaded LLM (a training stage has only the tokenizer and
    the context length): each prompt is built, numbered and trimmed as `RAG.ask` would, and the answer cites
    the first passage containing `gold[i]` (default: the answer); no citation where retrieval missed it, so
    the model also sees questions its context cannot answer. Trimming is silent here (it is the training data,
    not a user's question)."""
    records = []
    for i, (q, a) in enumerate(pairs):
        hits = search(retriever, q, k, mode, rerank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RagPromptWarning)
            prompt = build_prompt(q, hits, tokenizer=tokenizer, max_model_len=max_model_len,
                                  max_tokens=max_tokens, system=system)
        needle = (gold[i] if gold else a).lower()
        cite = [n for n, h in enumerate(prompt.hits, 1) if needle in h.chunk.text.lower()][:1]
        records.append({"messages": training_chat(prompt.question, a, prompt.hits, cite, system)})
    return records


# ---- world QA evaluation -----------------------------------------------------------------------------------------

def world_bio_documents(world: Any, seed: int = 0) -> list[Document]:
    """One paraphrased bio per person of `world` (every fact stated once), doc_id 'bio/<name>': the knowledge
    base the world's QA asks about."""
    rng = random.Random(seed)
    return [Document(f"bio/{p.name}", paraphrase_bio(p, rng, world), "world/bios", {"person": p.name})
            for p in world.people]


def world_qa_items(world: Any, split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` QA records of `split` (test: people and phrasings held out of training), a fixed random sample."""
    items = world.corpus("qa", split=split)
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


def _rate(flags: list[bool]) -> dict:
    """{'value', 'n', 'stderr'} of a proportion (binomial standard error)."""
    n = len(flags)
    p = sum(flags) / n if n else 0.0
    return {"value": p, "n": n, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def evaluate_world_qa(rag: RAG, world: Any, items: list[dict], checker: Any = None) -> dict:
    """Closed-book against RAG on world QA `items`: accuracy (`World.is_correct`), hallucination (an answer that
    states something but not the truth), citation checks, and with a FactChecker the rate of unsupported claims
    and the answers after revision (unsupported claims dropped). Every rate carries n and stderr."""
    questions = [it["question"] for it in items]
    closed = rag.ask_closed_book_many(questions)
    t0 = time.perf_counter()
    opened = rag.ask_many(questions)
    rag_s = time.perf_counter() - t0

    def correct(ans: list[RagAnswer]) -> list[bool]:
        return [world.is_correct(it["person"], it["attribute"], a.text) for it, a in zip(items, ans)]

    def wrong(texts: list[str], right: list[bool]) -> list[bool]:
        return [bool(t.strip()) and not r for t, r in zip(texts, right)]

    ok_closed, ok_rag = correct(closed), correct(opened)
    gold_in_hits = [any(world.is_correct(it["person"], it["attribute"], h.chunk.text) and it["person"] in h.chunk.text
                        for h in a.hits) for it, a in zip(items, opened)]
    out: dict[str, Any] = {
        "accuracy_closed_book": _rate(ok_closed), "accuracy_rag": _rate(ok_rag),
        "hallucination_closed_book": _rate(wrong([a.text for a in closed], ok_closed)),
        "hallucination_rag": _rate(wrong([a.text for a in opened], ok_rag)),
        "retrieval_gold_in_context": _rate(gold_in_hits),
        "citations_present": _rate([bool(a.citations) for a in opened]),
        "citations_ok": _rate([a.citations_ok for a in opened]),
        "seconds_per_question_batched": rag_s / max(1, len(items)),
    }
    if checker is not None:
        for name, answers in (("closed_book", closed), ("rag", opened)):
            verdicts = [checker.check(a.text) for a in answers]
            out[f"unsupported_claims_{name}"] = _rate([v.label != "supported" for vs in verdicts for v in vs])
            out[f"answers_with_unsupported_claim_{name}"] = _rate([any(v.label != "supported" for v in vs)
                                                                  for vs in verdicts])
            revised = [checker.revise(a.text, vs) for a, vs in zip(answers, verdicts)]
            ok = [world.is_correct(it["person"], it["attribute"], t) for it, t in zip(items, revised)]
            out[f"accuracy_{name}_revised"] = _rate(ok)
            out[f"hallucination_{name}_revised"] = _rate(wrong(revised, ok))
            out[f"abstained_{name}_revised"] = _rate([not t.strip() for t in revised])
    out["examples"] = [{"question": it["question"], "gold": it["answer"], "closed_book": c.text, "rag": o.text,
                        "citations": o.citations} for it, c, o in list(zip(items, closed, opened))[:5]]
    return out
