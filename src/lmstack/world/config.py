"""WorldConfig: how big the synthetic world is, which seed builds it, and which corpora to write.

A size name picks a preset of counts (SIZE_PRESETS); any count can be overridden one by one, which
is how tests build tiny worlds in milliseconds.

Usage:
    from lmstack.world.config import WorldConfig
    cfg = WorldConfig(size="small", seed=3)
    tiny = WorldConfig(size="small", n_people=20, n_arithmetic=30, corpora=("qa", "arithmetic"))
    cfg.count("n_people")   # the override if set, else the preset's number
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from lmstack.config import ConfigError

Size = Literal["small", "medium", "large"]

# Every corpus the generator can write, in writing order. Each name is a folder of
# train/val/test JSONL files; corpora.py maps each name to its builder.
CORPUS_NAMES: tuple[str, ...] = (
    "pretrain", "qa", "arithmetic", "instructions", "preferences", "passkey", "code", "chat", "quality",
)

# Counts per size. Pretraining text is mostly bios (people x bios_per_person x ~330 B), then worked
# arithmetic (~415 B each), stories, dialogues and mixed QA: ~2 / ~20 / ~100 MB of pretraining text.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "small": dict(n_people=500, bios_per_person=4, n_cities=40, n_countries=8, n_companies=60,
                  n_universities=16, n_arithmetic=1500, n_instructions=1000, n_preferences=1200,
                  n_passkey=48, n_code=80, n_stories=1000, n_dialogues=500, qa_per_fact=2, n_quality=2000),
    "medium": dict(n_people=5000, bios_per_person=5, n_cities=120, n_countries=16, n_companies=300,
                   n_universities=40, n_arithmetic=12000, n_instructions=6000, n_preferences=8000,
                   n_passkey=240, n_code=300, n_stories=8000, n_dialogues=4000, qa_per_fact=2,
                   n_quality=10000),
    "large": dict(n_people=25000, bios_per_person=6, n_cities=300, n_countries=30, n_companies=1200,
                  n_universities=100, n_arithmetic=60000, n_instructions=20000, n_preferences=30000,
                  n_passkey=600, n_code=600, n_stories=30000, n_dialogues=15000, qa_per_fact=1,
                  n_quality=20000),
}


@dataclass
class WorldConfig:
    size: Size = "small"
    """Preset of counts: small (~2 MB pretraining text, seconds), medium (~20 MB), large (~100 MB)."""
    seed: int = 0
    """Seed of every random choice. The same seed and config give byte-identical files."""
    corpora: tuple[str, ...] = CORPUS_NAMES
    """Which corpora generate_world writes (subset of CORPUS_NAMES). The entity table is always written."""
    n_people: int | None = None
    """Number of people (each gets bios and QA pairs). None uses the size preset."""
    bios_per_person: int | None = None
    """Biography paraphrases per person in the pretraining train split (bioS 'multi' augmentation)."""
    n_cities: int | None = None
    """Number of cities. None uses the size preset."""
    n_countries: int | None = None
    """Number of countries (each has at least one city). None uses the size preset."""
    n_companies: int | None = None
    """Number of employers. None uses the size preset."""
    n_universities: int | None = None
    """Number of universities. None uses the size preset."""
    n_arithmetic: int | None = None
    """Number of arithmetic word problems over all splits. None uses the size preset."""
    n_instructions: int | None = None
    """Number of verifiable-instruction records over all splits. None uses the size preset."""
    n_preferences: int | None = None
    """Number of preference pairs over all splits. None uses the size preset."""
    n_passkey: int | None = None
    """Number of long passkey documents over all splits. None uses the size preset."""
    n_code: int | None = None
    """Number of HumanEval-style code tasks (capped by how many distinct tasks the families allow)."""
    n_stories: int | None = None
    """Number of short stories in the pretraining corpus. None uses the size preset."""
    n_dialogues: int | None = None
    """Number of short dialogues in the pretraining corpus. None uses the size preset."""
    n_quality: int | None = None
    """Number of good/bad documents for the quality classifier and self-training. None uses the preset."""
    quality_labelled_fraction: float = 0.2
    """Share of the quality corpus's train split whose label a trainer may see; the rest is the unlabelled pool."""
    qa_per_fact: int | None = None
    """Training questions per (person, attribute), each in a different training phrasing."""
    qa_val_fraction: float = 0.1
    """Fraction of people whose QA pairs form the val split (their bios stay in pretraining)."""
    qa_test_fraction: float = 0.3
    """Fraction of people whose QA pairs form the test split: never seen as QA in any training file."""
    mix_qa_in_pretrain: bool = True
    """Also put train-split QA pairs in the pretraining corpus ('mixed training', Allen-Zhu & Li 3.1)."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test fractions for item corpora (arithmetic, instructions, preferences, code, ...)."""
    arithmetic_max_steps: int = 5
    """Hardest arithmetic difficulty: number of operations in the solution (1..8)."""
    passkey_lengths: tuple[int, ...] = (256, 1024, 4096)
    """Lengths of the passkey documents, cycled through; measured in passkey_unit."""
    passkey_unit: Literal["words", "chars"] = "words"
    """Unit of passkey_lengths: words or chars."""
    passkey_filler: Literal["world", "repeat"] = "world"
    """Haystack text: 'world' sentences (varied, with distractor numbers) or the classic repeated lines."""

    def __post_init__(self) -> None:
        if self.size not in SIZE_PRESETS:
            raise ConfigError(f"size={self.size!r} is not allowed; choose one of {', '.join(SIZE_PRESETS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        self.corpora = tuple(self.corpora)
        bad = [c for c in self.corpora if c not in CORPUS_NAMES]
        if bad:
            raise ConfigError(f"corpora has unknown name {bad[0]!r}; choose from {', '.join(CORPUS_NAMES)}")
        for name in SIZE_PRESETS["small"]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.n_countries is not None and self.n_cities is not None and self.n_countries > self.n_cities:
            raise ConfigError(f"n_countries={self.n_countries} must not exceed n_cities={self.n_cities}")
        for name in ("qa_val_fraction", "qa_test_fraction", "quality_labelled_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {v!r}")
        if self.qa_val_fraction + self.qa_test_fraction >= 1.0:
            raise ConfigError("qa_val_fraction + qa_test_fraction must be < 1 so some people are left for training")
        fr = tuple(float(x) for x in self.split_fractions)
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"split_fractions must be three positive numbers summing to 1, "
                              f"got {self.split_fractions!r}")
        self.split_fractions = fr
        if not 1 <= self.arithmetic_max_steps <= 8:
            raise ConfigError(f"arithmetic_max_steps must be in 1..8, got {self.arithmetic_max_steps!r}")
        self.passkey_lengths = tuple(self.passkey_lengths)
        if not self.passkey_lengths or any(int(n) < 32 for n in self.passkey_lengths):
            raise ConfigError(f"passkey_lengths must be a non-empty list of lengths >= 32, "
                              f"got {self.passkey_lengths!r}")
        if self.passkey_unit not in ("words", "chars"):
            raise ConfigError(f"passkey_unit={self.passkey_unit!r} is not allowed; choose 'words' or 'chars'")
        if self.passkey_filler not in ("world", "repeat"):
            raise ConfigError(f"passkey_filler={self.passkey_filler!r} is not allowed; choose 'world' or 'repeat'")

    def count(self, name: str) -> int:
        """The number for count field `name`: the override when set, else the size preset's."""
        value = getattr(self, name)
        return SIZE_PRESETS[self.size][name] if value is None else value


def sub_rng(seed: int, *names: object) -> random.Random:
    """An independent random stream for (seed, names...).

    Each corpus draws from its own stream, so adding a corpus or changing one count never shifts
    the draws of another. sha256, not hash(), because str hashing is salted per process.
    """
    key = "/".join([str(seed), *map(str, names)]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def assign_split(rng: random.Random, fractions: tuple[float, float, float]) -> str:
    """Draw 'train', 'val' or 'test' with the given probabilities."""
    u = rng.random()
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


__all__ = ["WorldConfig", "SIZE_PRESETS", "CORPUS_NAMES", "sub_rng", "assign_split"]
