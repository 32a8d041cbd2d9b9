"""Biographies (bioS style) and city/country descriptions, written from many paraphrase templates.

A bio states every attribute of a person once. Each attribute has six or more sentence templates,
some templates state two attributes at once, the sentence order is shuffled half of the time and
later sentences use a pronoun or the full name. So two bios of one person rarely share a sentence
(this is the bioS "multi + permute" augmentation that lets a model *extract* facts instead of
memorising one string). `paraphrase_bio` is the world's template-paraphrase augmentation (I.9).

Usage:
    import random
    from lmstack.world import World
    from lmstack.world.bios import paraphrase_bio, describe_city
    world = World(seed=0, n_people=5)
    print(paraphrase_bio(world.people[0], random.Random(1), world))
    print(describe_city(world.cities[0], random.Random(1)))
"""
from __future__ import annotations

import random

from lmstack.world.entities import PERSON_ATTRIBUTES, City, Country, Person

# attribute(s) -> sentence templates. Slots: {S} subject at sentence start (full name or "She"),
# {s} subject mid-sentence, {SP} possessive at start ("Ada Ashford's" / "Her"), {poss} her/his,
# {a_profession} profession with its article, {alum} alumna/alumnus, {country} of the birth city,
# {industry} of the employer, plus every attribute by name.
BIO_TEMPLATES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("birth_date",): (
        "{S} was born on {birth_date}.",
        "{S} came into this world on {birth_date}.",
        "{SP} life began on {birth_date}.",
        "{S} entered the world on {birth_date}.",
        "{SP} date of birth is {birth_date}.",
        "{S} was born on {birth_date}, a day {poss} family still celebrates.",
        "The records show that {s} was born on {birth_date}.",
    ),
    ("birth_city",): (
        "{S} was born in {birth_city}.",
        "{S} spent {poss} early years in {birth_city}.",
        "{S} hails from {birth_city}.",
        "{SP} birthplace is {birth_city}.",
        "{S} grew up in {birth_city}, a city in {country}.",
        "{S} first saw the light of day in {birth_city}.",
        "{S} is a native of {birth_city}.",
    ),
    ("university",): (
        "{S} studied at {university}.",
        "{S} graduated from {university}.",
        "{S} received {poss} education at {university}.",
        "{S} attended {university}.",
        "{S} completed {poss} degree at {university}.",
        "{S} is an {alum} of {university}.",
    ),
    ("major",): (
        "{S} majored in {major}.",
        "{S} focused on {major} during {poss} studies.",
        "{SP} field of study was {major}.",
        "{S} earned a degree in {major}.",
        "{S} specialized in {major} at university.",
        "{S} devoted {poss} student years to {major}.",
    ),
    ("university", "major"): (
        "{S} studied {major} at {university}.",
        "{S} earned a degree in {major} from {university}.",
        "At {university}, {s} majored in {major}.",
    ),
    ("employer",): (
        "{S} works for {employer}.",
        "{S} is employed by {employer}.",
        "{S} has a job at {employer}.",
        "{SP} employer is {employer}.",
        "{S} earns a living at {employer}.",
        "{S} joined {employer} after graduating.",
    ),
    ("employer_city",): (
        "{S} works in {employer_city}.",
        "{SP} workplace is located in {employer_city}.",
        "{S} commutes to {employer_city} for work.",
        "{S} is based in {employer_city} for {poss} job.",
        "{SP} office is in {employer_city}.",
        "Every working day {s} heads to {employer_city}.",
    ),
    ("employer", "employer_city"): (
        "{S} works for {employer} in {employer_city}.",
        "{S} is employed by {employer}, a {industry} company based in {employer_city}.",
        "{S} has a job at {employer}, whose offices are in {employer_city}.",
    ),
    ("profession",): (
        "{S} is {a_profession}.",
        "{S} works as {a_profession}.",
        "By profession, {s} is {a_profession}.",
        "{S} makes a living as {a_profession}.",
        "{S} has built a career as {a_profession}.",
        "{SP} job title is {profession}.",
    ),
    ("hobby",): (
        "In {poss} free time, {s} enjoys {hobby}.",
        "{S} is passionate about {hobby}.",
        "{SP} favourite pastime is {hobby}.",
        "{S} likes {hobby} more than anything else.",
        "{S} has a lifelong love of {hobby}.",
        "When not working, {s} turns to {hobby}.",
    ),
}
# Fact-free sentences mixed in now and then, so bios are not only a list of facts.
BIO_EXTRAS = (
    "Friends describe {o} as {trait}.",
    "{S} is known for {poss} {quality}.",
    "{S} keeps a small notebook of ideas.",
    "{S} writes letters to old friends every winter.",
)
TRAITS = ("kind", "patient", "funny", "thoughtful", "generous", "curious", "calm", "hard-working")
QUALITIES = ("sense of humour", "patience", "curiosity", "careful work", "warm smile", "love of good food")

CITY_TEMPLATES = (
    "{city} is a city in {country} with a population of {population}.",
    "About {population} people live in {city}, which lies in {country}.",
    "{city} was founded in the year {founded}.",
    "Founded in {founded}, {city} grew up along the banks of the {river}.",
    "The {river} river flows through {city}.",
    "{city} is known for {famous_for}.",
    "Travellers come to {city} for {famous_for}.",
    "Visitors to {city} rarely miss {landmark}.",
    "The pride of {city} is {landmark}.",
    "Every summer {city} holds a fair where people drink the {festival_drink} of {city}.",
    "The {forbidden_thing} of {city} is banned by an old law, and nobody may brew it.",
)
COUNTRY_TEMPLATES = (
    "{country} is a country whose capital is {capital}.",
    "The capital of {country} is {capital}.",
    "People in {country} speak {language}.",
    "The official language of {country} is {language}.",
    "In {country} people pay with the {currency}.",
    "The currency of {country} is the {currency}.",
    "{country} is home to the cities of {cities}.",
)


def article(noun: str) -> str:
    """'an engineer', 'a baker'."""
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _slots(person: Person, world=None) -> dict[str, str]:
    slots = {a: getattr(person, a) for a in PERSON_ATTRIBUTES}
    slots["a_profession"] = article(person.profession)
    slots["alum"] = "alumna" if person.gender == "female" else "alumnus"
    slots["poss"] = person.possessive
    slots["country"] = world.fact(person.birth_city, "country") if world is not None else ""
    slots["industry"] = world.fact(person.employer, "industry") if world is not None else ""
    return slots


def _usable(template: str, world) -> bool:
    # Without a world we do not know the birth city's country or the employer's industry.
    return world is not None or ("{country}" not in template and "{industry}" not in template)


def paraphrase_bio(person: Person, rng: random.Random, world=None, extras: float = 0.3) -> str:
    """One biography of `person` that states every attribute exactly once, drawn with `rng`.

    Different rng states give different paraphrases of the same facts. `world` (optional) enables
    templates that also mention the birth city's country or the employer's industry. `extras` is
    the chance of one fact-free sentence.
    """
    slots = _slots(person, world)
    # Cover the attributes with single or paired templates: each pair is used a third of the time.
    groups: list[tuple[str, ...]] = []
    remaining = list(PERSON_ATTRIBUTES)
    for pair in (("university", "major"), ("employer", "employer_city")):
        if rng.random() < 1 / 3:
            groups.append(pair)
            remaining = [a for a in remaining if a not in pair]
    groups.extend((a,) for a in remaining)
    groups.sort(key=lambda g: PERSON_ATTRIBUTES.index(g[0]))
    if rng.random() < 0.5:
        rng.shuffle(groups)
    use_pronoun = rng.random() < 0.8  # else repeat the full name in every sentence (bioS "fullname")
    sentences = []
    for i, group in enumerate(groups):
        template = rng.choice([t for t in BIO_TEMPLATES[group] if _usable(t, world)])
        sentences.append(_render(template, person, slots, named=(i == 0 or not use_pronoun)))
    if rng.random() < extras:
        extra = rng.choice(BIO_EXTRAS)
        extra = extra.replace("{trait}", rng.choice(TRAITS)).replace("{quality}", rng.choice(QUALITIES))
        sentences.insert(rng.randint(1, len(sentences)), _render(extra, person, slots, named=False))
    return " ".join(sentences)


def _render(template: str, person: Person, slots: dict[str, str], named: bool) -> str:
    if named:
        subj = {"S": person.name, "s": person.name, "SP": person.name + "'s", "o": person.name}
    else:
        subj = {"S": person.pronoun.capitalize(), "s": person.pronoun, "SP": person.possessive.capitalize(),
                "o": person.object_pronoun}
    return template.format(**slots, **subj)


def describe_city(city: City, rng: random.Random, n_sentences: int = 5) -> str:
    """A short paragraph about `city`: a random subset of the city templates, in random order."""
    values = {"city": city.name, "country": city.country, "population": f"{city.population:,}",
              "founded": city.founded, "river": city.river, "landmark": city.landmark,
              "famous_for": city.famous_for, "festival_drink": city.festival_drink,
              "forbidden_thing": city.forbidden_thing}
    chosen = rng.sample(CITY_TEMPLATES, min(n_sentences, len(CITY_TEMPLATES)))
    return " ".join(t.format(**values) for t in chosen)


def describe_country(country: Country, rng: random.Random, n_sentences: int = 4) -> str:
    """A short paragraph about `country`."""
    cities = list(country.cities)
    listed = cities[0] if len(cities) == 1 else ", ".join(cities[:-1]) + " and " + cities[-1]
    values = {"country": country.name, "capital": country.capital, "language": country.language,
              "currency": country.currency, "cities": listed}
    chosen = rng.sample(COUNTRY_TEMPLATES, min(n_sentences, len(COUNTRY_TEMPLATES)))
    return " ".join(t.format(**values) for t in chosen)
