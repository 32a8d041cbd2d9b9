"""Expansion batches: new documents to append to an existing corpus, with planted cases (issue 4, 1b).

Online dataset expansion (`lmstack data add`) must dedup new documents against what is already
stored and decontaminate them before writing new shards. A batch from this module is the world's
test input for that: every record says what it is in `planted`:
- `new` (70%): fresh stories, dialogues and arithmetic problems not in the world's corpora;
- `exact_dup` (10%): a verbatim copy of a pretraining train document (`of` = its id);
- `near_dup` (10%): a copy with one or two small edits (a word swapped, a sentence dropped or added);
- `contaminated` (10%): a document that quotes a held-out eval item, a test arithmetic problem with
  its solution or a test QA pair (`of` = the item's id).
Batches are deterministic per (world seed, batch number) and differ between batch numbers.

Usage:
    from lmstack.world import World
    from lmstack.world.expansion import expansion_batch, write_expansion_batch
    world = World(seed=0, n_people=40)
    recs = expansion_batch(world, batch=1, n=100)
    write_expansion_batch(world, "data/new/batch_001.jsonl", batch=1)
"""
from __future__ import annotations

import json
import os
import random

from lmstack.config import atomic_write_text
from lmstack.world import lexicon as lx
from lmstack.world.arithmetic import make_problem
from lmstack.world.config import sub_rng
from lmstack.world.stories import make_dialogue, make_story
from lmstack.errors import LmstackError

PLANTED_SHARES = (("new", 0.7), ("exact_dup", 0.1), ("near_dup", 0.1), ("contaminated", 0.1))


def _near_dup(text: str, rng: random.Random) -> str:
    """One or two small edits that keep most of the document's n-grams."""
    for _ in range(rng.randint(1, 2)):
        sentences = text.split(". ")
        edit = rng.choice(("swap_word", "drop_sentence", "add_sentence"))
        if edit == "drop_sentence" and len(sentences) >= 5:
            del sentences[rng.randrange(1, len(sentences) - 1)]
            text = ". ".join(sentences)
        elif edit == "add_sentence":
            text = text + f" It was a {rng.choice(lx.FEELINGS)} time for everyone."
        else:
            words = text.split(" ")
            i = rng.randrange(len(words))
            words[i] = rng.choice(lx.PLAIN_WORDS)
            text = " ".join(words)
    return text


def expansion_batch(world, batch: int = 1, n: int | None = None) -> list[dict]:
    """`n` documents (default: half of n_stories, at least 50) for expansion batch number `batch`."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise LmstackError(f"batch must be a positive integer, got {batch!r}")
    cfg = world.config
    n = max(50, cfg.count("n_stories") // 2) if n is None else n
    if n < 1:
        raise LmstackError(f"n must be a positive number of documents, got {n!r}")
    rng = sub_rng(world.seed, "expansion", batch)
    existing = [d for d in world.iter_corpus("pretrain") if d["split"] == "train" and d["kind"] != "qa"]
    known_text = {d["text"] for d in existing}  # membership only
    known_questions = {p["question"] for p in world.iter_corpus("arithmetic")}
    held_out = world.corpus("arithmetic", split="test") + world.corpus("qa", split="test")
    if not existing or not held_out:
        raise LmstackError("the world is too small for an expansion batch (no train documents or no test items)")
    counts = [round(n * share) for _, share in PLANTED_SHARES]
    counts[0] = n - sum(counts[1:])
    plan = [name for (name, _), c in zip(PLANTED_SHARES, counts) for _ in range(c)]
    rng.shuffle(plan)
    out = []
    for i, planted in enumerate(plan):
        rec = {"id": f"expansion/{batch}/{i}", "source": f"world/expansion/{batch}", "split": "train",
               "planted": planted}
        if planted == "new":
            kind, text = _new_document(world, rng, known_text, known_questions)
            rec.update(kind=kind, text=text)
        elif planted in ("exact_dup", "near_dup"):
            doc = rng.choice(existing)
            text = doc["text"] if planted == "exact_dup" else _near_dup(doc["text"], rng)
            rec.update(kind=doc["kind"], text=text, of=doc["id"])
        else:
            item = rng.choice(held_out)
            if item["kind"] == "arithmetic":
                text = f"Homework help, problem of the week. {item['question']}\n{item['solution']}"
            else:
                text = f"Notes from the trivia night.\n{item['text']}\nEveryone got that one right."
            rec.update(kind="contaminated", text=text, of=item["id"])
        out.append(rec)
    return out


def _new_document(world, rng, known_text, known_questions) -> tuple[str, str]:
    for _ in range(100):
        kind = rng.choice(("story", "dialogue", "arithmetic"))
        if kind == "story":
            text = make_story(world, rng)
        elif kind == "dialogue":
            text = make_dialogue(world, rng)
        else:
            prob = make_problem(world, rng, rng.randint(2, max(2, world.config.arithmetic_max_steps)))
            if prob["question"] in known_questions:
                continue
            text = prob["question"] + "\n" + prob["solution"]
        if text not in known_text:
            return kind, text
    raise LmstackError("could not draw a new document that differs from the existing corpus")


def write_expansion_batch(world, path: str | os.PathLike, batch: int = 1, n: int | None = None) -> dict:
    """Write expansion batch `batch` as JSONL to `path` atomically; return {planted: count}."""
    recs = expansion_batch(world, batch, n)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["planted"]] = counts.get(r["planted"], 0) + 1
    return counts
