import dataclasses
import hashlib
import importlib.util
import inspect
import json
import random

import pytest
import yaml

from lmstack.cli import main
from lmstack.config import load_config
from lmstack.data import commands
from lmstack.data.expand import add_sources
from lmstack.data.loader import LoaderConfig, TokenLoader
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.shards import ShardSet, read_manifest
from lmstack.errors import LmstackError

NOUNS = "river farmer village market teacher garden bridge storm harbour library mountain school doctor kitchen".split()
VERBS = "crossed visited repaired painted described watched followed opened cleaned measured".split()
EVAL = "what is the name of the tallest mountain that the farmers of the northern valley can see from the market"


def prose(rng, n=5):
    return " ".join(f"The {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} with the {rng.choice(NOUNS)} "
                    f"and then it {rng.choice(VERBS)} a {rng.choice(NOUNS)} near {rng.choice(NOUNS)} {rng.randint(1, 999)}."
                    for _ in range(n))


def make_inputs(root, seed=0):
    rng = random.Random(seed)
    (root / "books").mkdir(parents=True)
    paras = [prose(rng) for _ in range(30)]
    (root / "books" / "a.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (root / "books" / "broken.txt").write_bytes(b"\xff\xfe not utf-8 \x80")
    web = [{"text": prose(rng), "id": i} for i in range(40)]
    web.append({"text": web[0]["text"], "id": "copy"})                                        # exact duplicate
    web.append({"text": web[1]["text"].replace(" the ", " a ", 1), "id": "near"})             # near duplicate
    web.append({"text": prose(rng, 2) + " You stupid idiot, shut up, you moron.", "id": "toxic"})
    web.append({"text": prose(rng) + " Mail jane@corp.example.com for details.", "id": "pii"})
    web.append({"text": prose(rng, 2) + " " + EVAL + " " + prose(rng, 2), "id": "leak"})
    web.append({"text": "tiny", "id": "short"})
    lines = [json.dumps(r) for r in web] + ["{broken json"]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def config(root, out, workers=1, **kw):
    data = {"inputs": [{"path": str(root / "books"), "text_mode": "paragraph", "source": "books"},
                       {"path": str(root / "web.jsonl"), "source": "web"}],
            "out": str(out), "workers": workers, "batch_size": 8, "progress": False,
            "filters": {"quality": {"min_words": 20}},
            "decontam": {"strings": [EVAL]},
            "mix": {"weights": {"books": 0.5, "web": 0.5}},
            "shards": {"docs_per_shard": 16}}
    data.update(kw)
    path = root / f"pipeline_{workers}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(PipelineConfig, path)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_end_to_end(tmp_path):
    root = make_inputs(tmp_path / "in")
    report = run_pipeline(config(root, tmp_path / "out"))
    steps = {s.name: s for s in report.steps.values()}
    assert list(steps) == ["read", "quality", "toxicity", "langid", "pii", "dedup", "decontaminate", "mix", "shard"]
    assert steps["read"].kept == 76 and steps["read"].dropped == {"bad_json": 1, "bad_file": 1}
    assert steps["quality"].dropped == {"too_few_words": 1}
    assert steps["toxicity"].dropped == {"toxic_words": 1}
    assert steps["pii"].modified == {"email": 1}
    assert steps["dedup"].dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    assert steps["decontaminate"].dropped == {"contaminated:inline": 1}
    assert report.sections["contamination"]["inline"]["examples"] == ["inline:0"]
    assert report.sections["languages"] == {"en": 71}
    assert report.sections["read"]["skipped_files"] and "broken.txt" in next(iter(report.sections["read"]["skipped_files"]))
    mixing = report.sections["mixing"]["source"]
    assert mixing["after"]["books"] == pytest.approx(0.5, abs=0.08) and mixing["before"]["books"] < 0.45
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "pipeline.yaml", "clean.jsonl"):
        assert (out / name).is_file()
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean = [json.loads(line) for line in (out / "clean.jsonl").read_text().splitlines()]
    assert len(clean) == 71 and any("<EMAIL>" in d["text"] for d in clean)
    assert not {"web/copy", "web/near", "web/toxic", "web/leak"} & {d["id"] for d in clean}
    manifest = read_manifest(out / "shards")
    assert manifest["generations"][0]["generation"] == 0 and "pending" not in manifest
    assert manifest["total_docs"] == steps["shard"].kept == report.sections["shards"]["docs"]
    x, y = next(TokenLoader(out / "shards", LoaderConfig(batch_size=2, seq_len=64)))
    assert x.shape == (2, 64)
    again = run_pipeline(config(root, tmp_path / "out"))  # a rerun reuses every shard
    assert again.sections["shards"]["written"] == 0 and again.sections["shards"]["resumed"] == len(manifest["shards"])


def test_workers_do_not_change_the_result(tmp_path):
    root = make_inputs(tmp_path / "in", seed=1)
    kw = {"filters": {"quality": {"min_words": 20}, "langid": {"enabled": False}}}
    one = run_pipeline(config(root, tmp_path / "one", workers=1, **kw))
    two = run_pipeline(config(root, tmp_path / "two", workers=2, **kw))
    assert [(s.name, s.kept, s.dropped) for s in one.steps.values()] == [(s.name, s.kept, s.dropped) for s in two.steps.values()]
    m1, m2 = read_manifest(tmp_path / "one" / "shards"), read_manifest(tmp_path / "two" / "shards")
    assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]


def test_add_appends_without_touching_old_shards(tmp_path):
    root = make_inputs(tmp_path / "in", seed=2)
    out = tmp_path / "out"
    run_pipeline(config(root, out, filters={"quality": {"min_words": 20}, "langid": {"enabled": False}}))
    shard_dir = out / "shards"
    before = read_manifest(shard_dir)
    hashes = {p.name: sha(p) for p in shard_dir.glob("shard_*")}
    old_clean = sha(out / "clean.jsonl")
    rng = random.Random(99)
    old_doc = json.loads((out / "clean.jsonl").read_text().splitlines()[3])
    new = [{"text": prose(rng), "id": i} for i in range(20)] + [{"text": old_doc["text"], "id": "old-again"},
                                                               {"text": EVAL + " " + prose(rng, 3), "id": "leak2"}]
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    report = add_sources(out, [ReaderConfig(path=str(tmp_path / "news.jsonl"), source="news")], progress=False)
    assert report.steps["dedup"].dropped == {"exact_duplicate": 1}
    assert report.steps["decontaminate"].dropped == {"contaminated:inline": 1}
    assert {p.name: sha(p) for p in shard_dir.glob("shard_*") if p.name in hashes} == hashes  # byte-identical
    assert sha(out / "clean.jsonl") == old_clean
    after = read_manifest(shard_dir)
    assert after["shards"][: len(before["shards"])] == before["shards"]
    assert [g["generation"] for g in after["generations"]] == [0, 1]
    assert after["total_docs"] == before["total_docs"] + 20 and after["dedup"] == "dedup.gen1"
    assert not (shard_dir / "dedup.gen0").exists() and (out / "reports" / "add_gen1.json").is_file()
    assert ShardSet(shard_dir, verify=True).n_docs == after["total_docs"]
    again = add_sources(out, [ReaderConfig(path=str(tmp_path / "news.jsonl"), source="news")], progress=False)
    # Everything is now in the index, the leak too: dedup runs before decontamination, so the index
    # holds every document that reached it and copies of dropped ones stay out as well.
    assert again.steps["dedup"].dropped == {"exact_duplicate": 22}


def test_cli_and_config_errors(tmp_path, capsys):
    root = make_inputs(tmp_path / "in", seed=3)
    cfg = config(root, tmp_path / "out", filters={"quality": {"min_words": 20}, "langid": {"enabled": False}})
    assert main(["data", "run", "--config", str(root / "pipeline_1.yaml"), "--dedup.near", "simhash"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"][0]["name"] == "read"
    news = tmp_path / "n.txt"
    news.write_text(prose(random.Random(5), 8), encoding="utf-8")
    assert main(["data", "add", "--out", str(cfg.out), "--inputs", f"[{news}]", "--source", "news"]) == 0
    assert "added generation 1" in capsys.readouterr().out
    assert main(["data", "verify", "--shards", str(tmp_path / "out" / "shards")]) == 0
    assert "generations [0, 1]" in capsys.readouterr().out
    assert main(["data", "run", "--out", str(tmp_path / "empty")]) == 2
    assert "no inputs" in capsys.readouterr().err
    bad = dataclasses.replace(cfg, out=str(tmp_path / "bad"))
    bad.mix.weights = {"books": 1.0}
    with pytest.raises(LmstackError, match="missing \\['web'\\]"):
        run_pipeline(bad)
    assert not (tmp_path / "bad" / "shards").exists()
    with pytest.raises(LmstackError, match="no pipeline.yaml"):
        add_sources(tmp_path / "nothing", [ReaderConfig(path=str(news))])


def test_run_flags_mirror_pipeline_config():
    params = list(inspect.signature(commands.run).parameters)
    assert params == [f.name for f in dataclasses.fields(PipelineConfig)]
    assert "synth" in commands.COMMANDS or not _world_available()


def _world_available():
    return importlib.util.find_spec("lmstack.world") is not None


@pytest.mark.timeout(120)
def test_worker_setup_error_surfaces_instead_of_hanging(tmp_path):
    root = make_inputs(tmp_path / "in", seed=4)
    cfg = config(root, tmp_path / "out", workers=2,
                 filters={"classifier": {"enabled": True, "model": str(tmp_path / "no_model")}})
    with pytest.raises(LmstackError, match="cannot load a classifier"):
        run_pipeline(cfg)
    assert not (tmp_path / "out" / "clean.jsonl").exists()
    with pytest.raises(LmstackError, match="matches no file"):
        run_pipeline(dataclasses.replace(cfg, inputs=[ReaderConfig(path=str(tmp_path / "missing.jsonl"))], mix=cfg.mix.__class__()))


def test_config_is_strict():
    from lmstack.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="filters.quality.'min_wrods'"):
        from_dict(PipelineConfig, {"filters": {"quality": {"min_wrods": 3}}})
    with pytest.raises(ConfigError, match="dedup.near='lsh'"):
        from_dict(PipelineConfig, {"dedup": {"near": "lsh"}})
    with pytest.raises(ValueError, match="minhash.bands"):
        from_dict(PipelineConfig, {"dedup": {"minhash": {"bands": 64, "rows": 4}}})
    cfg = from_dict(PipelineConfig, {"inputs": [{"path": "x.jsonl", "text_fields": ["q", "a"]}], "workers": 1})
    assert cfg.inputs[0].text_fields == ["q", "a"] and cfg.filters.quality.enabled
