"""Perplexity and bits-per-byte of any text file, through loglikelihood_rolling.

The file is cut into documents of about `chunk_chars` characters at line breaks; each document is scored
whole (every token predicted once, with the longest context the model allows), and the corpus numbers are
ratios of sums over all documents, as lm-eval's wikitext task does:
    bits_per_byte   = -sum(ll) / (ln 2 * sum(UTF-8 bytes))
    byte_perplexity = exp(-sum(ll) / sum(bytes))
    word_perplexity = exp(-sum(ll) / sum(whitespace-separated words))
Bytes, unlike tokens, do not depend on the tokenizer, so bits-per-byte compares models with different
vocabularies fairly.

Usage:
    from lmstack.eval import evaluate
    from lmstack.eval.tasks.perplexity import PerplexityTask
    evaluate(lm, [PerplexityTask(path="input.txt")])          # or task name "perplexity" (+ path kwarg)
    lmstack eval --model DIR --tasks tinyshakespeare_ppl
"""
from __future__ import annotations

import math
from pathlib import Path

from lmstack.errors import LmstackError
from lmstack.eval.task import Task, TaskDataMissing, data_dir, register_task


def split_text(text: str, chunk_chars: int) -> list[str]:
    """Consecutive pieces of about chunk_chars characters, cut after a newline when one is near."""
    if chunk_chars < 1:
        raise LmstackError(f"chunk_chars must be >= 1, got {chunk_chars}")
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            newline = text.rfind("\n", start + chunk_chars // 2, end)
            end = newline + 1 if newline != -1 else end
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p.strip()]


def _sum_ratio(items: list) -> tuple[float, float]:
    ll = sum(float(a) for a, _ in items)
    n = sum(float(b) for _, b in items)
    if n <= 0:
        raise LmstackError("perplexity over zero bytes/words: the text is empty")
    return ll, n


def bits_per_byte(items: list[tuple[float, int]]) -> float:
    """items: (log-likelihood in nats, UTF-8 bytes) per document."""
    ll, n = _sum_ratio(items)
    return -ll / (math.log(2) * n)


def unit_perplexity(items: list[tuple[float, int]]) -> float:
    """exp of the negative mean log-likelihood per unit (byte or word), summed over documents."""
    ll, n = _sum_ratio(items)
    return math.exp(-ll / n)


@register_task("perplexity")
class PerplexityTask(Task):
    name = "perplexity"
    output_type = "rolling"
    default_metrics = ("bits_per_byte", "byte_perplexity", "word_perplexity")
    path: str = ""
    """The text file to score (UTF-8)."""
    chunk_chars: int = 4000
    """Characters per scored document; the model's window slides within a document, never across two."""
    max_chars: int = 0
    """Score only the first max_chars characters of the file (0 = all); keeps CPU runs short."""

    def docs(self, split: str) -> list[dict]:
        if not self.path:
            raise LmstackError(f"task {self.name!r} needs a text file: pass path=<file>")
        p = Path(self.path)
        if not p.is_file():
            raise TaskDataMissing(f"task {self.name!r}: text file {p} is missing")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LmstackError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); perplexity needs text") from None
        if self.max_chars:
            text = text[:self.max_chars]
        if not text.strip():
            raise LmstackError(f"{p} is empty; nothing to score")
        return [{"id": i, "text": t} for i, t in enumerate(split_text(text, self.chunk_chars))]

    def doc_to_text(self, doc: dict) -> str:
        return doc["text"]

    def doc_to_target(self, doc: dict) -> str:
        return doc["text"]

    def process_results(self, doc: dict, responses: list) -> dict:
        ll = float(responses[0])
        n_bytes = len(doc["text"].encode("utf-8"))
        # Tuples, not ratios: a corpus perplexity is a ratio of sums, and a mean of per-document ratios
        # would overweight short documents.
        return {"bits_per_byte": (ll, n_bytes), "byte_perplexity": (ll, n_bytes),
                "word_perplexity": (ll, len(doc["text"].split()))}

    def aggregation(self) -> dict:
        return {"bits_per_byte": bits_per_byte, "byte_perplexity": unit_perplexity,
                "word_perplexity": unit_perplexity}

    def higher_is_better(self) -> dict[str, bool]:
        return {m: False for m in self.default_metrics}

    def chance(self, doc: dict) -> None:
        return None


@register_task("tinyshakespeare_ppl")
def tinyshakespeare_ppl(**kwargs) -> PerplexityTask:
    """Perplexity on the first 20k characters of Tiny Shakespeare from the shared data folder."""
    kwargs.setdefault("path", str(data_dir() / "tinyshakespeare" / "input.txt"))
    kwargs.setdefault("max_chars", 20_000)
    return PerplexityTask(**kwargs)
