"""Factuality reward: the claims a completion makes about the world, checked against its fact table.

A claim is a sentence "<subject> <relation> <value>", where the subject is a person or city of
the world (or He/She/It, meaning the last one named) and the relation is one of the phrasings the
world itself uses (RELATIONS: "was born in" -> birth_city, "works for" -> employer, "flows through"
-> river, ...). Each claim is true when the value states the world's fact (`World.is_correct`).
When the record names the (person, attribute) a question asked about, the completion as a whole is
one more claim about that fact, so a bare answer ("Amberhaven.") counts too.

    reward = (true claims - false claims) / claims        in [-1, 1]; 0 when no claim is made

so stating nothing earns nothing, and each false statement costs as much as a true one earns.

Usage:
    from lmstack.world import World
    from lmstack.align.rewards.factuality import FactualityReward, extract_claims
    world = World(seed=0, n_people=20)
    p = world.people[0]
    reward = FactualityReward(world)
    reward("Where was she born?", f"{p.name} was born in {p.birth_city}.", {})      # 1.0
    extract_claims(world, f"{p.name} works for Nowhere Inc. She was born in {p.birth_city}.")
"""
from __future__ import annotations

import re

from lmstack.align.rewards.base import Reward, register
from lmstack.errors import LmstackError

# attribute -> relation phrasings (after the subject). Person attributes first, then city ones.
PERSON_RELATIONS: dict[str, tuple[str, ...]] = {
    "birth_date": ("was born on", "came into this world on", "entered the world on"),
    "birth_city": ("was born in", "hails from", "is a native of", "grew up in"),
    "university": ("studied at", "graduated from", "attended", "is a graduate of"),
    "major": ("majored in", "earned a degree in", "specialized in"),
    "employer": ("works for", "is employed by", "has a job at"),
    "employer_city": ("works in", "commutes to"),
    "profession": ("works as a", "works as an", "works as", "is employed as"),
    "hobby": ("enjoys", "loves", "spends free time on"),
}
CITY_RELATIONS: dict[str, tuple[str, ...]] = {
    "country": ("is in", "lies in", "is a city in", "is located in"),
    "famous_for": ("is known for", "is famous for"),
    "founded": ("was founded in",),
}
_PRONOUNS = {"he", "she", "they", "it"}
_SENTENCE = re.compile(r"[^.!?\n]+")


class _Matcher:
    """Compiled name and relation patterns for one world (built once per reward)."""

    def __init__(self, world):
        self.world = world
        people = sorted((p.name for p in world.people), key=len, reverse=True)
        cities = sorted((c.name for c in world.cities), key=len, reverse=True)
        self.kind = {**{n: "person" for n in people}, **{n: "city" for n in cities}}
        names = "|".join(map(re.escape, people + cities))
        self.subject = re.compile(rf"^\s*(?:the records show that\s+)?(?P<s>{names}|he|she|they|it)\b", re.I)
        self.relations = {kind: [(attr, re.compile(rf"^\s+{re.escape(phrase)}\s+(?P<v>.+)$", re.I))
                                 for attr, phrases in table.items() for phrase in phrases]
                          for kind, table in (("person", PERSON_RELATIONS), ("city", CITY_RELATIONS))}
        self.canonical = {n.lower(): n for n in self.kind}


def extract_claims(world, text: str, matcher: _Matcher | None = None) -> list[tuple[str, str, str]]:
    """(subject, attribute, value text) for every recognisable claim in `text`, in order."""
    m = matcher or _Matcher(world)
    claims, last = [], None
    for sentence in _SENTENCE.findall(text):
        hit = m.subject.match(sentence)
        if hit is None:
            continue
        said = hit.group("s")
        subject = last if said.lower() in _PRONOUNS else m.canonical[said.lower()]
        if subject is None:
            continue
        last = subject
        rest = sentence[hit.end():]
        for attr, pattern in m.relations[m.kind[subject]]:
            found = pattern.match(rest)
            if found:
                claims.append((subject, attr, found.group("v").strip()))
                break
    return claims


@register
class FactualityReward(Reward):
    name = "factuality"

    def __init__(self, world=None):
        if world is None:
            raise LmstackError("the factuality reward needs world=World(...) (the fact table it checks against)")
        self.world = world
        self._matcher = _Matcher(world)

    def verdicts(self, completion: str, record: dict) -> list[bool]:
        """One True/False per claim: the extracted claims, plus the record's asked-about fact."""
        out = [self.world.is_correct(s, a, v) for s, a, v in extract_claims(self.world, completion, self._matcher)]
        person, attribute = record.get("person"), record.get("attribute")
        if isinstance(person, str) and isinstance(attribute, str) and person in self._matcher.kind:
            out.append(self.world.is_correct(person, attribute, completion))
        return out

    def score(self, prompt: str, completion: str, record: dict) -> float:
        v = self.verdicts(completion, record)
        return (sum(v) - (len(v) - sum(v))) / len(v) if v else 0.0
