"""Short stories and dialogues set in the world, so a tiny LM also learns varied everyday English.

Stories follow a small grammar: opening, setup, trouble, one or two attempts, resolution, ending
and sometimes a moral; each part has several phrasings and its own slots (people, cities,
objects, animals, weather, feelings). Dialogues are two people talking about their day, work,
hobbies and travel. Dialogue speakers are only people whose QA pairs are in the *train* split, so
first-person statements of facts ("I work for Quill Foods") never involve held-out people.

Usage:
    import random
    from lmstack.world import World
    from lmstack.world.stories import make_story, make_dialogue
    world = World(seed=0, n_people=20)
    print(make_story(world, random.Random(0)))
    print(make_dialogue(world, random.Random(0)))
"""
from __future__ import annotations

import random

from lmstack.world import lexicon as lx
from lmstack.world.bios import article
from lmstack.errors import LmstackError

STORY_PARTS = {
    "opening": (
        "{time}, {A} walked to {place} in {city}.",
        "{weather} in {city} when {A} set out for {place}.",
        "{A} lived in a small house in {city} with an old {animal}.",
        "Everyone in {city} knew {A}, who worked as {a_job}.",
        "{time}, {A} woke up early and looked out of the window.",
    ),
    "setup": (
        "{P} was carrying {object} and felt {feeling}.",
        "{P} had promised to bring {object} to a friend.",
        "In {poss} bag there was {object}, wrapped in paper.",
        "{P} hummed a song and thought about {food} for lunch.",
    ),
    "trouble": (
        "On the way, {p} realised that {object} was gone.",
        "Suddenly a {animal} ran past and snatched {object}.",
        "At {place}, {p} met {B}, who looked {feeling2}.",
        "Then the wind picked up, and {object} flew out of {poss} hands.",
        "But the bridge over the {river} was closed, and {p} could not cross.",
    ),
    "attempt": (
        "{P} searched under the benches and behind the stalls.",
        "{B} offered to help, and together they looked around {place2}.",
        "{P} asked a shopkeeper, who pointed towards {place2}.",
        "{P} sat down for a moment to think about what to do.",
        "They followed the path along the {river} for a long time.",
        "{P} counted to ten, took a deep breath and tried again.",
    ),
    "resolution": (
        "At last, {p} found {object} near {landmark}.",
        "In the end, the {animal} came back and dropped {object} at {poss} feet.",
        "After a while, a kind stranger returned {object}.",
        "Finally the sun came out and everything seemed easier.",
        "{B} laughed, and soon {A} was laughing too.",
    ),
    "ending": (
        "{A} went home {feeling} and ate {food} for dinner.",
        "That night, {p} wrote about the day in a notebook.",
        "From then on, {A} and {B} were good friends.",
        "{A} smiled, because the day had turned out well after all.",
        "The next morning, {p} told the whole story to {poss} neighbours.",
    ),
}
MORALS = ("a little patience goes a long way", "friends make every problem smaller",
          "it pays to ask for help", "careful hands keep what they carry", "kindness is always returned")
TITLES = ("The Lost {Obj}", "A Day in {city}", "{A} and the {Animal}", "The Windy Afternoon", "A Walk by the {river}")


def _first(person) -> str:
    return person.name.split(" ")[0]


def make_story(world, rng: random.Random) -> str:
    """A short story of 6-9 sentences, sometimes with a title and a moral."""
    if len(world.people) < 2:
        raise LmstackError("stories need at least 2 people in the world (n_people >= 2)")
    a, b = rng.sample(world.people, 2)
    city = rng.choice(world.cities)
    obj = rng.choice(lx.OBJECTS)
    animal = rng.choice(lx.ANIMALS)
    place, place2 = rng.sample(lx.PLACES, 2)
    slots = {"A": _first(a), "B": b.name, "P": a.pronoun.capitalize(), "p": a.pronoun, "poss": a.possessive,
             "city": city.name, "river": city.river, "landmark": city.landmark, "object": obj, "animal": animal,
             "place": place, "place2": place2, "time": rng.choice(lx.TIMES), "weather": rng.choice(lx.WEATHER),
             "feeling": rng.choice(lx.FEELINGS), "feeling2": rng.choice(lx.FEELINGS), "food": rng.choice(lx.FOODS),
             "a_job": article(a.profession)}
    parts = ["opening", "setup", "trouble", "attempt"]
    if rng.random() < 0.5:
        parts.append("attempt")
    parts += ["resolution", "ending"]
    used: list[str] = []
    for part in parts:
        options = [t for t in STORY_PARTS[part] if t not in used]  # two attempts never repeat
        used.append(rng.choice(options))
    text = " ".join(t.format(**slots) for t in used)
    if rng.random() < 0.3:
        text += f" The lesson was simple: {rng.choice(MORALS)}."
    if rng.random() < 0.4:
        title = rng.choice(TITLES).format(Obj=obj.split(" ", 1)[1].title(), Animal=animal.title(), **slots)
        text = f"{title}\n\n{text}"
    return text


DIALOGUE_TURNS = {
    "greeting": (("Good morning, {b}! How are you?", "I'm {feeling}, thanks. And you?"),
                 ("Hello {b}, it's been a while!", "It has! I'm glad to see you."),
                 ("Hi {b}. Do you have a minute?", "Of course. What's up?")),
    "work": (("Where are you working these days?", "I work for {b_employer} in {b_employer_city}."),
             ("Do you still enjoy your job?", "Yes, I like being {b_a_job}, most days at least."),
             ("How is work going?", "Busy. {b_employer} keeps me on my toes.")),
    "hobby": (("What do you do to relax?", "Mostly {b_hobby}. It clears my head."),
              ("Any plans for the weekend?", "I'll spend it on {b_hobby}, I think.")),
    "travel": (("I'm going to {city} next week.", "Lovely! Don't miss {landmark}."),
               ("Have you ever been to {city}?", "Once. It's known for {famous_for}."),
               ("Is it far to {city}?", "Not really, the train follows the {river} most of the way.")),
    "weather": (("What a day, isn't it?", "{weather}, so I brought a coat."),
                ("Do you think it will rain?", "Maybe later. The clouds look heavy.")),
    "goodbye": (("I should go. See you soon!", "Take care, {a}!"),
                ("Thanks for the chat.", "Any time. Say hello to everyone for me.")),
}


def make_dialogue(world, rng: random.Random) -> str:
    """A conversation of 4-6 exchanges between two people whose QA pairs are in the train split."""
    speakers = world.people_in("train")
    if len(speakers) < 2:
        raise LmstackError("dialogues need at least 2 train-split people; raise n_people")
    a, b = rng.sample(speakers, 2)
    city = rng.choice(world.cities)
    slots = {"a": _first(a), "b": _first(b), "b_employer": b.employer, "b_employer_city": b.employer_city,
             "b_a_job": article(b.profession), "b_hobby": b.hobby, "city": city.name, "landmark": city.landmark,
             "famous_for": city.famous_for, "river": city.river, "feeling": rng.choice(lx.FEELINGS),
             "weather": rng.choice(lx.WEATHER)}
    topics = rng.sample(["work", "hobby", "travel", "weather"], rng.randint(2, 4))
    lines = []
    for topic in ["greeting", *topics, "goodbye"]:
        ask, reply = rng.choice(DIALOGUE_TURNS[topic])
        lines.append(f"{a.name}: {ask.format(**slots)}")
        lines.append(f"{b.name}: {reply.format(**slots)}")
    return "\n".join(lines)
