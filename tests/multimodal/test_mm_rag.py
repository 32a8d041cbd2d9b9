"""Multimodal RAG over the rag Index: flags stored with CLIP image vectors are found by the city's name and by the
picture, survive a reopen from disk, and the answering pipeline hands the reader the retrieved picture. The reader
here is a pixel-exact lookup of the rendered flags (so a wrong picture gives a wrong answer)."""
from __future__ import annotations

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.mm_rag import ClipEmbedder, ImageIndex, VLMReader, add_link_records, answer_link_question, \
    reading_prompt
from lmstack.multimodal.shapes import Scene, render
from lmstack.model import ModelConfig
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vlm import VLM, VLMConfig
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.world_link import build_world_link, link_questions
from lmstack.world import World

SIZE = 32


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=400, n_images=40)


def tiny_clip(tok, seed=0) -> CLIP:
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision=VisionConfig(image_size=SIZE, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                     text=TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=48,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id),
                     embed_dim=16)
    return CLIP(cfg).eval()


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_people=8)


@pytest.fixture(scope="module")
def records(world):
    return build_world_link(world, size=SIZE)


@pytest.fixture(scope="module")
def embedder(tok):
    return ClipEmbedder(tiny_clip(tok), tok)


@pytest.fixture(scope="module")
def index(embedder, records):
    idx = ImageIndex.create(embedder)
    assert add_link_records(idx, records) == len(records)
    return idx


class PixelEmbedder:
    """A test embedder that tells every picture apart: a fixed random projection of the raw pixels (texts get a
    projection of their byte histogram). Enough to exercise the image->image path without training a CLIP."""
    name, dim, image_size = "pixels-test", 32, SIZE

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * SIZE * SIZE, self.dim, generator=g)
        self.text_proj = torch.randn(256, self.dim, generator=g)

    def embed_images(self, pixels):
        return torch.nn.functional.normalize(pixels.reshape(len(pixels), -1) @ self.proj, dim=-1).numpy()

    def embed(self, texts, batch_size=64):
        hist = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            for b in t.encode():
                hist[i, b] += 1
        return torch.nn.functional.normalize(hist @ self.text_proj, dim=-1).numpy()


@pytest.fixture(scope="module")
def pixel_index(records):
    idx = ImageIndex.create(PixelEmbedder())
    add_link_records(idx, records)
    return idx


class LookupReader:
    """Answers from the one stored flag/badge whose pixels equal the picture it is given; no picture: 'circle'."""

    def __init__(self, records):
        self.by_pixels = {to_pixels([render(Scene.from_dict(r["scene"]))], SIZE).numpy().tobytes(): r
                          for r in records}
        self.prompts = []

    def read(self, prompt, pixels):
        self.prompts.append(prompt)
        if pixels is None:
            return "Answer: circle"
        rec = self.by_pixels.get(pixels.numpy().tobytes())
        if rec is None:
            return "Answer: unknown"
        field = "emblem_colour" if "colour" in prompt else "emblem_shape"
        return f"Answer: {rec['design'][field]}"


def test_the_name_finds_the_flag_and_the_picture_finds_itself(index, records):
    assert len(index) == len(records)
    for rec in records[::4]:
        name_hit = index.search(f"What shape is on the {rec['kind']} of {rec['entity']}?", k=1, mode="bm25")[0]
        assert name_hit.doc_id == rec["id"] and name_hit.metadata["entity"] == rec["entity"]
        picture = to_pixels([render(Scene.from_dict(rec["scene"]))], SIZE)
        assert torch.equal(name_hit.pixels, picture)  # the PNG in the index is the picture, exactly
        # an untrained CLIP puts some flags nearly on top of each other: the picture's own entry scores cosine 1
        # and nothing outscores it, but a near-twin may tie
        image_hits = index.search_image(picture, k=5)
        own = next(h for h in image_hits if h.doc_id == rec["id"])
        assert own.score == pytest.approx(1.0, abs=1e-4) and image_hits[0].score <= own.score + 1e-4
    badge = next(r for r in records if r["kind"] == "badge")
    flag_only = index.search_image(to_pixels([render(Scene.from_dict(badge["scene"]))], SIZE), k=3,
                                   where={"picture": "flag"})
    assert len(flag_only) == 3 and all(h.doc_id.startswith("flag-") for h in flag_only)  # a filter, not a starve
    assert index.get(badge["id"]).metadata == {"picture": "badge", "entity": badge["entity"], "kind": "image"}
    dense = index.search("a large red star", k=3, mode="dense")
    assert len(dense) == 3 and dense[0].score >= dense[1].score >= dense[2].score


def test_answers_with_and_without_retrieval(pixel_index, records, world):
    index, reader = pixel_index, LookupReader(records)
    questions = link_questions(world, records[::3])
    by_id = {r["id"]: r for r in records}
    image_only = [q for q in questions if q["needs"] == "image"]
    with_r = [answer_link_question(q, index, reader, world, retrieval=True) for q in image_only]
    assert all(o["hit"] and o["correct"] for o in with_r)
    assert all("this flag" in p or "this badge" in p for p in reader.prompts)
    assert not any(r["entity"] in p for r in records for p in reader.prompts)  # the reader never sees the name
    without = [answer_link_question(q, index, reader, world, retrieval=False) for q in image_only]
    expected = [q["answer"] == "circle" for q in image_only]  # the reader's guess is right only by chance
    assert [o["correct"] for o in without] == expected and sum(expected) < len(expected)
    for q in (q for q in questions if q["needs"] == "join"):
        shown = to_pixels([render(Scene.from_dict(by_id[q["record"]]["scene"]))], SIZE)
        out = answer_link_question(q, index, reader, world, retrieval=True, shown=shown)
        assert out["hit"] and out["correct"], (q, out)
        if q["type"] == "city_fact":
            assert out["answer"] == str(world.fact(by_id[q["record"]]["entity"], q["args"]["attribute"]))


def test_reopened_from_disk_and_other_clip_refused(tmp_path, embedder, records, tok):
    idx = ImageIndex.create(embedder, path=tmp_path / "idx")
    add_link_records(idx, records[:5])
    idx.close()
    again = ImageIndex.open(tmp_path / "idx", embedder)
    assert len(again) == 5 and again.search(f"flag of {records[2]['entity']}", k=1)[0].doc_id == records[2]["id"]
    with pytest.raises(LmstackError, match="embedder"):
        ImageIndex.open(tmp_path / "idx", ClipEmbedder(tiny_clip(tok, seed=1), tok))
    again.close()


def test_bad_input_named(index, records, world):
    with pytest.raises(LmstackError, match="one id and one text"):
        index.add_images(["a", "b"], torch.zeros(1, 3, SIZE, SIZE), ["x"])
    with pytest.raises(LmstackError, match="non-empty text"):
        index.add_images(["a"], torch.zeros(1, 3, SIZE, SIZE), [" "])
    with pytest.raises(LmstackError, match="one picture"):
        index.search_image(torch.zeros(2, 3, SIZE, SIZE))
    join = next(q for q in link_questions(world, records) if q["needs"] == "join")
    with pytest.raises(LmstackError, match="shown="):
        answer_link_question(join, index, LookupReader(records), world)
    q = next(q for q in link_questions(world, records) if q["type"] == "flag_colour")
    assert reading_prompt(q) == "<image> Question: What colour is the emblem on this flag?"


def test_vlm_reader_decodes_to_eos(tok):
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vision=VisionConfig(image_size=SIZE, patch_size=16, d_model=32, n_layers=1, n_heads=2),
                        lm=ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                       max_seq_len=64), image_token_id=tok.token_to_id(IMAGE_TOKEN))).eval()
    reader = VLMReader(vlm, tok, max_new_tokens=5)
    pixels = torch.zeros(1, 3, SIZE, SIZE)
    text = reader.read("<image> Question: What colour is the star?", pixels)
    ids = torch.tensor([vlm.expand_prompt([tok.bos_id] + tok.encode("<image> Question: What colour is the star?"))])
    new = vlm.generate(ids, pixels, max_new_tokens=5, eos_token_id=tok.eos_id)[0]
    assert len(new) <= 5 and text == tok.decode(new)  # BOS first, <image> expanded, greedy, cut at 5 tokens
    assert isinstance(reader.read("Question: hello", None), str)
    with pytest.raises(LmstackError, match="needs pixels"):
        reader.read("<image> Question: x", None)
