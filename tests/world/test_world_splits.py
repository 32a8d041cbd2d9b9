"""Split hygiene: held-out people, phrasings, problems and prompts never leak into training files."""
from __future__ import annotations

import re

import pytest

from lmstack.world import PERSON_ATTRIBUTES, SIZE_PRESETS, World, generate_world, read_jsonl
from lmstack.world.qa import QA_TEMPLATES, TEMPLATE_SPLITS, template_fragments, templates_for


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_splits")
    generate_world(out, size="small", seed=0, progress=False)
    load = lambda corpus, split: read_jsonl(out / corpus / f"{split}.jsonl")  # noqa: E731
    return World(seed=0, size="small"), load


def train_strings(load) -> list[str]:
    """Every piece of text a model could train on: documents, messages, prompts and answers."""
    out = []
    for corpus in ("pretrain", "qa", "arithmetic", "instructions", "preferences", "passkey", "code", "chat", "quality"):
        for r in load(corpus, "train"):
            out.append(r["text"])
            out.extend(m["content"] for m in r.get("messages", []))
            fields = ("prompt", "chosen", "rejected", "question", "response")
            out.extend(r[k] for k in fields if isinstance(r.get(k), str))
    return out


def test_template_split_is_a_partition():
    for attribute, templates in QA_TEMPLATES.items():
        assert len(templates) == 6 and len(set(templates)) == 6
        used = [i for idx in TEMPLATE_SPLITS.values() for i in idx]
        assert sorted(used) == list(range(6))
        assert set(templates_for(attribute, "test")).isdisjoint(templates_for(attribute, "train"))


def test_heldout_questions_and_phrasings_never_appear_in_training_files(world_files):
    world, load = world_files
    corpus = "\n".join(train_strings(load))
    heldout = load("qa", "val") + load("qa", "test")
    assert len(heldout) == 8 * (len(world.people_in("val")) + len(world.people_in("test")))
    lines = set(corpus.split("\n"))
    for r in heldout:
        assert world.qa_split(r["person"]) == r["split"] != "train"
        assert r["template"] in {f"{r['attribute']}/{i}" for i in TEMPLATE_SPLITS[r["split"]]}
        assert r["question"] not in lines
        assert f"Question: {r['question']}" not in lines
    # the fixed text of every val/test template appears nowhere in training text
    for attribute in PERSON_ATTRIBUTES:
        for split in ("val", "test"):
            for template in templates_for(attribute, split):
                for fragment in template_fragments(template):
                    assert fragment not in corpus, (attribute, split, fragment)
    # ...while train phrasings are used (so the check above is not vacuous)
    train_fragments = [f for a in PERSON_ATTRIBUTES for t in templates_for(a, "train") for f in template_fragments(t)]
    assert len(train_fragments) >= 10 and all(f in corpus for f in train_fragments)


def test_heldout_people_appear_only_in_bios_never_in_qa_form(world_files):
    world, load = world_files
    qa_like = [("pretrain", "qa"), ("chat", "qa"), ("chat", "multi_turn"), ("preferences", "correctness")]
    seen = 0
    for corpus, kind in qa_like:
        for r in load(corpus, "train"):
            if r["kind"] == kind and ("person" in r or "subject" in r):
                assert world.qa_split(r.get("person") or r["subject"]) == "train"
                seen += 1
    assert seen > 1000
    # every test person's facts are in the pretraining corpus: that is what test QA measures
    bios = {}
    for r in load("pretrain", "train"):
        if r["kind"] == "bio":
            bios.setdefault(r["subject"], []).append(r["text"])
    per_person = SIZE_PRESETS["small"]["bios_per_person"]
    for p in world.people_in("test"):
        assert len(bios[p.name]) == per_person
        for text in bios[p.name]:
            assert all(getattr(p, a) in text for a in PERSON_ATTRIBUTES)
    # dialogues (first-person facts) only feature train people
    name = re.compile(r"^([A-Z][a-z]+ [A-Z][a-z]+):", re.M)
    for r in load("pretrain", "train"):
        if r["kind"] == "dialogue":
            assert all(world.qa_split(n) == "train" for n in name.findall(r["text"]))


def test_heldout_items_of_other_corpora_do_not_leak(world_files):
    world, load = world_files
    corpus_lines = set("\n".join(train_strings(load)).split("\n"))
    for split in ("val", "test"):
        for r in load("arithmetic", split):
            assert r["question"] not in corpus_lines
        for r in load("instructions", split):
            assert r["instruction"] not in corpus_lines
        train_entry_points = {r["entry_point"] for r in load("code", "train")}
        assert not {r["entry_point"] for r in load("code", split)} & train_entry_points
        # safety and helpfulness prompts are split by city
        train_cities = {r["city"] for r in load("preferences", "train") if "city" in r}
        held_cities = {r["city"] for r in load("preferences", split) if "city" in r}
        assert held_cities and not held_cities & train_cities
        assert all(world.city_split(c) == split for c in held_cities)


def test_pretrain_val_test_hold_no_qa_pairs(world_files):
    _, load = world_files
    for split in ("val", "test"):
        kinds = {r["kind"] for r in load("pretrain", split)}
        assert "qa" not in kinds and {"bio", "story", "arithmetic"} <= kinds
