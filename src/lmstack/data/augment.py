"""Data augmentation: counterfactual gender swaps (bias mitigation) and noise perturbation (robustness).

Counterfactual data augmentation (CDA, Lu et al. 2018; Zmigrod et al. 2019) adds, for each
document that mentions gendered words or names, a copy with them swapped (he<->she, king<->queen,
John<->Mary, ...), so the corpus holds each context with both genders in equal measure. "her" is
ambiguous (him/his): we read it as possessive ("his") when a content word follows, else "him".

Noise perturbation adds copies with typos (swapped, dropped, doubled or keyboard-neighbour
characters), flipped letter case and disturbed whitespace, at a per-character `noise_rate`, so a
model sees the misspelt text it will meet in the wild.

Randomness is seeded by (seed, document id), so the result does not depend on how documents are
batched or which worker handles them.

Usage:
    from lmstack.data.augment import counterfactual, add_noise, AugmentConfig, Augmenter, gender_counts
    counterfactual("He gave his sister a book.")   # ('She gave her brother a book.', 3)
    result = Augmenter(AugmentConfig(counterfactual=True))(batch)  # originals + swapped copies
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field

from lmstack.data.document import Doc, StepResult

GENDER_PAIRS = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
    ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
    ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("prince", "princess"),
    ("princes", "princesses"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("nephews", "nieces"),
    ("mr", "mrs"), ("sir", "madam"), ("lord", "lady"), ("lords", "ladies"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("grandfather", "grandmother"), ("grandson", "granddaughter"), ("dad", "mom"),
    ("male", "female"), ("males", "females"), ("masculine", "feminine"), ("duke", "duchess"),
    ("actor", "actress"), ("waiter", "waitress"), ("boyfriend", "girlfriend"), ("groom", "bride"),
]
NAME_PAIRS = [
    ("john", "mary"), ("james", "patricia"), ("robert", "jennifer"), ("michael", "linda"), ("william", "elizabeth"),
    ("david", "barbara"), ("richard", "susan"), ("joseph", "jessica"), ("thomas", "sarah"), ("charles", "karen"),
    ("daniel", "nancy"), ("matthew", "lisa"), ("anthony", "betty"), ("mark", "margaret"), ("paul", "sandra"),
]
# After "her", these words mean it is an object ("saw her and ..."), so it becomes "him", not "his".
_OBJECT_CONTEXT = {"and", "or", "but", "to", "in", "on", "at", "for", "with", "from", "that", "the", "a", "an",
                   "as", "when", "if", "so", "because", "then", "again", "too", "up", "down", "out", "off",
                   "away", "back", "is", "was", "be", "been", "not", "of", "by", "into", "about", "this"}


def _swap_table(pairs: list[tuple[str, str]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for a, b in pairs:
        table.setdefault(a, b)  # first pair wins: "lady" -> "lord", not "gentleman"
        table.setdefault(b, a)
    table.pop("her", None)  # handled by context
    return table


_TABLE = _swap_table(GENDER_PAIRS + NAME_PAIRS)
_TOKEN = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def counterfactual(text: str, extra_pairs: list[tuple[str, str]] | None = None) -> tuple[str, int]:
    """`text` with gendered words and names swapped (case kept), and the number of swaps."""
    table = _swap_table(GENDER_PAIRS + NAME_PAIRS + list(extra_pairs or [])) if extra_pairs else _TABLE
    tokens = _TOKEN.findall(text)
    out, swaps = [], 0
    for i, tok in enumerate(tokens):
        low = tok.lower()
        if low == "her":
            nxt = next((t.lower() for t in tokens[i + 1:] if t.isalpha()), "")
            gap = tokens[i + 1] if i + 1 < len(tokens) else ""
            possessive = gap == " " and nxt and nxt not in _OBJECT_CONTEXT
            out.append(_match_case("his" if possessive else "him", tok))
            swaps += 1
        elif low in table:
            out.append(_match_case(table[low], tok))
            swaps += 1
        else:
            out.append(tok)
    return "".join(out), swaps


def gender_counts(texts: list[str]) -> dict[str, int]:
    """Occurrences of the male vs female side of the gendered word/name pairs (for the bias report)."""
    male = {a for a, _ in GENDER_PAIRS + NAME_PAIRS}
    female = {b for _, b in GENDER_PAIRS + NAME_PAIRS}
    counts = {"male": 0, "female": 0}
    for t in texts:
        for w in re.findall(r"[a-z]+", t.lower()):
            if w in male:
                counts["male"] += 1
            elif w in female:
                counts["female"] += 1
    return counts


_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _neighbour(ch: str, rng: random.Random) -> str:
    low = ch.lower()
    for row in _KEYBOARD:
        j = row.find(low)
        if j >= 0:
            options = [row[k] for k in (j - 1, j + 1) if 0 <= k < len(row)]
            return rng.choice(options)
    return ch


def add_noise(text: str, rate: float, rng: random.Random) -> str:
    """Perturb about `rate` of the characters: typo (swap/drop/double/neighbour key), case flip or whitespace."""
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        ch = chars[i]
        if rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        op = rng.randrange(6)
        if ch.isspace():
            out.append(ch * 2 if op % 2 else "")  # double or remove a space
        elif op == 0 and i + 1 < len(chars):  # swap with the next character
            out.extend([chars[i + 1], ch])
            i += 1
        elif op == 1:
            pass  # drop
        elif op == 2:
            out.append(ch * 2)
        elif op == 3:
            out.append(_neighbour(ch, rng))
        elif op == 4:
            out.append(ch.swapcase())
        else:
            out.extend([ch, " "])
        i += 1
    return "".join(out)


@dataclass
class AugmentConfig:
    """Which augmented copies to add to the corpus."""

    counterfactual: bool = False
    """Add a gender-swapped copy of each document that has gendered words or names."""
    counterfactual_fraction: float = 1.0
    """Fraction of eligible documents that get a swapped copy."""
    extra_pairs: list[list[str]] = field(default_factory=list)
    """More swap pairs, e.g. [['alaric', 'brenna']] for names of the synthetic world."""
    noise: bool = False
    """Add noisy copies (typos, case, whitespace)."""
    noise_fraction: float = 0.1
    """Fraction of documents that get a noisy copy."""
    noise_rate: float = 0.03
    """Per-character perturbation probability in a noisy copy."""
    seed: int = 0
    """Seed (combined with each document id)."""

    def __post_init__(self) -> None:
        for name in ("counterfactual_fraction", "noise_fraction", "noise_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name}={getattr(self, name)} must be in [0, 1]")
        if any(len(p) != 2 for p in self.extra_pairs):
            raise ValueError("augment.extra_pairs must be a list of [male, female] pairs")


class Augmenter:
    """Keep every document and append augmented copies (ids '<id>#cda', '<id>#noise')."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.pairs = [(a.lower(), b.lower()) for a, b in cfg.extra_pairs]

    def _rng(self, doc_id: str, salt: str) -> random.Random:
        return random.Random(zlib.crc32(f"{self.cfg.seed}|{salt}|{doc_id}".encode()))

    def __call__(self, batch: list[Doc]) -> StepResult:
        out = list(batch)
        result = StepResult(out, [])
        for doc in batch:
            if self.cfg.counterfactual and self._rng(doc["id"], "cda").random() < self.cfg.counterfactual_fraction:
                swapped, n = counterfactual(doc["text"], self.pairs)
                if n:
                    out.append({**doc, "id": doc["id"] + "#cda", "text": swapped,
                                "meta": {**doc["meta"], "augment": "counterfactual"}})
                    result.modified["counterfactual"] += 1
            if self.cfg.noise:
                rng = self._rng(doc["id"], "noise")
                if rng.random() < self.cfg.noise_fraction:
                    out.append({**doc, "id": doc["id"] + "#noise", "text": add_noise(doc["text"], self.cfg.noise_rate, rng),
                                "meta": {**doc["meta"], "augment": "noise"}})
                    result.modified["noise"] += 1
        return result

    @property
    def enabled(self) -> bool:
        return self.cfg.counterfactual or self.cfg.noise
