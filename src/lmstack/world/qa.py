"""Knowledge QA pairs about people, with a split that measures extraction rather than memorisation.

The split rule (tested in tests/world/test_world_splits.py):

1. **People are split**, not questions. `World.qa_split(person)` puts a fixed fraction of people
   (qa_test_fraction, default 0.3) in *test* and qa_val_fraction in *val*; the rest are *train*.
   The bios of *every* person are in the pretraining corpus, but QA pairs of val/test people appear
   in no training file (not in qa/train, chat/train, preferences/train, nor the mixed QA of
   pretrain/train). So test asks for (person, attribute) facts the model only ever read in bios.
2. **Phrasings are split.** Each attribute has six question templates: four for train, one for
   val and one for test. Val/test questions only use their own template, and no train file
   contains the fixed text of a val/test template.

So test accuracy measures knowledge *extracted* from bios and *transferred* to a new phrasing;
train accuracy measures memorised QA. Answers are the exact fact strings (`world.fact`).

Usage:
    from lmstack.world import World
    from lmstack.world.qa import templates_for, answer_sentence
    world = World(seed=0, n_people=30)
    recs = world.corpus("qa", split="test")     # question/answer/person/attribute/template
    templates_for("birth_city", "test")         # the held-out phrasing(s)
"""
from __future__ import annotations

from typing import Iterator

from lmstack.errors import LmstackError
from lmstack.world.bios import article
from lmstack.world.config import sub_rng
from lmstack.world.entities import PERSON_ATTRIBUTES, Person

# attribute -> six templates: indices 0-3 train, 4 val, 5 test.
QA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "What is the birth date of {name}?", "When was {name} born?", "On which date was {name} born?",
        "What is {name}'s date of birth?",
        "Tell me the day {name} was born.",
        "{name} came into the world on what date?",
    ),
    "birth_city": (
        "Where was {name} born?", "What is the birth city of {name}?", "In which city was {name} born?",
        "Which city is {name}'s birthplace?",
        "Name the city where {name} was born.",
        "{name} was born in which city?",
    ),
    "university": (
        "Which university did {name} attend?", "Where did {name} study?",
        "What university did {name} graduate from?", "At which university was {name} educated?",
        "Name the university {name} went to.",
        "{name} is a graduate of which university?",
    ),
    "major": (
        "What did {name} major in?", "What was {name}'s field of study?", "Which subject did {name} study?",
        "What is {name}'s major?",
        "Name the subject {name} specialized in.",
        "{name} earned a degree in what field?",
    ),
    "employer": (
        "Who employs {name}?", "Which company does {name} work for?", "What is the name of {name}'s employer?",
        "At which company is {name} employed?",
        "Name the company {name} works for.",
        "{name} is on the payroll of which company?",
    ),
    "employer_city": (
        "In which city does {name} work?", "Where is {name}'s workplace located?",
        "Which city does {name} commute to for work?", "What city is {name}'s office in?",
        "Name the city where {name} works.",
        "{name} goes to work in which city?",
    ),
    "profession": (
        "What is {name}'s profession?", "What does {name} do for a living?", "What is {name}'s job?",
        "Which occupation does {name} have?",
        "Name the profession of {name}.",
        "{name} works in what occupation?",
    ),
    "hobby": (
        "What is {name}'s hobby?", "What does {name} enjoy in free time?",
        "How does {name} like to spend free time?", "What pastime does {name} love?",
        "Name the favourite pastime of {name}.",
        "{name}'s spare time goes to which activity?",
    ),
}
TEMPLATE_SPLITS = {"train": (0, 1, 2, 3), "val": (4,), "test": (5,)}

# Full-sentence answers (for chat and preference data); the short answer is the fact itself.
ANSWER_SENTENCES = {
    "birth_date": "{name} was born on {value}.",
    "birth_city": "{name} was born in {value}.",
    "university": "{name} studied at {value}.",
    "major": "{name} majored in {value}.",
    "employer": "{name} works for {value}.",
    "employer_city": "{name} works in {value}.",
    "profession": "{name} works as {a_value}.",
    "hobby": "{name} enjoys {value}.",
}


def templates_for(attribute: str, split: str) -> list[str]:
    """The question templates of `attribute` reserved for `split` (train, val or test)."""
    if attribute not in QA_TEMPLATES:
        raise LmstackError(f"no QA templates for attribute {attribute!r}; choose one of {', '.join(QA_TEMPLATES)}")
    if split not in TEMPLATE_SPLITS:
        raise LmstackError(f"split={split!r} is not allowed; choose train, val or test")
    return [QA_TEMPLATES[attribute][i] for i in TEMPLATE_SPLITS[split]]


def template_fragments(template: str) -> list[str]:
    """The distinctive fixed pieces of a template (3+ words around the {name} slot), used by the
    hygiene test to show a held-out phrasing appears in no training text."""
    return [piece.strip() for piece in template.split("{name}") if len(piece.split()) >= 3]


def qa_text(question: str, answer: str) -> str:
    """The plain-text form of a QA pair used in the pretraining mix and for LM scoring."""
    return f"Question: {question}\nAnswer: {answer}"


def answer_sentence(person: Person, attribute: str, value: str | None = None) -> str:
    """'Ada Ashford was born in Amberhaven.' (value defaults to the true fact)."""

    value = getattr(person, attribute) if value is None else value
    return ANSWER_SENTENCES[attribute].format(name=person.name, value=value, a_value=article(value))


def make_question(person: Person, attribute: str, template_index: int) -> dict:
    """One QA record body (no id/split yet) for `person` and `attribute` with template number i."""
    template = QA_TEMPLATES[attribute][template_index]
    question = template.format(name=person.name)
    answer = getattr(person, attribute)
    return {"question": question, "answer": answer, "person": person.name, "attribute": attribute,
            "template": f"{attribute}/{template_index}", "text": qa_text(question, answer)}


def build_qa(world) -> Iterator[dict]:
    """Yield every QA record of the world: train people in 1..4 train phrasings, val/test people in
    their held-out phrasing. Fields: question, answer, person, attribute, template, held_out."""
    rng = sub_rng(world.seed, "qa")
    per_fact = min(world.config.count("qa_per_fact"), len(TEMPLATE_SPLITS["train"]))
    n = 0
    for person in world.people:
        split = world.qa_split(person)
        for attribute in PERSON_ATTRIBUTES:
            indices = TEMPLATE_SPLITS[split]
            if split == "train":
                indices = sorted(rng.sample(indices, per_fact))
            for i in indices:
                rec = make_question(person, attribute, i)
                held = "none" if split == "train" else "person+phrasing"
                yield {"id": f"qa/{n}", "source": "world/qa", "split": split, "kind": "qa",
                       "held_out": held, **rec}
                n += 1
