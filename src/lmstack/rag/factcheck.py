"""Fact checking through retrieval (S.19, IX.4): split a text into atomic claims, retrieve evidence for each,
judge it supported / contradicted / unverifiable, and optionally drop what is not supported.

1. Claims (`split_claims`): sentences, then conjunctions ('..., and ...', '; ') when both sides are clauses;
   a leading pronoun ('She ...') or a subject-less clause ('... and works for X') gets the sentence's named
   subject back, so every claim can be searched for on its own.
2. Evidence: the retriever's top-k chunks for the claim.
3. Judges (a registry, JUDGES):
   - `nli` (default): a small classifier (multinomial logistic regression) over lexical entailment features:
     whether a chunk names the claim's subject, and how much of the rest of the claim that chunk holds,
     weighted by rarity among the retrieved chunks (words every bio has, like 'born', weigh little; the value,
     like a city, weighs much), how much only *other* chunks hold (the value belongs to someone else: a
     contradiction), and the longest verbatim run. It is trained on the synthetic world's true claims, false
     claims made by swapping an attribute's value (`World.other_value`), claims about people the index
     does not hold, and claims whose sentence was removed from the evidence (`NLIJudge.train_on_world`).
   - `lm`: the language model's likelihood of 'yes' against 'no' after a verification prompt
     (evidence, claim, 'Is the claim supported by the evidence?'), scored through lmstack.LLM's prompt
     logprobs; a claim whose subject no chunk names is unverifiable.
4. `revise(text)` keeps only the supported claims.

Usage:
    from lmstack.rag.factcheck import FactChecker
    checker = FactChecker(None, index)                     # nli judge: no LM needed
    for v in checker.check("Ada Ashford was born in Coldwater and works for Zentrix."):
        print(v.label, round(v.score, 2), v.claim)
    checker.revise(text)                                    # the supported claims only
    FactChecker(llm, index, judge="lm")                     # the LM's yes/no likelihood as the judge
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lmstack.errors import LmstackError
from lmstack.infer.sampling_params import SamplingParams
from lmstack.rag.bm25 import BM25
from lmstack.rag.prompt import content_words, find_span, split_sentences
from lmstack.rag.types import Chunk, Hit, Retriever
from lmstack.world import World
from lmstack.world.bios import paraphrase_bio
from lmstack.world.entities import PERSON_ATTRIBUTES
from lmstack.world.qa import answer_sentence

LABELS = ("supported", "contradicted", "unverifiable")
FEATURES = ("bias", "has_subject", "idf_in_subject", "idf_only_elsewhere", "idf_nowhere", "in_subject", "span",
            "tail_in_subject", "tail_elsewhere", "values_in_subject")
_PRONOUNS = {"he": "", "she": "", "they": "", "it": "", "his": "'s", "her": "'s", "their": "'s", "its": "'s"}
_CONJUNCTION = re.compile(r"\s*;\s+|,?\s+(?:and|but|while|whereas)\s+")
_CITATIONS = re.compile(r"\s*\[\d[\d,\s]*\]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")


@dataclass
class ClaimVerdict:
    """One atomic claim, its label (supported / contradicted / unverifiable), the judge's probability of that
    label, every label's probability, the evidence, and the supporting span in the best chunk (if any)."""
    claim: str
    label: str
    score: float
    probs: dict[str, float] = field(default_factory=dict)
    evidence: list[Hit] = field(default_factory=list)
    span_text: str = ""

    def to_dict(self) -> dict:
        return {"claim": self.claim, "label": self.label, "score": round(self.score, 4),
                "probs": {k: round(v, 4) for k, v in self.probs.items()},
                "evidence": [h.chunk.chunk_id for h in self.evidence], "span": self.span_text}


# ---- claims --------------------------------------------------------------------------------------------------

def _subject(clause: str) -> str:
    """The leading run of capitalised words ('Ada Ashford was ...' -> 'Ada Ashford'); '' for a pronoun."""
    words = clause.split()
    run = []
    for w in words:
        bare = w.strip(",.;:!?'\"")
        if not bare[:1].isupper() or bare.lower() in _PRONOUNS or bare.lower() in ("the", "a", "an"):
            break
        run.append(bare)
    if run and run[-1].endswith("'s"):
        run[-1] = run[-1][:-2]
    return " ".join(run)


def split_claims(text: str) -> list[str]:
    """Atomic claims of `text`, each a full sentence that names its subject (see the module docstring)."""
    claims: list[str] = []
    last = ""  # the last named subject, for 'She ...' in a later sentence
    for sentence in split_sentences(_CITATIONS.sub("", text or "")):
        sentence = sentence.strip().rstrip(".!?").strip()
        parts = [p.strip() for p in _CONJUNCTION.split(sentence) if p.strip()]
        merged: list[str] = []
        for p in parts:  # 'arts and crafts' is one value, not two clauses: both sides must look like clauses
            if merged and (len(p.split()) < 2 or len(merged[-1].split()) < 3):
                merged[-1] = f"{merged[-1]} and {p}"
            else:
                merged.append(p)
        own = ""
        for i, part in enumerate(merged):
            first = part.split()[0]
            low = first.lower()
            if low in _PRONOUNS and (own or last):
                part = (own or last) + _PRONOUNS[low] + part[len(first):]
            elif i > 0 and first[:1].islower() and own:
                part = f"{own} {part}"  # '... and works for X': the sentence's subject is implied
            name = _subject(part)
            if name:
                own = own or name
                last = name
            claims.append(part[0].upper() + part[1:] + ".")
    return claims


# ---- the nli judge -----------------------------------------------------------------------------------------------

def claim_features(claim: str, hits: list[Hit]) -> tuple[np.ndarray, Hit | None, str]:
    """(feature vector in FEATURES order, the chunk that names the subject or None, the longest verbatim span)."""
    subject = set(content_words(_subject(claim)))
    words = [w for w in content_words(claim) if w not in subject]
    sets = [set(content_words(h.chunk.text)) for h in hits]
    main = next((i for i, s in enumerate(sets) if subject and subject <= s), None)
    if main is None and not subject:
        main = 0 if hits else None  # no named subject: the top chunk is the one to read
    f = np.zeros(len(FEATURES))
    f[0] = 1.0
    if not words or not hits:
        return f, None, ""
    k = len(hits)
    # rarity among the retrieved chunks: a word in every chunk says little, one only here says much
    weights = [math.log((k + 1) / (1 + sum(w in s for s in sets))) + 0.1 for w in words]
    total = sum(weights)
    in_main = [main is not None and w in sets[main] for w in words]
    elsewhere = [any(w in s for j, s in enumerate(sets) if j != main) for w in words]
    f[1] = float(main is not None)
    f[2] = sum(wt for wt, m in zip(weights, in_main) if m) / total
    f[3] = sum(wt for wt, m, e in zip(weights, in_main, elsewhere) if e and not m) / total
    f[4] = sum(wt for wt, m, e in zip(weights, in_main, elsewhere) if not m and not e) / total
    f[5] = sum(in_main) / len(words)
    span_text = ""
    if main is not None:
        span = find_span(words, hits[main].chunk.text)
        if span:
            span_text = hits[main].chunk.text[span[0]:span[1]]
            f[6] = len(set(content_words(span_text)) & set(words)) / len(set(words))
    # the value of a claim is mostly its end ('... works as a biologist') or its names and numbers
    tail = words[-1]
    f[7] = float(main is not None and tail in sets[main])
    f[8] = float(tail in set().union(*(s for j, s in enumerate(sets) if j != main)))
    values = [w.lower() for w in _WORD.findall(_CITATIONS.sub(" ", claim))[1:]
              if (w[0].isupper() or any(ch.isdigit() for ch in w)) and w.lower() not in subject]
    values = values or words
    f[9] = sum(main is not None and w in sets[main] for w in values) / len(values)
    return f, hits[main] if main is not None else None, span_text


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class NLIJudge:
    """Multinomial logistic regression from claim_features to LABELS. Saved as JSON (weights and names)."""

    name = "nli"

    def __init__(self, weights: np.ndarray | None = None):
        self.weights = np.zeros((len(FEATURES), len(LABELS))) if weights is None else np.asarray(weights, float)
        if self.weights.shape != (len(FEATURES), len(LABELS)):
            raise LmstackError(f"NLI weights must be {len(FEATURES)}x{len(LABELS)}, got {self.weights.shape}")

    def probs(self, claim: str, hits: list[Hit]) -> tuple[dict[str, float], str]:
        f, _, span = claim_features(claim, hits)
        p = _softmax(f @ self.weights)
        return dict(zip(LABELS, map(float, p))), span

    def fit(self, X: np.ndarray, y: np.ndarray, steps: int = 2000, lr: float = 0.5, l2: float = 1e-3) -> "NLIJudge":
        """Full-batch gradient descent on the cross-entropy (convex; 2k steps converge on these few features)."""
        onehot = np.eye(len(LABELS))[y]
        w = np.zeros((X.shape[1], len(LABELS)))
        for _ in range(steps):
            grad = X.T @ (_softmax(X @ w) - onehot) / len(X) + l2 * w
            w -= lr * grad
        self.weights = w
        return self

    @classmethod
    def train_on_world(cls, world: Any = None, n_people: int = 120, k: int = 5, seed: int = 0) -> "NLIJudge":
        """Fit on the world's facts: true claims (supported), swapped values (contradicted), people not in the
        evidence and claims whose sentence was cut from it (unverifiable). Evidence: BM25 over one bio each."""
        world = world or World(seed=seed, n_people=n_people)
        rng = random.Random(seed)
        people = world.people[:n_people]
        indexed = people[: int(len(people) * 0.8)]
        chunks = {p.name: Chunk(f"bio-{p.id}", f"bio-{p.id}", paraphrase_bio(p, rng, world), "world") for p in indexed}
        bm = BM25()
        bm.add([c.chunk_id for c in chunks.values()], [c.text for c in chunks.values()])
        by_id = {c.chunk_id: c for c in chunks.values()}
        X, y = [], []
        for person in people:
            for attribute in rng.sample(list(PERSON_ATTRIBUTES), 4):
                true_value = world.fact(person, attribute)
                for value, label in ((true_value, 0), (world.other_value(attribute, true_value, rng), 1)):
                    claim = answer_sentence(person, attribute, value)
                    hits = [Hit(by_id[i], s, r) for r, (i, s) in enumerate(bm.search(claim, k), 1)]
                    X.append(claim_features(claim, hits)[0])
                    y.append(label if person.name in chunks else 2)
                    if label == 0 and person.name in chunks and rng.random() < 0.5:
                        cut = _without(hits, chunks[person.name].chunk_id, true_value)
                        X.append(claim_features(claim, cut)[0])
                        y.append(2)
        return cls().fit(np.array(X), np.array(y))

    def save(self, path: str) -> None:
        payload = {"judge": "nli", "features": list(FEATURES), "labels": list(LABELS),
                   "weights": self.weights.tolist()}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "NLIJudge":
        try:
            payload = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise LmstackError(f"cannot read the NLI judge {path}: {e}") from None
        if payload.get("features") != list(FEATURES) or payload.get("labels") != list(LABELS):
            raise LmstackError(f"{path} was saved with other features/labels than this version's {FEATURES}")
        return cls(np.array(payload["weights"]))


def _without(hits: list[Hit], chunk_id: str, value: str) -> list[Hit]:
    """`hits` with the sentences stating `value` removed from chunk `chunk_id` (a claim the evidence is silent on)."""
    out = []
    for h in hits:
        if h.chunk.chunk_id == chunk_id:
            text = " ".join(s for s in split_sentences(h.chunk.text) if value.lower() not in s.lower())
            h = Hit(Chunk(h.chunk.chunk_id, h.chunk.doc_id, text, h.chunk.source, h.chunk.start,
                          h.chunk.start + len(text)), h.score, h.rank)
        out.append(h)
    return out


_DEFAULT_NLI: NLIJudge | None = None


def default_nli() -> NLIJudge:
    """The NLI judge trained on a fixed world (seed 0, 120 people), once per process (about a second)."""
    global _DEFAULT_NLI
    if _DEFAULT_NLI is None:
        _DEFAULT_NLI = NLIJudge.train_on_world()
    return _DEFAULT_NLI


# ---- the lm judge ------------------------------------------------------------------------------------------------

VERIFY_PROMPT = "Evidence:\n{evidence}\n\nClaim: {claim}\nIs the claim supported by the evidence? Answer yes or no."


class LMJudge:
    """P(yes) / (P(yes) + P(no)) for the LM's reply to VERIFY_PROMPT; the evidence is the subject's chunk."""

    name = "lm"

    def __init__(self, llm: Any, margin: float = 0.0):
        if llm is None or not hasattr(llm, "generate") or getattr(llm, "tokenizer", None) is None:
            raise LmstackError("the lm judge needs an lmstack.LLM with a tokenizer (pass llm=..., or use judge='nli')")
        self.llm, self.margin = llm, margin

    def _continuation_logprob(self, prefix: list[int], answers: list[str]) -> list[float]:
        tok = self.llm.tokenizer
        seqs = [prefix + tok.encode(a) for a in answers]
        limit = self.llm.engine.max_model_len
        seqs = [s[-limit:] for s in seqs]  # keep the answer; an over-long evidence loses its start
        outs = self.llm.generate(seqs, SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0.0))
        scores = []
        for seq, out, a in zip(seqs, outs, answers):
            n = len(tok.encode(a))
            rows = out.prompt_logprobs[-n:]
            scores.append(sum(row[t] for row, t in zip(rows, seq[-n:])))
        return scores

    def probs(self, claim: str, hits: list[Hit]) -> tuple[dict[str, float], str]:
        _, main, span = claim_features(claim, hits)
        if main is None:
            return {"supported": 0.0, "contradicted": 0.0, "unverifiable": 1.0}, ""
        user = VERIFY_PROMPT.format(evidence=" ".join(main.chunk.text.split()), claim=claim)
        prefix = self.llm.tokenizer.render_messages([{"role": "user", "content": user}], add_generation_prompt=True).ids
        yes, no = self._continuation_logprob(prefix, ["yes", "no"])
        p_yes = 1.0 / (1.0 + math.exp(max(-50.0, min(50.0, no - yes))))
        return {"supported": p_yes, "contradicted": 1.0 - p_yes, "unverifiable": 0.0}, span


JUDGES: dict[str, Callable[..., Any]] = {"nli": lambda llm: default_nli(), "lm": LMJudge}
"""judge name -> a factory taking the LLM (the nli judge ignores it)."""


class FactChecker:
    """check(text) -> one ClaimVerdict per atomic claim; revise(text) -> the supported claims only."""

    def __init__(self, llm: Any, retriever: Retriever, k: int = 5, mode: str = "hybrid", judge: str | Any = "nli"):
        if not hasattr(retriever, "search"):
            raise LmstackError(f"retriever must have search(query, k, mode); got {type(retriever).__name__}")
        if isinstance(judge, str):
            if judge not in JUDGES:
                raise LmstackError(f"judge={judge!r} is not allowed; choose one of {', '.join(JUDGES)}")
            judge = JUDGES[judge](llm)
        self.llm, self.retriever, self.k, self.mode, self.judge = llm, retriever, k, mode, judge

    def verdict(self, claim: str) -> ClaimVerdict:
        hits = list(self.retriever.search(claim, k=self.k, mode=self.mode))
        probs, span = self.judge.probs(claim, hits)
        label = max(probs, key=probs.get)
        return ClaimVerdict(claim, label, probs[label], probs, hits, span)

    def check(self, text: str) -> list[ClaimVerdict]:
        """Every atomic claim of `text`, judged against its own retrieved evidence."""
        return [self.verdict(c) for c in split_claims(text)]

    def revise(self, text: str, verdicts: list[ClaimVerdict] | None = None) -> str:
        """`text` rewritten as its supported claims only (contradicted and unverifiable ones dropped)."""
        verdicts = self.check(text) if verdicts is None else verdicts
        return " ".join(v.claim for v in verdicts if v.label == "supported")
