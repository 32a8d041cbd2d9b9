"""Chat/SFT conversations in `messages` format, and persona system prompts with styled answers.

Conversations are built from the other corpora, and each one keeps the split of what it is built
from (QA pairs keep the person's QA split, arithmetic and instruction records their own split,
city-based chats the city's split):
- `qa`: a knowledge question about a person, answered with a full sentence;
- `arithmetic`: a word problem answered with the step-by-step GSM8K solution;
- `instruction`: a verifiable instruction and a response that satisfies it (checker + args kept);
- `refusal` / `benign`: the fictional harmful requests refused, their look-alikes answered;
- `persona`: a persona system prompt (pirate, robot, butler, cheerful, bard) and an answer in that
  style; `detect_persona(text)` tells which style a reply is in, so persona control is testable;
- `multi_turn`: two or three questions about one person in one conversation.

Usage:
    from lmstack.world import World
    from lmstack.world.conversations import PERSONAS, apply_persona, detect_persona
    chats = World(seed=0, n_people=20).corpus("chat")
    chats[0]["messages"]          # [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]
    detect_persona(apply_persona("pirate", "The river is wide."))    # "pirate"
"""
from __future__ import annotations

from dataclasses import dataclass
import re
from typing import Callable, Iterator

from lmstack.world.arithmetic import build_arithmetic
from lmstack.world.config import sub_rng
from lmstack.world.entities import PERSON_ATTRIBUTES
from lmstack.world.instructions import build_instructions
from lmstack.world.preferences import benign_request, harmful_request
from lmstack.world.qa import TEMPLATE_SPLITS, answer_sentence, build_qa, make_question

DEFAULT_SYSTEM = "You are a helpful assistant."


def _pirate(text: str) -> str:
    swaps = {"you": "ye", "your": "yer", "my": "me", "is": "be", "the": "th'", "yes": "aye"}

    def swap(m: re.Match) -> str:
        word = swaps[m.group(1).lower()]
        return word.capitalize() if m.group(1)[0].isupper() else word  # keep sentence-initial capitals

    text = re.sub(r"\b(you|your|my|is|the|yes)\b", swap, text, flags=re.I)
    return f"Arr! {text} Yo-ho-ho!"


@dataclass(frozen=True)
class Persona:
    system: str
    """The system prompt that asks for this style."""
    style: Callable[[str], str]
    """Rewrites a plain answer in the persona's style (facts and numbers stay intact)."""
    marker: str
    """A regex every styled answer matches and plain answers do not."""


PERSONAS: dict[str, Persona] = {
    "pirate": Persona("You are a pirate. Answer every question the way a pirate would talk.", _pirate,
                      r"^Arr! .* Yo-ho-ho!$"),
    "robot": Persona("You are a robot. Reply in capital letters, like a machine.",
                     lambda t: f"BEEP. {t.upper()} END OF TRANSMISSION.", r"^BEEP\. .* END OF TRANSMISSION\.$"),
    "butler": Persona("You are a very formal butler. Answer with the utmost courtesy.",
                      lambda t: f"Certainly. {t} I remain at your service.",
                      r"^Certainly\. .* I remain at your service\.$"),
    "cheerful": Persona("You are a cheerful assistant who loves every question.",
                        lambda t: f"Great question! {t.rstrip('.')}! Have a wonderful day!",
                        r"^Great question! .*! Have a wonderful day!$"),
    "bard": Persona("You are a bard from olden times. Speak in an old-fashioned way.",
                    lambda t: f"Hark! {t} Thus sings the bard.", r"^Hark! .* Thus sings the bard\.$"),
}


def apply_persona(name: str, text: str) -> str:
    """`text` rewritten in persona `name`'s style."""
    return PERSONAS[name].style(text)


def detect_persona(text: str) -> str | None:
    """The persona whose style `text` is in, or None for a plain reply."""
    for name, p in PERSONAS.items():
        if re.match(p.marker, text.strip(), re.S):
            return name
    return None


def render(messages: list[dict]) -> str:
    """A plain transcript ("User: ...") used as the record's `text` (the tokenizer's chat template
    renders `messages` for training; this is for reading and n-gram decontamination)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _conv(rng, user: str, assistant: str, system: str | None = DEFAULT_SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system and rng.random() < 0.7 else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


CITY_QUESTIONS = (
    ("What is {c} known for?", "{c} is known for {famous_for}."),
    ("Which river flows through {c}?", "The {river} flows through {c}."),
    ("In which country is {c}?", "{c} is in {country}."),
    ("When was {c} founded?", "{c} was founded in {founded}."),
)


def build_chat(world) -> Iterator[dict]:
    """Yield every conversation (see the module docstring for the kinds and their splits)."""

    cfg = world.config
    rng = sub_rng(world.seed, "chat")
    n = 0

    def record(split, kind, messages, **meta):
        nonlocal n
        n += 1
        return {"id": f"chat/{n - 1}", "source": "world/chat", "split": split, "kind": kind,
                "messages": messages, "text": render(messages), **meta}

    for q in build_qa(world):
        person = world.person(q["person"])
        yield record(q["split"], "qa", _conv(rng, q["question"], answer_sentence(person, q["attribute"])),
                     person=q["person"], attribute=q["attribute"], answer=q["answer"])
    for p in build_arithmetic(world):
        yield record(p["split"], "arithmetic", _conv(rng, p["question"], p["solution"]),
                     answer=p["answer"], difficulty=p["difficulty"])
    for ins in build_instructions(world):
        yield record(ins["split"], "instruction", _conv(rng, ins["instruction"], ins["response"]),
                     checker=ins["checker"], args=ins["args"])
    for i in range(max(2, cfg.count("n_preferences") // 5)):
        city = rng.choice(world.cities)
        pair = harmful_request(city, rng) if i % 2 == 0 else benign_request(city, rng)
        kind = "refusal" if i % 2 == 0 else "benign"
        yield record(world.city_split(city), kind, _conv(rng, pair["prompt"], pair["chosen"]),
                     label=pair["label"], city=city.name)
    names = list(PERSONAS)
    for i in range(max(len(names), cfg.count("n_instructions") // 4)):
        city = rng.choice(world.cities)
        ask, say = rng.choice(CITY_QUESTIONS)
        slots = {"c": city.name, "famous_for": city.famous_for, "river": city.river, "country": city.country,
                 "founded": city.founded}
        persona = names[i % len(names)]
        messages = [{"role": "system", "content": PERSONAS[persona].system},
                    {"role": "user", "content": ask.format(**slots)},
                    {"role": "assistant", "content": apply_persona(persona, say.format(**slots))}]
        yield record(world.city_split(city), "persona", messages, persona=persona, city=city.name)
    for _ in range(max(1, cfg.count("n_instructions") // 4)):
        person = rng.choice(world.people)
        split = world.qa_split(person)
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}]
        for attribute in rng.sample(PERSON_ATTRIBUTES, rng.randint(2, 3)):
            q = make_question(person, attribute, rng.choice(TEMPLATE_SPLITS[split]))
            messages += [{"role": "user", "content": q["question"]},
                         {"role": "assistant", "content": answer_sentence(person, attribute)}]
        yield record(split, "multi_turn", messages, person=person.name)
