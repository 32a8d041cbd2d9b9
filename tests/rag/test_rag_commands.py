"""`lmstack rag index|query|ask|check|eval` end to end through the CLI, on a tiny encoder and a tiny chat model
made here: a docs folder with a bad file indexes with a counted skip, search finds the right document, the
fact checker flags a planted contradiction, ask returns checked citations, eval reports rates with n and stderr,
and an index is refused with another embedder."""
import json
import random

import pytest
import torch

import lmstack
from lmstack import cli
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.rag.answer import world_bio_documents
from lmstack.rag.embed import TransformerEmbedder, load_embedder, save_embedder
from lmstack.tokenizer import train_tokenizer
from lmstack.world import World
from lmstack.world.qa import answer_sentence

WORLD_SEED = 0


def run_json(capsys, argv):
    assert cli.main(argv + ["--json_output"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    minilm = load_embedder("minilm")
    torch.manual_seed(0)
    cfg = preset("bert-tiny", vocab_size=minilm.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                 n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=128)
    path = tmp_path_factory.mktemp("enc") / "tiny-enc"
    save_embedder(TransformerEmbedder(Transformer(cfg), minilm.tokenizer, name="tiny", max_length=128), path)
    return str(path)


@pytest.fixture(scope="module")
def world():
    return World(seed=WORLD_SEED)


@pytest.fixture(scope="module")
def world_index(tmp_path_factory, encoder):
    out = str(tmp_path_factory.mktemp("idx") / "world")
    assert cli.main(["rag", "index", "--world", str(WORLD_SEED), "--out", out, "--embedder", encoder]) == 0
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, world):
    texts = [d.text for d in world_bio_documents(world)[:20]] + ["Question: Context: cite [1] [2]"] * 10
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=320, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    lmstack.save_model(Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=512)).eval(), path,
                       tokenizer=tok)
    return str(path)


def test_index_a_folder_with_a_bad_file_then_query_it(tmp_path, capsys, encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ada.txt").write_text("Ada Ashford was born in Amberhaven. She studied botany.", encoding="utf-8")
    (docs / "bo.md").write_text("# Bo\n\nBo Brant works for Zentrix Labs in Coldwater.", encoding="utf-8")
    (docs / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    out = str(tmp_path / "idx")
    summary = run_json(capsys, ["rag", "index", "--docs", str(docs), "--out", out, "--embedder", encoder,
                                "--chunk.size", "50", "--chunk.overlap", "5"])
    assert summary["documents"] == 2 and summary["chunks"] >= 2 and summary["skipped"] == 1
    assert summary["skipped_files"][0]["path"].endswith("bad.txt")
    found = run_json(capsys, ["rag", "query", "Who works for Zentrix Labs?", "--index", out, "--mode", "bm25",
                              "--k", "2"])
    assert found["hits"][0]["doc_id"].endswith("bo.md") and found["hits"][0]["rank"] == 1
    dense = run_json(capsys, ["rag", "query", "Zentrix", "--index", out, "--mode", "hybrid", "--k", "2"])
    assert dense["hits"][0]["doc_id"].endswith("bo.md")  # bm25 and dense fused: the only bm25 hit stays first
    assert sorted(h["doc_id"].rsplit("/", 1)[-1] for h in dense["hits"]) == ["ada.txt", "bo.md"]  # dense adds ada


def test_an_index_is_refused_with_another_embedder_and_bad_calls_are_one_line(tmp_path, capsys, encoder,
                                                                              world_index):
    assert cli.main(["rag", "query", "x", "--index", world_index, "--embedder", "minilm"]) == 2
    err = capsys.readouterr().err
    assert "minilm" in err and "tiny-enc" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["rag", "index", "--docs", str(empty), "--out", str(tmp_path / "i")]) == 2
    assert "no readable documents" in capsys.readouterr().err
    assert cli.main(["rag", "check", "--index", world_index]) == 2
    assert "exactly one of --text" in capsys.readouterr().err


def test_check_flags_a_planted_contradiction_and_revises(capsys, world, world_index):
    person = world.people[7]
    wrong = world.other_value("employer", person.employer, random.Random(0))
    text = f"{answer_sentence(person, 'birth_city')} {person.pronoun.capitalize()} works for {wrong}."
    out = run_json(capsys, ["rag", "check", "--index", world_index, "--text", text, "--mode", "bm25", "--revise"])
    assert [c["label"] for c in out["claims"]] == ["supported", "contradicted"]
    assert out["revised"] == answer_sentence(person, "birth_city")


def test_ask_answers_with_checked_citations(capsys, world, world_index, chat_model):
    person = world.people[3]
    q = f"Where was {person.name} born?"
    out = run_json(capsys, ["rag", "ask", q, "--model", chat_model, "--index", world_index, "--k", "2",
                            "--mode", "bm25", "--max_tokens", "6"])
    assert out["question"] == q and isinstance(out["answer"], str) and len(out["hits"]) >= 1
    assert out["hits"][0]["doc_id"] == f"bio/{person.name}"
    assert all(c["n"] in out["citations"] for c in out["checks"])
    closed = run_json(capsys, ["rag", "ask", q, "--model", chat_model, "--index", world_index, "--closed_book",
                               "--max_tokens", "4"])
    assert closed["hits"] == [] and closed["checks"] == []


def test_eval_reports_rates_with_n_and_stderr(tmp_path, capsys, world_index, chat_model):
    out_file = tmp_path / "eval.json"
    out = run_json(capsys, ["rag", "eval", "--model", chat_model, "--index", world_index, "--world", str(WORLD_SEED),
                            "--n", "4", "--k", "2", "--mode", "bm25", "--max_tokens", "6", "--out", str(out_file)])
    for key in ("accuracy_closed_book", "accuracy_rag", "hallucination_rag", "retrieval_gold_in_context",
                "answers_with_unsupported_claim_rag", "accuracy_rag_revised"):
        assert out[key]["n"] >= 1 and 0 <= out[key]["value"] <= 1 and out[key]["stderr"] >= 0, key
    assert out["unsupported_claims_rag"]["n"] >= 0  # per claim: a random model may state none
    assert out["retrieval_gold_in_context"]["value"] == 1.0  # bm25 finds the person's bio by name
    assert json.loads(out_file.read_text())["config"]["n"] == 4
