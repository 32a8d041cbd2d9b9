"""Long-context memory tasks: passkey, multi-hop over far-apart facts, and cross-conversation recall.

Each generator is deterministic from its rng and builds one record at a target length, measured by a
`count` function (text -> size: characters by default, or a tokenizer's token count). Every record has
one shape, so a benchmark scores all three the same way, by ranking `choices` by log-likelihood:

    context   the long part (a document, or earlier conversations joined by blank lines)
    prompt    the short tail that asks the question; the answer follows it after one space
    answer    the true answer; choices = the answer plus distractors from the same world, label = its index
    chance    1 / len(choices)
    evidence  the sentences of `context` that state what the answer needs (each appears in it verbatim)
    length    the target size; size = count(context + prompt)

Tasks:
- passkey: world/passkey.py's needle in world-sentence filler, at a random depth; 4 random distractor keys.
- multi_hop: "P works for Y." ... "Y is based in Z." stated far apart (one in the first third, the other
  in the last third, either order) inside world filler that never names P or Y; the question asks where P
  works, so both facts are needed. The pair (P, Y, Z) is drawn per document, so the answer must be read from
  the document, not recalled from weights; the distractors are other cities of the world.
- cross_conversation: conversation 1 states a session fact ("I am meeting P at <landmark> on <day>"),
  conversations 2..k-1 are world QA chats, conversation k asks for it; distractors are other landmarks.
  `conversations` holds the earlier ones one by one, for a memory that stores them call by call (kNN).

Usage:
    import random
    from lmstack.world import World
    from lmstack.world.long_memory import make_task_record
    world = World(seed=0, n_people=40)
    rec = make_task_record("multi_hop", random.Random(0), world, length=2000)
    scored = [rec["prompt"] + " " + c for c in rec["choices"]]     # rank by log p(choice | context + prompt)
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

from lmstack.errors import LmstackError
from lmstack.world.bios import article, describe_city, paraphrase_bio
from lmstack.world.conversations import render
from lmstack.world.passkey import QUESTION as PASSKEY_QUESTION
from lmstack.world.passkey import make_passkey_document

TASKS = ("passkey", "multi_hop", "cross_conversation")
Count = Callable[[str], int]

WORKS_FOR = ("{p} works for {y}.", "{p} is employed by {y}.", "{p} has a job at {y}.", "The employer of {p} is {y}.")
BASED_IN = ("{y} is based in {z}.", "The offices of {y} are in {z}.", "{y} has its headquarters in {z}.",
            "{y} is a company located in {z}.")
MULTI_HOP_PROMPT = "Question: In which city does {p} work? Answer: {p} works in"
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
QA_TURNS = (("Where was {n} born?", "{n} was born in {birth_city}."),
            ("Where did {n} study?", "{n} studied at {university}."),
            ("What does {n} do for a living?", "{n} works as {a_profession}."),
            ("What is {n}'s hobby?", "{n} enjoys {hobby}."))


def _sentences(rng: random.Random, world, banned: tuple[str, ...]) -> Iterator[str]:
    """An endless stream of world sentences (bios and city descriptions) naming none of `banned`."""
    while True:
        text = paraphrase_bio(rng.choice(world.people), rng, world) if rng.random() < 0.7 else \
            describe_city(rng.choice(world.cities), rng)
        for s in text.split(". "):
            s = s.strip()
            if s and not any(b in s for b in banned):
                yield s if s.endswith((".", "!", "?")) else s + "."


def _fill(stream: Iterator[str], budget: int, count: Count) -> list[str]:
    """Sentences from `stream` until their size (each counted with its joining space) reaches `budget`."""
    out: list[str] = []
    size = 0
    while size < budget:
        s = next(stream)
        out.append(s)
        size += count(" " + s)
    return out


def _distractors(rng: random.Random, pool: list[str], answer: str, n: int) -> list[str]:
    others = sorted({x for x in pool if x != answer})
    if len(others) < n:
        raise LmstackError(f"the world has only {len(others)} alternatives to {answer!r}; need {n} distractors")
    return rng.sample(others, n)


def _record(task: str, rng: random.Random, context: str, prompt: str, answer: str, distractors: list[str],
            evidence: list[str], length: int, count: Count, **extra) -> dict:
    choices = [answer] + distractors
    rng.shuffle(choices)
    return {"task": task, "context": context, "prompt": prompt, "answer": answer, "choices": choices,
            "label": choices.index(answer), "chance": 1 / len(choices), "evidence": evidence, "length": length,
            "size": count(context + prompt), **extra}


def passkey_record(rng: random.Random, world, length: int, count: Count = len, n_choices: int = 5,
                   filler: str = "world") -> dict:
    """A passkey document of about `length` (by count) with the needle at a random depth; filler 'world'
    (world sentences, full of distractor numbers) or 'repeat' (the classic repeated lines)."""
    prompt = f" {PASSKEY_QUESTION} The pass key is"
    budget = length - count(prompt)
    chars = budget  # calibrate characters per counted unit: the needle document is built in characters
    for _ in range(4):
        doc = make_passkey_document(random.Random(rng.random()), max(chars, 80), "chars", rng.random(), filler,
                                    world)
        size = count(doc["text"])
        if abs(size - budget) <= max(2, budget // 50):
            break
        chars = max(80, int(chars * budget / max(size, 1)))
    key = doc["answer"]
    keys = {key}
    while len(keys) < n_choices:
        keys.add(str(rng.randint(10000, 99999)))
    return _record("passkey", rng, doc["text"], prompt, key, sorted(keys - {key}), [doc["needle"]], length, count,
                   depth=doc["depth"])


def multi_hop_record(rng: random.Random, world, length: int, count: Count = len, n_choices: int = 4) -> dict:
    """Two facts far apart, "P works for Y." and "Y is based in Z.", in world filler; asks where P works."""
    person = rng.choice(world.people).name
    company = rng.choice(world.companies).name
    city = rng.choice(world.cities).name
    fact_a = rng.choice(WORKS_FOR).format(p=person, y=company)
    fact_b = rng.choice(BASED_IN).format(y=company, z=city)
    prompt = " " + MULTI_HOP_PROMPT.format(p=person)
    budget = length - count(prompt) - count(" " + fact_a) - count(" " + fact_b)
    if budget < 2:
        raise LmstackError(f"length={length} is too short for a multi-hop document (the facts and question "
                           f"alone take {length - budget})")
    # the filler never names P or Y, so the two facts are the only route from P to Z
    filler = _fill(_sentences(rng, world, (person, company)), budget, count)
    first, second = (fact_a, fact_b) if rng.random() < 0.5 else (fact_b, fact_a)
    n = len(filler)
    i = int(n * rng.uniform(0.0, 0.33))
    j = int(n * rng.uniform(0.67, 1.0))
    parts = filler[:i] + [first] + filler[i:j] + [second] + filler[j:]
    distractors = _distractors(rng, [c.name for c in world.cities], city, n_choices - 1)
    return _record("multi_hop", rng, " ".join(parts), prompt, city, distractors, [fact_a, fact_b], length, count,
                   person=person, company=company, gap=j - i + 1)


def _qa_chat(rng: random.Random, world) -> str:
    person = rng.choice(world.people)
    user, assistant = rng.choice(QA_TURNS)
    values = {"n": person.name, "a_profession": article(person.profession),
              **{a: world.fact(person, a) for a in ("birth_city", "university", "hobby")}}
    return render([{"role": "user", "content": user.format(**values)},
                   {"role": "assistant", "content": assistant.format(**values)}])


def cross_conversation_record(rng: random.Random, world, length: int, count: Count = len,
                              n_choices: int = 4) -> dict:
    """Conversation 1 states where the user meets someone, QA chats follow, the last one asks where."""
    friend = rng.choice(world.people).name
    city = rng.choice(world.cities)
    place, day = city.landmark, rng.choice(DAYS)
    said = f"I am meeting {friend} at {place} on {day}."
    first = render([{"role": "user", "content": f"{said} Please remember that."},
                    {"role": "assistant", "content": f"Noted. You are meeting {friend} on {day}."}])
    prompt = f"\n\nUser: Where am I meeting {friend}?\nAssistant: You are meeting {friend} at"
    conversations = [first]
    size = count(first) + count(prompt)
    while size < length:
        chat = _qa_chat(rng, world)
        if friend in chat:
            continue  # keep the friend's name to the two conversations that need it
        conversations.append(chat)
        size += count("\n\n" + chat)
    if len(conversations) > 2 and size - length > count("\n\n" + conversations[-1]) / 2:
        conversations.pop()  # closer to the target without the last one
    distractors = _distractors(rng, [c.landmark for c in world.cities], place, n_choices - 1)
    return _record("cross_conversation", rng, "\n\n".join(conversations), prompt, place, distractors, [said], length,
                   count, conversations=conversations, day=day)


BUILDERS = {"passkey": passkey_record, "multi_hop": multi_hop_record, "cross_conversation": cross_conversation_record}


def make_task_record(task: str, rng: random.Random, world, length: int, count: Count = len, **kwargs) -> dict:
    """One record of `task` (one of TASKS) at about `length` units of `count`."""
    if task not in BUILDERS:
        raise LmstackError(f"unknown long-memory task {task!r}; choose one of {', '.join(TASKS)}")
    if length < 1:
        raise LmstackError(f"length must be >= 1, got {length}")
    return BUILDERS[task](rng, world, length, count, **kwargs)


def task_records(task: str, world, length: int, n: int, seed: int = 0, count: Count = len, **kwargs) -> list[dict]:
    """n records of `task` at `length`, the same for the same (task, length, n, seed); kwargs go to the
    task's builder (e.g. filler='repeat' for passkey)."""
    rng = random.Random(f"long-memory/{task}/{length}/{seed}")
    return [make_task_record(task, rng, world, length, count, **kwargs) for _ in range(n)]
