"""Multimodal memory (issue 24 XII.15): a picture shown in conversation 1 is asked about in conversation 3.

A dialogue here is three conversations of one user with the assistant:
  1. "Here is a picture of my kitchen. <image>" (the target picture) and one more picture of another room;
  2. small talk about the text world ("What is the capital of Aldoria?") and two more pictures of other rooms;
  3. "In the picture of my kitchen, what colour is the star?" -- the answer is in the conversation-1 picture only.
Every picture is a shapes-world scene; the question is one of the target scene's VQA items, so its answer is
re-derived from that scene. Each dialogue's four rooms are distinct, so the room names the one right picture.

Memory on: ConversationMemory keeps every picture a user showed in an ImageIndex (mm_rag.py, i.e. the rag
issue's Index: CLIP image vector + the turn's text + the PNG), on disk when given a path, so conversation 3 --
another process, days later -- opens it again and recalls the picture by the question (bm25 on the turn's words,
dense CLIP text->image, or hybrid), and the VLM reads the recalled picture. Memory off: the VLM gets conversation
3's question and no picture. The model-side cross-conversation memory of lmstack (model/memory/knn.py, the
Memorizing Transformer's kNN store, used by benchmarks/long_memory.py) keeps one layer's attention keys and
values of text tokens; a picture shown to a VLM is not text the LM attends to across calls, so that store does
not fit, and the rag Index, which persists documents with externally computed vectors, is reused instead.

Usage:
    from lmstack.multimodal.mm_memory import ConversationMemory, build_dialogues, answer_dialogue
    dialogues = build_dialogues(records, world, n=20, seed=0)      # records: build_vision_world(...)
    memory = ConversationMemory.create(ClipEmbedder(clip, tok), path="mem/user1")
    out = answer_dialogue(dialogues[0], by_id, reader, memory=memory)   # {"answer", "correct", "recalled", "hit"}
    out = answer_dialogue(dialogues[0], by_id, reader, memory=None)     # memory off
"""
from __future__ import annotations

import os
import re

import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.cot import parse_answer
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.mm_rag import ClipEmbedder, ImageHit, ImageIndex, Reader
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN
from lmstack.world.config import sub_rng

ROOMS = ("kitchen", "garden", "office", "garage", "studio", "attic", "balcony", "hallway", "library", "workshop",
         "cellar", "porch")
ASKED_TYPES = ("count", "colour", "exists", "yesno")
N_PICTURES = 4  # per dialogue: the target and three others
_OPENING = re.compile(r"In the picture of my [a-z]+, ")


def _small_talk(world, rng) -> list[dict]:
    country = rng.choice(world.countries)
    city = rng.choice(world.cities)
    return [{"role": "user", "text": f"What is the capital of {country.name}?", "image": None},
            {"role": "assistant", "text": f"The capital of {country.name} is {country.capital}.", "image": None},
            {"role": "user", "text": f"Which river flows through {city.name}?", "image": None},
            {"role": "assistant", "text": f"The {city.river} flows through {city.name}.", "image": None}]


def _show(room: str, record_id: str) -> list[dict]:
    return [{"role": "user", "text": f"Here is a picture of my {room}. {IMAGE_TOKEN}", "image": record_id},
            {"role": "assistant", "text": f"Thank you for the picture of your {room}.", "image": None}]


def build_dialogues(records: list[dict], world, n: int, seed: int = 0) -> list[dict]:
    """`n` three-conversation dialogues over the given shapes-world records (pictures drawn without replacement
    within a dialogue). Each: id, conversations (lists of turns: role, text, image record id or None),
    target (the record asked about), room, question (conversation 3's text), inner (the VQA question),
    answer, type."""
    if len(records) < N_PICTURES:
        raise LmstackError(f"a dialogue shows {N_PICTURES} pictures; got only {len(records)} records")
    if not isinstance(n, int) or n < 1:
        raise LmstackError(f"n must be a positive integer, got {n!r}")
    out = []
    for d in range(n):
        rng = sub_rng(seed, "mm_memory", d)
        for _ in range(100):  # a target with a question of an asked type (almost every scene has one)
            picks = rng.sample(records, N_PICTURES)
            items = [q for q in picks[0]["vqa"] if q["type"] in ASKED_TYPES]
            if items:
                break
        else:
            raise LmstackError("no record has a question of the asked types " + ", ".join(ASKED_TYPES))
        rooms = rng.sample(ROOMS, N_PICTURES)
        item = rng.choice(items)
        inner = item["question"]
        question = f"In the picture of my {rooms[0]}, {inner[0].lower()}{inner[1:]}"
        conversations = [
            _show(rooms[0], picks[0]["id"]) + _show(rooms[1], picks[1]["id"]),
            _small_talk(world, rng)[:2] + _show(rooms[2], picks[2]["id"]) + _small_talk(world, rng)[2:]
            + _show(rooms[3], picks[3]["id"]),
            [{"role": "user", "text": question, "image": None}],
        ]
        out.append({"id": f"dialogue{d:05d}", "conversations": conversations, "target": picks[0]["id"],
                    "room": rooms[0], "question": question, "inner": inner, "answer": item["answer"],
                    "type": item["type"]})
    return out


def record_pixels(records: dict[str, dict], record_id: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) pixels of a shapes-world record, rendered from its scene."""
    if record_id not in records:
        raise LmstackError(f"no picture {record_id!r} among the records")
    return to_pixels([render(Scene.from_dict(records[record_id]["scene"]))], size)


class ConversationMemory:
    """The pictures a user showed in earlier conversations, kept in an ImageIndex and recalled by a question."""

    def __init__(self, index: ImageIndex):
        self.index = index

    @classmethod
    def create(cls, embedder: ClipEmbedder, path: str | os.PathLike | None = None) -> "ConversationMemory":
        return cls(ImageIndex.create(embedder, path=path))

    @classmethod
    def open(cls, path: str | os.PathLike, embedder: ClipEmbedder) -> "ConversationMemory":
        """The memory a create(path=...) wrote, e.g. in an earlier process."""
        return cls(ImageIndex.open(path, embedder))

    def observe(self, dialogue_id: str, conv: int, turns: list[dict], records: dict[str, dict]) -> int:
        """Store each picture of one conversation's user turns with the turn's text; returns how many."""
        shown = [(t, i) for i, t in enumerate(turns) if t["role"] == "user" and t.get("image")]
        if not shown:
            return 0
        size = self.index.image_size
        pixels = torch.cat([record_pixels(records, t["image"], size) for t, _ in shown])
        ids = [f"{dialogue_id}/{conv}/{i}" for _, i in shown]
        texts = [t["text"].replace(IMAGE_TOKEN, "").strip() for t, _ in shown]
        meta = [{"record": t["image"], "conversation": conv} for t, _ in shown]
        return self.index.add_images(ids, pixels, texts, meta)

    def recall(self, question: str, k: int = 1, mode: str = "bm25") -> list[ImageHit]:
        return self.index.search(question, k=k, mode=mode)

    def close(self) -> None:
        self.index.close()


def remember_dialogue(memory: ConversationMemory, dialogue: dict, records: dict[str, dict]) -> int:
    """Conversations 1 and 2 go into the memory (the question comes in conversation 3)."""
    return sum(memory.observe(dialogue["id"], c, turns, records)
               for c, turns in enumerate(dialogue["conversations"][:-1], 1))


def inner_question(question: str) -> str:
    """'In the picture of my kitchen, what colour is the star?' -> 'What colour is the star?' (what the VLM is
    asked about the recalled picture); a question without that opening is returned as it is."""
    m = _OPENING.match(question)
    if not m:
        return question
    rest = question[m.end():]
    return rest[:1].upper() + rest[1:]


def answer_dialogue(dialogue: dict, reader: Reader, memory: ConversationMemory | None = None,
                    mode: str = "bm25") -> dict:
    """Conversation 3's question, answered with the recalled picture (memory on; the memory must already hold
    conversations 1-2, see remember_dialogue) or with none (memory=None)."""
    recalled = None
    if memory is not None:
        hits = memory.recall(dialogue["question"], k=1, mode=mode)
        recalled = hits[0].metadata.get("record") if hits else None
        prompt = f"{IMAGE_TOKEN} Question: {inner_question(dialogue['question'])}"
        text = reader.read(prompt, hits[0].pixels) if hits else ""
    else:
        text = reader.read(f"Question: {dialogue['question']}", None)
    answer = parse_answer(text)
    return {"answer": answer, "correct": answer == dialogue["answer"], "recalled": recalled,
            "hit": None if memory is None else recalled == dialogue["target"], "type": dialogue["type"]}


__all__ = ["ConversationMemory", "build_dialogues", "remember_dialogue", "answer_dialogue", "inner_question", "record_pixels",
           "ROOMS", "ASKED_TYPES", "N_PICTURES"]
