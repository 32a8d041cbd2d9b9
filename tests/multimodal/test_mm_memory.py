"""Multimodal memory: three-conversation dialogues whose answers are re-derived from the target scene, a memory
on disk that a later 'process' reopens and recalls the right picture from, and memory on vs off through a reader
that can only answer from the picture it is handed."""
from __future__ import annotations

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.mm_memory import ConversationMemory, answer_dialogue, build_dialogues, inner_question, \
    record_pixels, remember_dialogue
from lmstack.rag.index import Index
from lmstack.rag.types import Document
from lmstack.multimodal.shapes import Scene
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.world import World

SIZE = 32


class PixelEmbedder:
    """Test embedder: a fixed random projection of the pixels, and of a text's byte histogram."""
    name, dim, image_size = "pixels-test", 32, SIZE

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj, self.text_proj = torch.randn(3 * SIZE * SIZE, 32, generator=g), torch.randn(256, 32, generator=g)

    def embed_images(self, pixels):
        return torch.nn.functional.normalize(pixels.reshape(len(pixels), -1) @ self.proj, dim=-1).numpy()

    def embed(self, texts, batch_size=64):
        hist = torch.tensor([[t.encode().count(b) for b in range(256)] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(hist @ self.text_proj, dim=-1).numpy()


@pytest.fixture(scope="module")
def records():
    return [r for r in build_vision_world(40, SIZE, seed=0) if r["split"] != "train"] or \
        build_vision_world(40, SIZE, seed=0)


@pytest.fixture(scope="module")
def by_id(records):
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def dialogues(records):
    return build_dialogues(records, World(seed=0, n_people=5), n=6, seed=0)


def _rederive(question: str, scene: Scene) -> str:
    """Our own answer to a VQA question from the scene's objects (count, colour, exists, yesno)."""
    objs, words = scene.objects, question.rstrip("?").split()
    if question == "How many shapes are there?":
        return str(len(objs))
    if question.startswith("How many"):
        what = words[2]
        return str(sum(1 for o in objs if o.colour == what or o.shape + ("es" if o.shape.endswith("s") else "s")
                       == what))
    if question.startswith("What colour is the"):
        return next(o.colour for o in objs if o.shape == words[-1])
    if question.startswith("Is there a"):
        return "yes" if any((o.colour, o.shape) == (words[-2], words[-1]) for o in objs) else "no"
    shape, colour = words[3], words[4]  # "Is the <shape> <colour>?"
    return "yes" if next(o for o in objs if o.shape == shape).colour == colour else "no"


def test_dialogues_are_deterministic_and_answers_come_from_the_target(records, by_id, dialogues):
    assert build_dialogues(records, World(seed=0, n_people=5), n=6, seed=0) == dialogues
    for d in dialogues:
        c1, c2, c3 = d["conversations"]
        assert c1[0]["image"] == d["target"] and d["room"] in c1[0]["text"] and "<image>" in c1[0]["text"]
        shown = [t["image"] for c in (c1, c2) for t in c if t["image"]]
        assert len(shown) == len(set(shown)) == 4  # four distinct pictures, the target only in conversation 1
        assert [t["image"] for t in c3] == [None] and c3[0]["text"] == d["question"]
        assert any("capital" in t["text"] for t in c2)  # other talk in between
        inner = inner_question(d["question"])
        assert d["room"] in d["question"] and d["room"] not in inner
        assert d["answer"] == _rederive(inner, Scene.from_dict(by_id[d["target"]]["scene"]))


class PictureReader:
    """Answers only from the picture it is handed: the true VQA answer for that exact picture, else 'no idea'."""

    def __init__(self, records, dialogues):
        self.answers = {}
        for d in dialogues:
            px = record_pixels({r["id"]: r for r in records}, d["target"], SIZE).numpy().tobytes()
            self.answers[(px, inner_question(d["question"]))] = d["answer"]

    def read(self, prompt, pixels):
        if pixels is None:
            return "Answer: no idea"
        return f"Answer: {self.answers.get((pixels.numpy().tobytes(), prompt.split('Question: ')[1]), 'no idea')}"


def test_memory_on_recalls_the_picture_across_processes_memory_off_cannot(tmp_path, records, by_id, dialogues):
    reader = PictureReader(records, dialogues)
    for d in dialogues:
        path = tmp_path / d["id"]
        memory = ConversationMemory.create(PixelEmbedder(), path=path)
        assert remember_dialogue(memory, d, by_id) == 4
        memory.close()
        later = ConversationMemory.open(path, PixelEmbedder())  # conversation 3, another process
        on = answer_dialogue(d, reader, memory=later)
        assert on == {"answer": d["answer"], "correct": True, "recalled": d["target"], "hit": True,
                      "type": d["type"]}
        off = answer_dialogue(d, reader, memory=None)
        assert off["answer"] == "no idea" and not off["correct"] and off["hit"] is None
        later.close()


def test_bad_input(tmp_path, records, by_id):
    with pytest.raises(LmstackError, match="pictures"):
        build_dialogues(records[:3], World(seed=0, n_people=5), n=1)
    with pytest.raises(LmstackError, match="positive integer"):
        build_dialogues(records, World(seed=0, n_people=5), n=0)
    with pytest.raises(LmstackError, match="no picture"):
        record_pixels(by_id, "img999999", SIZE)
    Index.build([Document("d1", "some text")], PixelEmbedder(), path=tmp_path / "text").close()
    with pytest.raises(LmstackError, match="text index"):
        ConversationMemory.open(tmp_path / "text", PixelEmbedder())
    assert inner_question("What colour is the star?") == "What colour is the star?"
