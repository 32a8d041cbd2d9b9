"""The synthetic world: config, World API, determinism, atomic writes, manifest and sizes."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmstack.config import ConfigError
from lmstack.world import (
    CORPUS_NAMES, PERSON_ATTRIBUTES, SIZE_PRESETS, World, WorldConfig, generate_world, paraphrase_bio, read_jsonl,
)
from lmstack.world import corpora
from lmstack.errors import LmstackError

TINY = dict(n_people=40, n_cities=10, n_countries=3, n_companies=12, n_universities=5, n_arithmetic=60,
            n_instructions=60, n_preferences=60, n_passkey=6, n_code=20, n_stories=20, n_dialogues=10,
            n_quality=40, passkey_lengths=(64, 200))


def tiny(seed=0, **kw):
    return WorldConfig(seed=seed, **{**TINY, **kw})


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_small")
    start = time.perf_counter()
    manifest = generate_world(out, size="small", seed=0, progress=False)
    return out, manifest, time.perf_counter() - start


# ---- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"size": "huge"}, "size"), ({"corpora": ("qa", "poems")}, "corpora"), ({"n_people": 0}, "n_people"),
    ({"n_people": -3}, "n_people"), ({"qa_test_fraction": 1.5}, "qa_test_fraction"),
    ({"qa_val_fraction": 0.5, "qa_test_fraction": 0.5}, "qa_val_fraction"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"), ({"arithmetic_max_steps": 0}, "arithmetic_max_steps"),
    ({"passkey_lengths": (10,)}, "passkey_lengths"), ({"passkey_unit": "tokens"}, "passkey_unit"),
    ({"seed": "one"}, "seed"), ({"n_countries": 9, "n_cities": 5}, "n_countries"),
    ({"quality_labelled_fraction": 0.0}, "quality_labelled_fraction"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        WorldConfig(**kwargs)


def test_config_count_uses_override_then_preset():
    assert WorldConfig(size="medium").count("n_people") == SIZE_PRESETS["medium"]["n_people"]
    assert WorldConfig(size="medium", n_people=7).count("n_people") == 7


def test_too_many_entities_is_a_clear_error():
    with pytest.raises(LmstackError, match="n_cities"):
        World(n_cities=10_000, n_countries=3)


# ---- World API --------------------------------------------------------------------------------
def test_world_facts_and_lookups():
    w = World(config=tiny())
    p = w.people[0]
    for a in PERSON_ATTRIBUTES:
        assert w.fact(p, a) == getattr(p, a) == w.fact(p.name, a)
    assert w.fact(p.employer, "city") == p.employer_city  # the one derived attribute is consistent
    c = w.cities[0]
    assert w.fact(c.name, "country") == c.country
    assert w.fact(c, "population") == f"{c.population:,}"
    assert w.fact(w.countries[0].name, "capital") in w.country(w.countries[0].name).cities
    assert w.fact(w.universities[0].name, "city") == w.universities[0].city
    with pytest.raises(LmstackError, match="no attribute 'shoe_size'"):
        w.fact(p, "shoe_size")
    with pytest.raises(LmstackError, match="no entity named"):
        w.fact("Nobody Atall", "birth_city")
    with pytest.raises(LmstackError, match="no person named"):
        w.person(c.name)
    facts = w.facts()
    assert len(facts) == (len(w.people) * len(PERSON_ATTRIBUTES) + len(w.cities) * 6 + len(w.countries) * 3)
    assert len({p.name for p in w.people}) == len(w.people)  # unique full names


def test_is_correct_is_a_tolerant_but_exact_fact_check():
    w = World(config=tiny())
    p = w.people[0]
    city = p.birth_city
    assert w.is_correct(p, "birth_city", f"{p.first} was born in {city.upper()}!")
    assert not w.is_correct(p, "birth_city", f"born in {city}port")
    other = next(c.name for c in w.cities if c.name != city)
    assert not w.is_correct(p, "birth_city", f"born in {other}")
    assert w.is_correct(p, "birth_date", p.birth_date.replace(",", "").lower())
    assert not w.is_correct(p, "birth_date", p.birth_date.replace(p.birth_date[-4:], "1800"))


def test_world_from_manifest_rebuilds_the_written_world(tmp_path):
    cfg = tiny(seed=4, corpora=("qa",))
    generate_world(tmp_path, config=cfg, progress=False)
    rebuilt = World.from_manifest(tmp_path)
    assert rebuilt.to_json() == json.loads((tmp_path / "world.json").read_text())
    assert rebuilt.corpus("qa", split="test") == read_jsonl(tmp_path / "qa" / "test.jsonl")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(LmstackError, match="not a world manifest"):
        World.from_manifest(tmp_path / "bad.json")
    with pytest.raises(LmstackError, match="no world manifest"):
        World.from_manifest(tmp_path / "missing")


def test_qa_split_fractions_are_exact():
    w = World(config=tiny(n_people=200))
    counts = {s: len(w.people_in(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 120, "val": 20, "test": 60}
    assert w.qa_split(w.people[0]) in counts


def test_world_is_deterministic_and_seed_dependent():
    a, b, c = World(config=tiny(seed=1)), World(config=tiny(seed=1)), World(config=tiny(seed=2))
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()


def test_paraphrase_bio_states_every_fact_in_many_ways():
    w = World(config=tiny())
    p = w.people[3]
    rng = random.Random(0)
    bios = [paraphrase_bio(p, rng, w) for _ in range(30)]
    for bio in bios:
        for a in PERSON_ATTRIBUTES:
            assert getattr(p, a) in bio, (a, bio)
        assert p.name in bio
    assert len(set(bios)) >= 28
    # without a world, templates needing the country/industry are skipped but every fact remains
    bare = paraphrase_bio(p, random.Random(5))
    assert all(getattr(p, a) in bare for a in PERSON_ATTRIBUTES)


def test_unknown_corpus_is_an_error():
    with pytest.raises(LmstackError, match="unknown corpus"):
        World(config=tiny()).corpus("poems")


# ---- generate_world: files, manifest, determinism ----------------------------------------------
def test_generate_writes_every_corpus_split_with_required_fields(small):
    out, manifest, _ = small
    assert set(manifest["counts"]) == set(CORPUS_NAMES)
    for corpus in CORPUS_NAMES:
        ids = set()
        for split in ("train", "val", "test"):
            path = out / corpus / f"{split}.jsonl"
            recs = read_jsonl(path)
            info = manifest["files"][f"{corpus}/{split}.jsonl"]
            assert info["records"] == len(recs) == manifest["counts"][corpus][split]
            assert info["bytes"] == path.stat().st_size
            assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            for r in recs:
                assert isinstance(r["text"], str) and r["text"]
                assert r["split"] == split and r["source"] == f"world/{corpus}" and r["kind"]
                ids.add(r["id"])
            if corpus != "code":  # small worlds may put few code tasks in val/test, but never none overall
                assert recs, f"{corpus}/{split} is empty"
        assert len(ids) == sum(manifest["counts"][corpus].values()), f"duplicate ids in {corpus}"
    world = json.loads((out / "world.json").read_text())
    assert len(world["people"]) == SIZE_PRESETS["small"]["n_people"]
    assert {p["qa_split"] for p in world["people"]} == {"train", "val", "test"}
    assert not list(out.rglob("*.tmp"))


def test_small_size_is_fast_and_about_two_megabytes(small):
    _, manifest, seconds = small
    assert seconds < 20, f"small took {seconds:.1f} s"  # ~1.5 s on a quiet 2-core CPU
    assert 1.0e6 <= manifest["pretrain_bytes"] <= 3.5e6
    assert manifest["approx_pretrain_tokens"] == manifest["pretrain_bytes"] // 4
    assert manifest["kinds"]["pretrain"]["bio"] >= 4 * 500  # bios_per_person x people (+ val/test bios)


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path, small):
    out, _, _ = small
    again = tmp_path / "again"
    generate_world(again, size="small", seed=0, progress=False)
    assert file_hashes(again) == file_hashes(out)
    other = tmp_path / "other"
    generate_world(other, config=tiny(seed=1), progress=False)
    other2 = tmp_path / "other2"
    generate_world(other2, config=tiny(seed=2), progress=False)
    h1, h2 = file_hashes(other), file_hashes(other2)
    assert all(h1[k] != h2[k] for k in h1 if k.endswith(".jsonl") or k == "world.json")


def test_bytes_do_not_depend_on_python_hash_seed(tmp_path):
    # str hashing is salted per process; set iteration must never leak into the output.
    code = ("from lmstack.world import generate_world, WorldConfig; import sys, json; "
            "m = generate_world(sys.argv[1], config=WorldConfig(**json.loads(sys.argv[2])), progress=False)")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed), json.dumps(cfg)], env=env, check=True)
    assert file_hashes(tmp_path / "1") == file_hashes(tmp_path / "2")


def test_failed_run_leaves_previous_files_intact_and_no_temp_files(tmp_path, monkeypatch):
    cfg = tiny(corpora=("qa", "arithmetic"))
    generate_world(tmp_path, config=cfg, progress=False)
    before = file_hashes(tmp_path)

    def broken(world):
        yield from list(corpora.build_qa(world))[:5]
        raise RuntimeError("killed mid-corpus")

    monkeypatch.setitem(corpora.CORPORA, "qa", broken)
    with pytest.raises(RuntimeError, match="killed"):
        generate_world(tmp_path, config=tiny(seed=9, corpora=("qa", "arithmetic")), progress=False)
    assert file_hashes(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_corpora_subset_and_bad_output_path(tmp_path):
    m = generate_world(tmp_path / "w", config=tiny(corpora=("code",)), progress=False)
    assert set(m["counts"]) == {"code"} and (tmp_path / "w" / "world.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmstackError, match="not a directory"):
        generate_world(tmp_path / "file", config=tiny(corpora=("code",)), progress=False)


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(LmstackError, match=r"x.jsonl:2"):
        read_jsonl(p)


def test_synth_prints_a_summary(tmp_path, capsys):
    from lmstack.world import synth

    synth(str(tmp_path / "s"), size="small", seed=3)
    out = capsys.readouterr().out
    assert "pretrain" in out and "chat" in out and "MB" in out
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["seed"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("size, lo, hi", [("medium", 15e6, 28e6), ("large", 80e6, 130e6)])
def test_bigger_sizes(tmp_path, size, lo, hi):
    m = generate_world(tmp_path, size=size, seed=0, progress=False)
    assert lo <= m["pretrain_bytes"] <= hi
