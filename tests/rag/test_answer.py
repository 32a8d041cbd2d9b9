"""RAG.ask through a real lmstack.LLM (a tiny random llama) over an in-test list retriever: the prompt holds
the retriever's top-k, the answer is the engine's greedy reply to exactly that prompt, and the citations in a
reply are parsed and checked against the chunks they name."""

import pytest
import torch

import lmstack
from lmstack.model.presets import preset
from lmstack.errors import LmstackError
from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.rag.answer import RAG, RagAnswer, world_bio_documents
from lmstack.rag.index import Index
from lmstack.rag.prompt import content_words
from lmstack.rag.types import Chunk, Document, Hit
from lmstack.tokenizer import train_tokenizer
from lmstack.world import World
from rag_fakes import HashEmbedder

BIOS = {
    "ada": "Ada Ashford was born in Amberhaven. She studied botany at Norvale University.",
    "bo": "Bo Brant works for Zentrix Labs. He was born in Coldwater.",
    "cy": "Cy Corwin plays the cello. He studied law at Eastmoor College.",
}


class ListRetriever:
    """Ranks chunks by shared content words with the query (a test's retriever, not the real Index)."""

    def __init__(self, texts: dict[str, str]):
        self.chunks = [Chunk(f"{d}#0", d, t, "bios", 0, len(t)) for d, t in texts.items()]
        self.calls = []

    def search(self, query, k=5, mode="hybrid"):
        self.calls.append((query, k, mode))
        q = set(content_words(query))
        ranked = sorted(self.chunks, key=lambda c: -len(q & set(content_words(c.text))))
        return [Hit(c, float(len(q & set(content_words(c.text)))), i) for i, c in enumerate(ranked[:k], 1)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    texts = list(BIOS.values()) * 10 + ["Question: where was he born? Answer the question [1] [2]"] * 10
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=512)
    path = tmp_path_factory.mktemp("rag_llm") / "tiny"
    lmstack.save_model(lmstack.Transformer(cfg).eval(), path, tokenizer=tok)
    return lmstack.LLM(str(path), max_num_seqs=4)


def test_ask_prompts_with_the_retrievers_top_k_and_returns_the_engines_reply(llm):
    retriever = ListRetriever(BIOS)
    rag = RAG(llm, retriever, k=2, mode="bm25", max_tokens=8)
    ans = rag.ask("Where was Ada Ashford born?")
    assert retriever.calls == [("Where was Ada Ashford born?", 2, "bm25")]
    assert [h.chunk.doc_id for h in ans.hits] == ["ada", ans.hits[1].chunk.doc_id] and len(ans.hits) == 2
    prompt = rag.prompt("Where was Ada Ashford born?", ans.hits)
    assert "[1] Ada Ashford was born in Amberhaven." in prompt.messages[-1]["content"]
    direct = llm.chat(prompt.messages, lmstack.SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0].text
    assert ans.text == direct.strip()  # greedy: the answer is the model's reply to exactly that prompt
    assert ans.retrieve_s >= 0 and ans.generate_s > 0


def test_closed_book_has_no_context(llm):
    rag = RAG(llm, ListRetriever(BIOS), k=2, max_tokens=4)
    base = rag.ask_closed_book("Where was Ada Ashford born?")
    assert base.hits == [] and base.checks == []
    direct = llm.chat([{"role": "user", "content": "Where was Ada Ashford born?"}],
                      lmstack.SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].text
    assert base.text == direct.strip()


def test_citations_in_a_reply_are_parsed_and_checked(llm, monkeypatch):
    rag = RAG(llm, ListRetriever(BIOS), k=3)
    reply = "Ada Ashford was born in Amberhaven [1]. She works for Zentrix Labs [1]. See also [9]."

    def chat(convs, params):  # the model's reply, fixed, so the checks see known citations
        return [RequestOutput("r", None, [], [CompletionOutput(0, reply, [], finish_reason="stop")], True)
                for _ in convs]

    monkeypatch.setattr(llm, "chat", chat)
    ans = rag.ask("Where was Ada Ashford born?")
    assert ans.citations == [1, 9]
    assert [(c.n, c.exists, c.supported) for c in ans.checks] == [(1, True, True), (1, True, False), (9, False, False)]
    assert not ans.citations_ok and [h.chunk.doc_id for h in ans.cited_hits] == ["ada"]
    start, end = ans.checks[0].span
    assert BIOS["ada"][start:end] == "Ada Ashford was born in Amberhaven"
    d = ans.to_dict()
    assert d["checks"][0]["doc_id"] == "ada" and d["checks"][2]["chunk_id"] is None


def test_ask_many_batches_and_keeps_order(llm):
    rag = RAG(llm, ListRetriever(BIOS), k=1, max_tokens=4)
    qs = ["Where was Bo Brant born?", "What does Cy Corwin play?"]
    answers = rag.ask_many(qs)
    assert [a.question for a in answers] == qs and [a.hits[0].chunk.doc_id for a in answers] == ["bo", "cy"]
    assert all(isinstance(a, RagAnswer) for a in answers)


def test_bad_arguments_are_clear_errors(llm):
    with pytest.raises(LmstackError, match="k=0"):
        RAG(llm, ListRetriever(BIOS), k=0)
    with pytest.raises(LmstackError, match="mode='fuzzy'"):
        RAG(llm, ListRetriever(BIOS), mode="fuzzy")
    with pytest.raises(LmstackError, match="search"):
        RAG(llm, object())
    with pytest.raises(LmstackError, match="empty"):
        RAG(llm, ListRetriever(BIOS)).ask("   ")


def test_rag_over_the_real_index_and_training_chats_cite_the_gold_chunk(llm):
    docs = [Document(d, t, "bios") for d, t in BIOS.items()]
    with Index.build(docs, HashEmbedder(32, "hash-32")) as index:
        rag = RAG(llm, index, k=2, mode="hybrid", max_tokens=4)
        ans = rag.ask("Where was Bo Brant born?")
        assert ans.hits[0].chunk.doc_id == "bo" and ans.hits[0].chunk.text == BIOS["bo"]
        (chat,) = rag.training_chats([("Where was Bo Brant born?", "Bo Brant was born in Coldwater.")],
                                     gold=["Coldwater"])
    msgs = chat["messages"]
    assert msgs[:-1] == rag.prompt("Where was Bo Brant born?", ans.hits).messages  # exactly what ask() sends
    assert msgs[-1] == {"role": "assistant", "content": "Bo Brant was born in Coldwater [1]."}


def test_world_bios_state_every_fact_once_per_person():
    world = World(seed=2, n_people=5)
    docs = world_bio_documents(world)
    assert [d.doc_id for d in docs] == [f"bio/{p.name}" for p in world.people]
    assert all(world.is_correct(p, "birth_city", d.text) for p, d in zip(world.people, docs))


def test_a_reranker_reorders_what_goes_into_the_prompt(llm):
    docs = [Document(d, t, "bios") for d, t in BIOS.items()]
    with Index.build(docs, HashEmbedder(32, "hash-32")) as index:
        plain = RAG(llm, index, k=2, mode="bm25", max_tokens=2).retrieve("Where was Bo Brant born?")
        last_first = RAG(llm, index, k=2, mode="bm25", max_tokens=2,
                         rerank=lambda q, hits, k: list(reversed(hits))[:k]).retrieve("Where was Bo Brant born?")
    assert plain[0].chunk.doc_id == "bo" and last_first[0].chunk.doc_id != "bo"
