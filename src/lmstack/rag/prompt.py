"""Cited-answer prompts: retrieved chunks numbered [1]..[k] before the question, trimmed to fit the model's
context; `[n]` citations parsed back out of the answer, and each one checked against the chunk it names.

The prompt is a chat (a list of {'role', 'content'} messages), so it renders through whatever chat template
the model's tokenizer carries (`tokenizer.render_messages`), the same path `LLM.chat` and the server take:

    system: Answer the question using only the numbered context passages. Cite ... as [n].
    user:   Context:
            [1] Ada Ashford was born in Amberhaven. She studied ...
            [2] ...

            Question: Where was Ada Ashford born?

Fitting the context: when the rendered prompt plus the answer's token budget is longer than the model's
context, the lowest-ranked chunks go first, then the last chunk kept is cut, then the question is cut; each
step is a warning (RagPromptWarning) and is listed in `Prompt.trimmed`. The result never overflows; a
budget too small for even the bare template is an LmstackError.

A citation check (`check_citations`) asks two things of every `[n]` in an answer: does chunk n exist, and does
its text contain a span that supports the sentence citing it? Support is lexical: the content words of the
citing sentence (stopwords and the citation marks dropped) found in the chunk; the longest run of them that
appears verbatim is the span, given as offsets in the chunk's source document (`chunk.start + i`), so
`document.text[span[0]:span[1]]` is the supporting text.

Usage:
    from lmstack.rag.prompt import build_prompt, parse_citations, check_citations
    prompt = build_prompt("Where was Ada born?", hits, tokenizer=llm.tokenizer, max_model_len=512, max_tokens=32)
    out = llm.chat(prompt.messages, SamplingParams(max_tokens=32, temperature=0.0))
    parse_citations("She was born in Amberhaven [1][3].")       # [1, 3]
    checks = check_citations(answer_text, prompt.hits)          # one CitationCheck per cited number
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import LmstackError
from lmstack.rag.types import Hit

SYSTEM_PROMPT = ("Answer the question using only the numbered context passages. "
                 "Cite the passage that supports each statement as [n].")
"""The system message of a cited-answer prompt."""

_CITATION = re.compile(r"\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")  # "Ada's" -> "Ada", "s": a possessive still names Ada
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
# Words that carry no fact: a sentence is supported by its other words.
STOPWORDS = frozenset("""a an the and or but of in on at to for from by with as is are was were be been being
has have had do does did this that these those it its he she they him her his hers them their there here
who whom whose which what when where why how not no yes so than then also into onto about over under
i you we me my your our us can could would should will shall may might must one s""".split())


class RagPromptWarning(UserWarning):
    """The prompt was trimmed to fit the model's context (chunks dropped or cut, or the question cut)."""


@dataclass
class Prompt:
    """A cited-answer prompt: the chat `messages`, the `hits` it numbers ([1] is hits[0]), the prompt's token
    count (None without a tokenizer) and what was trimmed to fit."""
    messages: list[dict]
    hits: list[Hit]
    question: str
    n_tokens: int | None = None
    trimmed: list[str] = field(default_factory=list)


@dataclass
class CitationCheck:
    """One cited number in an answer. `exists`: 1 <= n <= len(hits); `supported`: the chunk holds enough
    of the citing sentence's content words (`overlap`, a fraction); `span`: (start, end) of the longest
    verbatim run of them, in the source document's offsets (None when nothing matched)."""
    n: int
    sentence: str
    exists: bool
    supported: bool
    overlap: float = 0.0
    span: tuple[int, int] | None = None
    span_text: str = ""
    doc_id: str = ""

    @property
    def ok(self) -> bool:
        return self.exists and self.supported


def context_block(hits: list[Hit]) -> str:
    """'[1] text\\n[2] text ...': the numbered passages, one per hit, in rank order."""
    return "\n".join(f"[{i}] {' '.join(h.chunk.text.split())}" for i, h in enumerate(hits, 1))


def render_messages(question: str, hits: list[Hit], system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The chat for a question and its numbered hits (no trimming; see build_prompt)."""
    user = f"Context:\n{context_block(hits)}\n\nQuestion: {question}" if hits else f"Question: {question}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def training_chat(question: str, answer: str, hits: list[Hit], cite: list[int] | None = None,
                  system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """A retrieval-formatted SFT chat: the prompt of `render_messages` and an assistant answer ending in
    its citations (e.g. 'Amberhaven [2].'), so a model can be fine-tuned to read and cite its context."""
    marks = "".join(f"[{n}]" for n in (cite or []))
    text = answer.rstrip()
    if marks:
        end = text[-1] if text and text[-1] in ".!?" else ""
        text = f"{text[:len(text) - len(end)]} {marks}{end or '.'}"
    return render_messages(question, hits, system) + [{"role": "assistant", "content": text}]


def _count(tokenizer: Any, messages: list[dict]) -> int:
    return len(tokenizer.render_messages(messages, add_generation_prompt=True).ids)


def _cut_text(text: str, fits, limit: int | None = None) -> str:
    """The longest word-boundary prefix of `text` (of its first `limit` characters) for which fits(prefix)
    holds ('' if none): binary search, so a huge text costs a few renders, not one per word."""
    words = text[:limit].split(" ") if limit else text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(" ".join(words[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _replace_text(hit: Hit, text: str) -> Hit:
    chunk = hit.chunk
    cut = type(chunk)(**{**chunk.__dict__, "text": text, "end": chunk.start + len(text)})
    return Hit(chunk=cut, score=hit.score, rank=hit.rank, scores=dict(hit.scores))


def build_prompt(question: str, hits: list[Hit], tokenizer: Any = None, max_model_len: int | None = None,
                 max_tokens: int = 64, system: str | None = SYSTEM_PROMPT) -> Prompt:
    """The cited-answer chat for `question` over `hits`, trimmed so its tokens plus `max_tokens` fit in
    `max_model_len` (no trimming without a tokenizer and a length). Trims, in order: lowest-ranked chunks,
    then the text of the last chunk kept, then the question; each trim warns."""
    if not isinstance(question, str) or not question.strip():
        raise LmstackError("the question is empty; give a question to answer")
    hits = list(hits)
    messages = render_messages(question, hits, system)
    if tokenizer is None or max_model_len is None:
        return Prompt(messages, hits, question)
    budget = max_model_len - max_tokens
    if budget < 1:
        raise LmstackError(f"max_tokens={max_tokens} leaves no room for a prompt in a context of {max_model_len}")
    trimmed: list[str] = []
    cap = budget * 32  # a token is rarely over 32 characters: text beyond this can never fit, so never render it
    if len(question) > cap:
        trimmed.append(f"cut the question from {len(question)} to {cap} characters before counting")
        question = question[:cap]
    hits = [_replace_text(h, h.chunk.text[:cap]) if len(h.chunk.text) > cap else h for h in hits]
    messages = render_messages(question, hits, system)
    n = _count(tokenizer, messages)
    n_hits = len(hits)
    while len(hits) > 1 and n > budget:  # the lowest-ranked chunks go first
        hits.pop()
        n = _count(tokenizer, render_messages(question, hits, system))
    if len(hits) < n_hits:
        trimmed.append(f"kept the top {len(hits)} of {n_hits} chunks")
    if n > budget and hits:  # one chunk left and still too long: cut its text
        first = hits[0]
        keep = _cut_text(first.chunk.text, lambda t: _count(
            tokenizer, render_messages(question, [_replace_text(first, t)], system)) <= budget, budget * 32)
        hits = [_replace_text(first, keep)] if keep else []
        trimmed.append(f"cut chunk [1] from {len(first.chunk.text)} to {len(keep)} characters" if keep
                       else "dropped every chunk")
        n = _count(tokenizer, render_messages(question, hits, system))
    if n > budget:  # no context left to cut: cut the question itself
        q = _cut_text(question, lambda t: bool(t) and _count(tokenizer, render_messages(t, hits, system)) <= budget,
                      budget * 32)  # a token is rarely over 32 characters: never render more than could fit
        if not q:
            raise LmstackError(f"a context of {max_model_len} tokens with max_tokens={max_tokens} has no room even "
                               "for the prompt template; raise max_model_len or lower max_tokens")
        trimmed.append(f"cut the question from {len(question)} to {len(q)} characters")
        question = q
        n = _count(tokenizer, render_messages(question, hits, system))
    return _finish(question, hits, system, n, trimmed)


def _finish(question: str, hits: list[Hit], system: str | None, n: int, trimmed: list[str]) -> Prompt:
    for note in trimmed:
        warnings.warn(f"the RAG prompt was trimmed to fit the context: {note}", RagPromptWarning, stacklevel=3)
    return Prompt(render_messages(question, hits, system), hits, question, n, trimmed)


def parse_citations(text: str) -> list[int]:
    """The distinct citation numbers in `text`, in order of first appearance: '[1][3]', '[2, 4]' both count."""
    seen: list[int] = []
    for m in _CITATION.finditer(text or ""):
        for part in m.group(1).split(","):
            n = int(part)
            if n not in seen:
                seen.append(n)
    return seen


def content_words(text: str) -> list[str]:
    """Lower-cased words of `text` that carry content (no stopwords, no citation numbers)."""
    return [w.lower() for w in _WORD.findall(_CITATION.sub(" ", text)) if w.lower() not in STOPWORDS]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by space); a citation after the period stays with its
    sentence ('... Amberhaven. [1] Next ...' -> the [1] belongs to the first)."""
    text = re.sub(r"([.!?])\s*((?:\[\d[\d,\s]*\]\s*)+)", lambda m: " " + m.group(2).strip() + m.group(1) + " ",
                  text.strip())
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def find_span(words: list[str], text: str, gap: int = 3) -> tuple[int, int] | None:
    """(start, end) in `text` of the longest run of consecutive `words` found there in order, as whole words
    (case-insensitive), with at most `gap` other words between two of them ('born ... Amberhaven' matches
    'born in Amberhaven'). None if no word is found."""
    lowered = text.lower()
    between = r"\W+(?:\w+\W+){0,%d}?" % gap
    for size in range(len(words), 0, -1):  # the longest run first
        for i in range(len(words) - size + 1):
            m = re.search(r"\b" + between.join(re.escape(w) for w in words[i:i + size]) + r"\b", lowered)
            if m:
                return m.start(), m.end()
    return None


def check_citations(answer: str, hits: list[Hit], min_overlap: float = 0.5) -> list[CitationCheck]:
    """One CitationCheck per (sentence, cited number) in `answer`: the number names an existing hit, and that
    chunk contains at least `min_overlap` of the sentence's content words, with the longest verbatim run of
    them as the span (document offsets)."""
    checks = []
    for sentence in split_sentences(answer or ""):
        words = content_words(sentence)
        for n in parse_citations(sentence):
            if not 1 <= n <= len(hits):
                checks.append(CitationCheck(n, sentence, exists=False, supported=False))
                continue
            chunk = hits[n - 1].chunk
            chunk_words = set(content_words(chunk.text))
            overlap = sum(w in chunk_words for w in words) / len(words) if words else 0.0
            span = find_span(words, chunk.text)
            doc_span = (chunk.start + span[0], chunk.start + span[1]) if span else None
            checks.append(CitationCheck(n, sentence, exists=True, supported=bool(words) and overlap >= min_overlap,
                                        overlap=overlap, span=doc_span,
                                        span_text=chunk.text[span[0]:span[1]] if span else "", doc_id=chunk.doc_id))
    return checks
