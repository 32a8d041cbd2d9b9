"""Verifiable instructions (IFEval-style), each checked by a small deterministic function.

A record holds the `instruction`, the `checker` name and its `args`, a `response` that follows
the instruction and a `bad_response` that breaks it. `check_instruction(record, response)` is
the verifiable reward: it runs CHECKERS[record["checker"]](response, **record["args"]).
Content comes from city and country facts only, never from people, so the QA hold-out stays clean.

Usage:
    from lmstack.world import World, check_instruction
    rec = World(seed=0, n_people=10).corpus("instructions")[0]
    rec["instruction"], rec["checker"], rec["args"]
    check_instruction(rec, rec["response"])       # True
    check_instruction(rec, rec["bad_response"])   # False
"""
from __future__ import annotations

import json
import random
import re
from typing import Callable, Iterator

from lmstack.world import lexicon as lx
from lmstack.world.bios import describe_city
from lmstack.world.config import assign_split, sub_rng
from lmstack.errors import LmstackError

_INT = re.compile(r"-?\d+")
_WORD = re.compile(r"[A-Za-z0-9']+")


def _clean(text: str) -> str:
    return text.strip().strip(".!\"'`").strip().lower()


def _first_int(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group()) if m else None


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


# ---- checkers: name -> f(response, **args) -> bool ----------------------------------------------
CHECKERS: dict[str, Callable[..., bool]] = {
    "reverse_word": lambda r, word: _clean(r) == word[::-1].lower(),
    "count_letter": lambda r, letter, word, count: _first_int(r) == count,
    "word_length": lambda r, word, count: _first_int(r) == count,
    "first_letter": lambda r, word: _clean(r) == word[0].lower(),
    "sort_numbers": lambda r, numbers, descending: (
        [int(x) for x in _INT.findall(r)] == sorted(numbers, reverse=descending)),
    "uppercase": lambda r, must_contain: bool(re.search("[A-Z]", r)) and r == r.upper() and must_contain.upper() in r,
    "lowercase": lambda r, must_contain: bool(re.search("[a-z]", r)) and r == r.lower() and must_contain.lower() in r,
    "max_words": lambda r, n: 1 <= len(_words(r)) <= n,
    "min_words": lambda r, n: len(_words(r)) >= n,
    "starts_with": lambda r, prefix: r.lstrip().startswith(prefix),
    "ends_with": lambda r, suffix: r.rstrip().endswith(suffix),
    "include_word": lambda r, word: re.search(rf"\b{re.escape(word)}\b", r, re.I) is not None,
    "exclude_word": lambda r, word: bool(r.strip()) and re.search(rf"\b{re.escape(word)}\b", r, re.I) is None,
    "no_commas": lambda r: bool(r.strip()) and "," not in r,
    "bullet_count": lambda r, n: sum(1 for line in r.splitlines() if line.lstrip().startswith(("- ", "* "))) == n,
    "repeat_word": lambda r, word, n: [w.lower() for w in _words(r)] == [word.lower()] * n,
    "quoted": lambda r: len(r.strip()) > 2 and r.strip()[0] == '"' and r.strip()[-1] == '"',
}


def _json_keys(r: str, keys: list[str]) -> bool:
    try:
        obj = json.loads(r)
    except ValueError:
        return False
    return isinstance(obj, dict) and sorted(obj) == sorted(keys)


CHECKERS["json_keys"] = _json_keys


def check_instruction(record: dict, response: str) -> bool:
    """True when `response` satisfies the verifiable instruction in `record` (a record of this corpus)."""
    name = record.get("checker")
    if name not in CHECKERS:
        raise LmstackError(f"record has unknown checker {name!r}; known checkers: {', '.join(CHECKERS)}")
    if not isinstance(response, str):
        raise LmstackError(f"response must be a string, got {type(response).__name__}")
    return bool(CHECKERS[name](response, **record.get("args", {})))


# ---- generators: name -> f(rng, world) -> (instruction, args, good, bad) ------------------------
def _city_fact(rng, world):
    city = rng.choice(world.cities)
    return city, f"{city.name} is in {city.country}"


def _reverse(rng, world):
    word = rng.choice(lx.PLAIN_WORDS)
    phrasing = rng.choice(["Reverse the word '{w}'.", "Write '{w}' backwards.",
                           "Spell the word '{w}' in reverse order."])
    return (phrasing.format(w=word),
            {"word": word}, word[::-1], word)


def _count_letter(rng, world):
    word = rng.choice(lx.PLAIN_WORDS + tuple(c.name.lower() for c in world.cities))
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (f"How many times does the letter '{letter}' appear in '{word}'? Answer with a number.",
            {"letter": letter, "word": word, "count": n}, str(n), str(n + rng.choice([1, 2])))


def _word_length(rng, world):
    word = rng.choice(lx.PLAIN_WORDS)
    return (f"How many letters are in the word '{word}'?", {"word": word, "count": len(word)},
            f"The word '{word}' has {len(word)} letters.", f"The word '{word}' has {len(word) - 1} letters.")


def _first_letter(rng, world):
    word = rng.choice(lx.PLAIN_WORDS)
    other = next(c for c in "zqxjkv" if c != word[0])
    return f"What is the first letter of '{word}'? Reply with the letter only.", {"word": word}, word[0], other


def _sort_numbers(rng, world):
    numbers = rng.sample(range(1, 100), rng.randint(4, 8))
    descending = rng.random() < 0.3
    if numbers == sorted(numbers, reverse=descending):
        numbers.reverse()
    order = "descending" if descending else "ascending"
    return (f"Sort these numbers in {order} order: {', '.join(map(str, numbers))}.",
            {"numbers": numbers, "descending": descending},
            ", ".join(map(str, sorted(numbers, reverse=descending))), ", ".join(map(str, numbers)))


def _uppercase(rng, world):
    if rng.random() < 0.5:
        country = rng.choice(world.countries)
        question, answer, key = (f"What is the capital of {country.name}?",
                                 f"The capital of {country.name} is {country.capital}.", country.capital)
    else:
        city = rng.choice(world.cities)
        question, answer, key = f"In which country is {city.name}?", f"{city.name} is in {city.country}.", city.country
    return f"{question} Answer in uppercase letters only.", {"must_contain": key}, answer.upper(), answer


def _lowercase(rng, world):
    if rng.random() < 0.5:
        country = rng.choice(world.countries)
        question, answer, key = (f"Which language is spoken in {country.name}?",
                                 f"People in {country.name} speak {country.language}.", country.language)
    else:
        city = rng.choice(world.cities)
        question, answer, key = (f"Which river flows through {city.name}?",
                                 f"The {city.river} flows through {city.name}.", city.river)
    return f"{question} Write your answer in lowercase letters only.", {"must_contain": key}, answer.lower(), answer


def _max_words(rng, world):
    city = rng.choice(world.cities)
    n = rng.randint(8, 20)
    short = f"{city.name} lies in {city.country} on the {city.river}."
    long = describe_city(city, rng, n_sentences=6)
    return f"Describe {city.name} in at most {n} words.", {"n": n}, short, long


def _min_words(rng, world):
    city = rng.choice(world.cities)
    n = rng.randint(25, 40)
    long = describe_city(city, rng, n_sentences=8)
    while len(_words(long)) < n:
        long += f" {city.name} welcomes visitors all year round."
    return (f"Write at least {n} words about {city.name}.", {"n": n}, long, f"{city.name} is a city.")


def _starts_with(rng, world):
    city, fact = _city_fact(rng, world)
    prefix = rng.choice(["Indeed", "Certainly", "Well", "In short"])
    return (f"In which country is {city.name}? Begin your answer with the word '{prefix}'.", {"prefix": prefix},
            f"{prefix}, {fact}.", f"{fact}.")


def _ends_with(rng, world):
    city, fact = _city_fact(rng, world)
    suffix = rng.choice(["Thank you.", "That is all.", "Safe travels!"])
    return (f"Where is {city.name}? End your answer with '{suffix}'", {"suffix": suffix},
            f"{fact}. {suffix}", f"{suffix} {fact}.")


def _include_word(rng, world):
    city = rng.choice(world.cities)
    return (f"Tell me something about {city.name} and use the word 'river'.", {"word": "river"},
            f"The {city.river} river flows through {city.name}.",
            f"Visitors to {city.name} rarely miss {city.landmark}.")


def _exclude_word(rng, world):
    city = rng.choice(world.cities)
    word = city.country
    return (f"Describe {city.name} without mentioning the name '{word}'.", {"word": word},
            f"{city.name} is known for {city.famous_for}.", f"{city.name} is a city in {city.country}.")


def _no_commas(rng, world):
    country = rng.choice(world.countries)
    cities = list(country.cities)[:4]
    good = f"The cities of {country.name} include " + " and ".join(cities) + "."
    bad = f"The cities of {country.name} include {cities[0]}, among others." if len(cities) == 1 else \
        f"The cities of {country.name} include " + ", ".join(cities) + "."
    return f"Name some cities of {country.name} without using any commas.", {}, good, bad


def _bullet_count(rng, world):
    city = rng.choice(world.cities)
    n = rng.randint(2, 4)
    facts = [f"It lies in {city.country}.", f"The {city.river} river flows through it.",
             f"It is known for {city.famous_for}.", f"It was founded in {city.founded}."]
    good = "\n".join("- " + f for f in facts[:n])
    bad = "\n".join("- " + f for f in facts[:n - 1]) if n > 1 else " ".join(facts)
    return f"Give exactly {n} bullet points about {city.name}.", {"n": n}, good, bad


def _repeat_word(rng, world):
    word = rng.choice(lx.PLAIN_WORDS)
    n = rng.randint(2, 6)
    return (f"Write the word '{word}' exactly {n} times, separated by spaces.", {"word": word, "n": n},
            " ".join([word] * n), " ".join([word] * (n + 1)))


def _quoted(rng, world):
    city, fact = _city_fact(rng, world)
    return (f"Where is {city.name}? Wrap your whole answer in double quotes.", {}, f'"{fact}."', f"{fact}.")


def _json(rng, world):
    city = rng.choice(world.cities)
    keys = ["city", "country"]
    good = json.dumps({"city": city.name, "country": city.country})
    return (f"Return a JSON object with the keys 'city' and 'country' for {city.name}.", {"keys": keys},
            good, f"{city.name} is in {city.country}.")


GENERATORS: dict[str, Callable] = {
    "reverse_word": _reverse, "count_letter": _count_letter, "word_length": _word_length,
    "first_letter": _first_letter, "sort_numbers": _sort_numbers, "uppercase": _uppercase,
    "lowercase": _lowercase, "max_words": _max_words, "min_words": _min_words, "starts_with": _starts_with,
    "ends_with": _ends_with, "include_word": _include_word, "exclude_word": _exclude_word,
    "no_commas": _no_commas, "bullet_count": _bullet_count, "repeat_word": _repeat_word, "quoted": _quoted,
    "json_keys": _json,
}


def make_instruction(world, rng: random.Random, checker: str | None = None) -> dict:
    """One instruction record body (no id/split): instruction, checker, args, response, bad_response."""
    checker = checker or rng.choice(list(GENERATORS))
    instruction, args, good, bad = GENERATORS[checker](rng, world)
    return {"instruction": instruction, "checker": checker, "args": args, "response": good, "bad_response": bad}


def build_instructions(world) -> Iterator[dict]:
    """Yield n_instructions distinct records, cycling through the checkers so each is well represented."""
    cfg = world.config
    rng, split_rng = sub_rng(world.seed, "instructions"), sub_rng(world.seed, "instructions-split")
    names = list(GENERATORS)
    seen: set[str] = set()
    n, attempts, target = 0, 0, cfg.count("n_instructions")
    while n < target and attempts < 20 * target:
        rec = make_instruction(world, rng, names[attempts % len(names)])
        attempts += 1
        if rec["instruction"] in seen:
            continue
        seen.add(rec["instruction"])
        yield {"id": f"instructions/{n}", "source": "world/instructions",
               "split": assign_split(split_rng, cfg.split_fractions), "kind": "instruction",
               "text": rec["instruction"] + "\n" + rec["response"], **rec}
        n += 1
