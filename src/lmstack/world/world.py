"""World: the in-memory synthetic world that later stages use to build tasks and check answers.

A World is fully determined by its WorldConfig (seed + size + overrides). Stages that grade a
model's output rebuild the same World from the seed stored in the manifest and ask it:
`world.fact("Ada Ashford", "birth_city")` for factuality rewards, `world.qa_split(person)` to
know whether a person's QA pairs were held out, `world.corpus("arithmetic")` for the answers.

Usage:
    from lmstack.world import World
    world = World(seed=0, size="small")
    p = world.people[0]
    world.fact(p, "employer")               # -> "Quill Foods"
    world.fact("Amberhaven", "country")     # cities, countries, companies, universities too
    world.qa_split(p)                       # -> "train" | "val" | "test"
    world.is_correct(p, "employer", "She works for quill foods.")   # -> True (factuality reward)
    World.from_manifest("data/world")       # the world a generate_world run wrote
    records = world.corpus("qa")            # list of dicts, each with text/id/source/split/kind
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from lmstack.config import from_dict
from lmstack.world.checkers import states_fact
from lmstack.world.config import WorldConfig, sub_rng
from lmstack.world.entities import (
    CITY_ATTRIBUTES, COUNTRY_ATTRIBUTES, PERSON_ATTRIBUTES, City, Company, Country, Person, University,
    build_entities,
)
from lmstack.errors import LmstackError
from lmstack.world.corpora import CORPORA


class World:
    """People, places and facts for one (seed, size); see the module docstring."""

    def __init__(self, seed: int = 0, size: str = "small", config: WorldConfig | None = None, **overrides: Any):
        if config is None:
            config = WorldConfig(size=size, seed=seed, **overrides)
        elif overrides:
            raise LmstackError("pass either config= or keyword overrides to World, not both")
        self.config = config
        self.seed = config.seed
        ents = build_entities(config)
        self.people: list[Person] = ents.people
        self.cities: list[City] = ents.cities
        self.countries: list[Country] = ents.countries
        self.companies: list[Company] = ents.companies
        self.universities: list[University] = ents.universities
        self._entities = ents
        self._by_name: dict[str, Any] = {}
        for group in (self.countries, self.cities, self.companies, self.universities, self.people):
            for e in group:
                self._by_name[e.name] = e
        self._qa_split = self._draw_qa_splits()

    # ---- lookups -------------------------------------------------------------------------------
    def person(self, name: str | Person) -> Person:
        """The Person called `name` (a Person passes through)."""
        return self._get(name, Person, "person")

    def city(self, name: str | City) -> City:
        """The City called `name`."""
        return self._get(name, City, "city")

    def country(self, name: str | Country) -> Country:
        """The Country called `name`."""
        return self._get(name, Country, "country")

    def _get(self, name, cls, what):
        if isinstance(name, cls):
            return name
        e = self._by_name.get(name)
        if not isinstance(e, cls):
            raise LmstackError(f"no {what} named {name!r} in the world (seed={self.seed}, size={self.config.size})")
        return e

    def fact(self, subject: str | Any, attribute: str) -> str:
        """The true value of `attribute` for a person, city, country, company or university, as text.

        This is the ground truth a factuality reward compares a model's answer with.
        """
        e = self._by_name.get(subject) if isinstance(subject, str) else subject
        if e is None:
            raise LmstackError(f"no entity named {subject!r} in the world (seed={self.seed})")
        allowed = attributes_of(e)
        if attribute not in allowed:
            raise LmstackError(f"{type(e).__name__} has no attribute {attribute!r}; choose one of {', '.join(allowed)}")
        value = getattr(e, attribute)
        return f"{value:,}" if attribute == "population" else str(value)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> "World":
        """Rebuild the World a generate_world run wrote (path: its manifest.json or its folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmstackError(f"no world manifest at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmstackError(f"world manifest {path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or "config" not in manifest:
            raise LmstackError(f"{path} is not a world manifest (no 'config' key)")
        return cls(config=from_dict(WorldConfig, manifest["config"]))

    def is_correct(self, subject: str | Any, attribute: str, answer: str) -> bool:
        """Whether a free-text `answer` states the true value of `attribute` (a factuality reward).

        Case, punctuation and spacing are ignored; the fact must appear as a whole phrase, so
        "Amberhaven" does not match "Amberhavenport" and a wrong city or date is rejected.
        """
        return states_fact(self.fact(subject, attribute), answer)

    def facts(self) -> list[tuple[str, str, str]]:
        """Every (subject, attribute, value) triple of the world, people first, in a fixed order."""
        out = []
        for group in (self.people, self.cities, self.countries):
            for e in group:
                out.extend((e.name, a, self.fact(e, a)) for a in attributes_of(e))
        return out

    def other_value(self, attribute: str, true_value: str, rng) -> str:
        """A plausible but wrong value for a person `attribute` (for wrong answers in preference pairs)."""
        for _ in range(100):
            value = self.fact(rng.choice(self.people), attribute)
            if value != true_value:
                return value
        raise LmstackError(f"the world has only one value of {attribute!r}; cannot make a wrong answer")

    # ---- QA split --------------------------------------------------------------------------------
    def _cut(self, names: list[str], stream: str, val: float, test: float) -> dict[str, str]:
        # A shuffled list is cut into test / val / train blocks, so the held-out fractions are
        # exact rather than only expected (and never empty once there are 3+ names).
        rng = sub_rng(self.seed, stream)
        order = list(names)
        rng.shuffle(order)
        n = len(order)
        n_test = max(1, round(n * test)) if n >= 3 else 0
        n_val = max(1, round(n * val)) if n >= 3 else 0
        return {name: "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                for rank, name in enumerate(order)}

    def _draw_qa_splits(self) -> dict[str, str]:
        cfg = self.config
        self._city_split = self._cut([c.name for c in self.cities], "city-split", cfg.split_fractions[1],
                                     cfg.split_fractions[2])
        return self._cut([p.name for p in self.people], "qa-split", cfg.qa_val_fraction, cfg.qa_test_fraction)

    def qa_split(self, person: str | Person) -> str:
        """Which QA split holds this person's questions: train (seen in SFT), val or test (held out)."""
        return self._qa_split[self.person(person).name]

    def city_split(self, city: str | City) -> str:
        """Which split prompts about this city belong to (helpfulness, safety and look-alike pairs).

        Cities are cut by split_fractions, so held-out safety prompts name cities that no training
        safety prompt mentions.
        """
        return self._city_split[self.city(city).name]

    def people_in(self, split: str) -> list[Person]:
        """The people whose QA pairs are in `split`, in world order."""
        return [p for p in self.people if self._qa_split[p.name] == split]

    # ---- corpora ---------------------------------------------------------------------------------
    def iter_corpus(self, name: str) -> Iterator[dict]:
        """Yield the records of corpus `name` (see corpora.CORPORA), each with a `split` field."""

        if name not in CORPORA:
            raise LmstackError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
        return CORPORA[name](self)

    def corpus(self, name: str, split: str | None = None) -> list[dict]:
        """All records of corpus `name`, or only those of one split."""
        return [r for r in self.iter_corpus(name) if split is None or r["split"] == split]

    def to_json(self) -> dict:
        """The entity table plus each person's QA split (written as world.json)."""
        data = self._entities.to_json()
        for p in data["people"]:
            p["qa_split"] = self._qa_split[p["name"]]
        return data


def attributes_of(entity: Any) -> tuple[str, ...]:
    """The fact attributes defined for this kind of entity."""
    if isinstance(entity, Person):
        return PERSON_ATTRIBUTES
    if isinstance(entity, City):
        return CITY_ATTRIBUTES
    if isinstance(entity, Country):
        return COUNTRY_ATTRIBUTES
    if isinstance(entity, Company):
        return ("city", "industry", "founded")
    if isinstance(entity, University):
        return ("city", "founded")
    raise LmstackError(f"{entity!r} is not an entity of the world")
