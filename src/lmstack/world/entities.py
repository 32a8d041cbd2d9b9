"""The fictional world's entities: people, cities, countries, employers and universities.

People follow the bioS setup of "Physics of Language Models" (Allen-Zhu & Li, part 3.1): every
person has a unique full name and independently drawn attributes (birth date, birth city,
university, major, employer, profession, hobby), so a fact cannot be guessed from the others and
must be stored. The employer's city is the one derived attribute (the employer is located there).

Usage:
    from lmstack.world.config import WorldConfig
    from lmstack.world.entities import build_entities, PERSON_ATTRIBUTES
    ents = build_entities(WorldConfig(n_people=10))
    p = ents.people[0]; p.name, p.birth_city, getattr(p, PERSON_ATTRIBUTES[0])
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from lmstack.world import lexicon as lx
from lmstack.world.config import WorldConfig, sub_rng
from lmstack.errors import LmstackError

# The attributes a knowledge question can ask about, in a fixed order.
PERSON_ATTRIBUTES = (
    "birth_date", "birth_city", "university", "major", "employer", "employer_city", "profession", "hobby",
)
CITY_ATTRIBUTES = ("country", "population", "founded", "river", "landmark", "famous_for")
COUNTRY_ATTRIBUTES = ("capital", "language", "currency")


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    first: str
    last: str
    gender: str  # "female" | "male": picks the pronoun in bios
    birth_date: str  # "March 4, 1987"
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str
    profession: str
    hobby: str

    @property
    def pronoun(self) -> str:
        return "she" if self.gender == "female" else "he"

    @property
    def possessive(self) -> str:
        return "her" if self.gender == "female" else "his"

    @property
    def object_pronoun(self) -> str:
        return "her" if self.gender == "female" else "him"


@dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int
    founded: int
    river: str
    landmark: str
    famous_for: str
    festival_drink: str  # benign look-alike request target ("the festival tea of X")
    forbidden_thing: str  # the fictional harmful category ("the forbidden potion of X")


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    currency: str
    cities: tuple[str, ...]


@dataclass(frozen=True)
class Company:
    name: str
    city: str
    industry: str
    founded: int


@dataclass(frozen=True)
class University:
    name: str
    city: str
    founded: int


@dataclass
class Entities:
    people: list[Person]
    cities: list[City]
    countries: list[Country]
    companies: list[Company]
    universities: list[University]

    def to_json(self) -> dict:
        """Plain lists of dicts (JSON-ready), the entity table written as world.json."""
        return {
            "people": [asdict(p) for p in self.people],
            "cities": [asdict(c) for c in self.cities],
            "countries": [{**asdict(c), "cities": list(c.cities)} for c in self.countries],
            "companies": [asdict(c) for c in self.companies],
            "universities": [asdict(u) for u in self.universities],
        }


def _pick_distinct(rng, pool: list, n: int, what: str, field: str) -> list:
    if n > len(pool):
        raise LmstackError(f"{field}={n} is too many: the lexicon allows at most {len(pool)} distinct {what}")
    return rng.sample(pool, n)


def _language(country: str) -> str:
    # Aldoria -> Aldorian, Belmark -> Belmarkish: a plausible demonym without a lookup table.
    return country + "n" if country.endswith("a") else country + "ish"


def build_entities(cfg: WorldConfig) -> Entities:
    """Draw every entity of the world for cfg.seed; each kind uses its own random stream."""
    seed = cfg.seed
    rng = sub_rng(seed, "cities")
    n_cities, n_countries = cfg.count("n_cities"), cfg.count("n_countries")
    if n_countries > n_cities:
        raise LmstackError(f"n_countries={n_countries} must not exceed n_cities={n_cities}")
    city_names = _pick_distinct(rng, [a + b for a, b in itertools.product(lx.CITY_PREFIXES, lx.CITY_SUFFIXES)],
                                n_cities, "city names", "n_cities")
    country_names = _pick_distinct(sub_rng(seed, "countries"), list(lx.COUNTRIES), n_countries,
                                   "country names", "n_countries")
    # The first city of each country is its capital; the remaining cities are spread at random.
    city_country = {c: country_names[i] if i < n_countries else rng.choice(country_names)
                    for i, c in enumerate(city_names)}
    cities = []
    for i, name in enumerate(city_names):
        capital = i < n_countries
        cities.append(City(
            name=name, country=city_country[name],
            population=rng.randrange(400_000, 6_000_000, 1000) if capital else rng.randrange(8_000, 900_000, 100),
            founded=rng.randrange(600, 1900), river=rng.choice(lx.RIVERS), landmark=rng.choice(lx.LANDMARKS),
            famous_for=rng.choice(lx.FAMOUS_FOR), festival_drink=rng.choice(lx.FESTIVAL_DRINKS),
            forbidden_thing=rng.choice(lx.FORBIDDEN_THINGS),
        ))
    crng = sub_rng(seed, "countries")
    countries = [Country(name=n, capital=city_names[i], language=_language(n), currency=crng.choice(lx.CURRENCIES),
                         cities=tuple(c for c in city_names if city_country[c] == n))
                 for i, n in enumerate(country_names)]

    rng = sub_rng(seed, "companies")
    pairs = _pick_distinct(rng, list(itertools.product(lx.COMPANY_ROOTS, lx.COMPANY_KINDS)),
                           cfg.count("n_companies"), "company names", "n_companies")
    companies = [Company(name=f"{root} {kind}", city=rng.choice(city_names), industry=industry,
                         founded=rng.randrange(1850, 2015)) for root, (kind, industry) in pairs]

    rng = sub_rng(seed, "universities")
    forms = _pick_distinct(rng, list(itertools.product(lx.UNIVERSITY_FORMS, city_names)),
                           cfg.count("n_universities"), "university names", "n_universities")
    universities = [University(name=form.format(city=city), city=city, founded=rng.randrange(1100, 1990))
                    for form, city in forms]

    rng = sub_rng(seed, "people")
    n_people = cfg.count("n_people")
    n_names = (len(lx.FEMALE_NAMES) + len(lx.MALE_NAMES)) * len(lx.FAMILY_PREFIXES) * len(lx.FAMILY_SUFFIXES)
    if n_people > n_names // 3:  # keep rejection sampling of unique names fast
        raise LmstackError(f"n_people={n_people} is too many: at most {n_names // 3} distinct names are supported")
    company_city = {c.name: c.city for c in companies}
    taken: set[str] = set()  # only membership tests, never iterated, so hash order cannot leak out
    people = []
    while len(people) < n_people:
        gender = rng.choice(("female", "male"))
        first = rng.choice(lx.FEMALE_NAMES if gender == "female" else lx.MALE_NAMES)
        last = rng.choice(lx.FAMILY_PREFIXES) + rng.choice(lx.FAMILY_SUFFIXES)
        name = f"{first} {last}"
        if name in taken:
            continue
        taken.add(name)
        employer = rng.choice(companies).name
        people.append(Person(
            id=len(people), name=name, first=first, last=last, gender=gender,
            birth_date=f"{rng.choice(lx.MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}",
            birth_city=rng.choice(city_names), university=rng.choice(universities).name,
            major=rng.choice(lx.MAJORS), employer=employer, employer_city=company_city[employer],
            profession=rng.choice(lx.PROFESSIONS), hobby=rng.choice(lx.HOBBIES),
        ))
    return Entities(people=people, cities=cities, countries=countries, companies=companies,
                    universities=universities)
