"""The speedrun's RAG stage (lmstack.stages.rag): the bios' index, the retrieval-formatted SFT chats (the prompt
RAG.ask builds, the answer citing the bio that holds it) and the closed-book vs RAG scores it writes."""
import json
import sys
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.model.presets import preset
from lmstack.rag.answer import RAG
from lmstack.rag.prompt import parse_citations
from lmstack.stages import rag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rag_fakes import HashEmbedder  # noqa: E402


@pytest.fixture(scope="module")
def index(world, tmp_path_factory):
    return rag.build_world_index(world, tmp_path_factory.mktemp("rag") / "index", HashEmbedder(64, "hash-64"))


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rag_model") / "tiny"
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=512)
    lmstack.save_model(lmstack.Transformer(cfg).eval(), path, tokenizer=tok)
    return path


def test_one_whole_bio_per_person_is_indexed(world, index):
    assert len(index) == len(world.people)
    chunk = index.search(f"Where was {world.people[0].name} born?", k=1, mode="bm25")[0].chunk
    assert chunk.doc_id == f"bio/{world.people[0].name}" and chunk.start == 0
    assert chunk.text == index.document(chunk.doc_id).text  # never split: a later sentence names nobody


def test_training_records_are_the_prompt_ask_builds_and_cite_the_bio_with_the_answer(world, tok, index, model_dir):
    records = rag.training_records(index, tok, world, "train", max_model_len=512, k=2, n=20)
    assert len(records) == 20 and {r["kind"] for r in records} == {rag.KIND}
    llm = lmstack.LLM(str(model_dir), max_model_len=512)
    asker = RAG(llm, index, k=2, mode="bm25", max_tokens=rag.MAX_TOKENS)
    cited = 0
    for r in records:
        *prompt, answer = r["messages"]
        question = prompt[-1]["content"].rsplit("Question: ", 1)[1]
        built = asker.prompt(question, asker.retrieve(question))
        assert prompt == built.messages and built.n_tokens + rag.MAX_TOKENS <= 512
        assert answer["role"] == "assistant"
        for n in parse_citations(answer["content"]):  # the cited passage holds the answer's value
            value = answer["content"].split(" [")[0].lower()
            assert value in built.hits[n - 1].chunk.text.lower()
            cited += 1
    assert cited >= 18  # BM25 finds the asked-about person's bio for (nearly) every question


def test_rag_stage_scores_closed_book_against_rag_and_writes_the_report(world, index, model_dir, tmp_path):
    results = rag.rag_stage(tmp_path, {"sft": str(model_dir)}, world, index, n_eval=12, k=2, log=lambda *_: None)
    saved = json.loads((tmp_path / "rag" / "results.json").read_text())
    assert saved["n_eval"] == 12 and saved["recall_at_k"]["bm25"] >= 0.9
    m = results["models"]["sft"]
    for key in ("accuracy_closed_book", "accuracy_rag", "hallucination_rag", "citations_ok"):
        assert m[key]["n"] == 12 and 0.0 <= m[key]["value"] <= 1.0
    assert m["retrieval_gold_in_context"]["value"] >= 0.9  # the gold bio reached the prompt
    report = (tmp_path / "rag" / "report.md").read_text()
    assert "## RAG: world QA closed-book vs with retrieval" in report
    assert f"| sft | {m['accuracy_closed_book']['value']:.1%} ± " in report
