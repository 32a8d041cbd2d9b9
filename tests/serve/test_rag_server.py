"""`lmstack serve --rag_index`: RAG chat returns citations through the openai client (a `rag` body field, or a
tool named `retrieve`), streaming carries them in its first chunk and each choice's citation checks on the chunk
that finishes it, /v1/embeddings matches the embedder in float
and base64, and bad requests are 400s that leave the server answering."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from lmstack.rag.index import Index
from lmstack.rag.types import Chunk, Document, Hit
from lmstack.serve.rag_routes import RagService, _checks_json, _with_citations
from rag_fakes import HashEmbedder
from serve_helpers import start_server

openai = pytest.importorskip("openai")

DOCS = [Document("ada", "Ada Ashford was born in Amberhaven. She studied botany.", "bios"),
        Document("bo", "Bo Brant works for Zentrix Labs in Coldwater.", "bios"),
        Document("cy", "Cy Corwin plays the cello every day.", "bios")]


@pytest.fixture(scope="module")
def rag_server(model_dir, tmp_path_factory):
    emb = HashEmbedder(64, "hash-64")
    index = Index.build(DOCS, emb, path=tmp_path_factory.mktemp("ragidx") / "idx")
    srv = start_server(model_dir, engine={"rag": RagService(index, emb)})
    yield srv, emb
    srv.stop()
    index.close()


@pytest.fixture
def client(rag_server):
    srv, _ = rag_server
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_rag_chat_returns_citations_through_the_openai_client(client):
    r = client.chat.completions.create(model="tiny-llama", max_tokens=8, temperature=0.0,
                                       messages=[{"role": "user", "content": "Who works for Zentrix Labs?"}],
                                       extra_body={"rag": {"k": 2, "mode": "bm25"}})
    extra = r.model_extra
    assert [c["doc_id"] for c in extra["citations"]][:1] == ["bo"] and extra["citations"][0]["n"] == 1
    assert extra["citations"][0]["text"] == DOCS[1].text and {"start", "end", "cited"} <= set(extra["citations"][0])
    checks = r.choices[0].model_extra["citation_checks"]
    assert isinstance(checks, list) and all({"n", "ok", "span"} <= set(c) for c in checks)
    assert r.usage.prompt_tokens > 20  # the numbered context went into the prompt


def test_a_retrieve_tool_is_run_by_the_server(client):
    tool = {"type": "function", "function": {"name": "retrieve", "description": "search the documents",
                                             "parameters": {"type": "object", "properties": {}}}}
    r = client.chat.completions.create(model="tiny-llama", max_tokens=4, temperature=0.0, tools=[tool],
                                       messages=[{"role": "user", "content": "Where was Ada Ashford born?"}])
    assert r.model_extra["citations"][0]["doc_id"] == "ada"
    assert not r.choices[0].message.tool_calls


def test_a_streamed_rag_chat_carries_citations_in_its_first_chunk(client):
    stream = client.chat.completions.create(model="tiny-llama", max_tokens=4, temperature=0.0, stream=True,
                                            messages=[{"role": "user", "content": "Who plays the cello?"}],
                                            extra_body={"rag": {"k": 1, "mode": "bm25"}})
    chunks = list(stream)
    assert chunks[0].model_extra["citations"][0]["doc_id"] == "cy"
    assert all("citations" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishing = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1  # the checks ride on the chunk that finishes the choice, over its whole reply
    hit = Hit(Chunk("cy#0", "cy", DOCS[2].text, "bios", 0, len(DOCS[2].text)), 1.0, 1)
    assert finishing[0].model_extra["citation_checks"] == _checks_json(text, [hit])[0]


def test_stream_citation_checks_cover_the_whole_reply_of_each_choice():
    hit = Hit(Chunk("cy#0", "cy", DOCS[2].text, "bios", 0, len(DOCS[2].text)), 1.0, 1)

    def event(i, content, finish=None):
        return "data: " + json.dumps({"choices": [{"index": i, "delta": {"content": content},
                                                   "finish_reason": finish}]}) + "\n\n"

    async def events():
        for e in (event(0, "Cy Corwin plays "), event(1, "Nobody [2]"), event(0, "the cello [1]."),
                  event(1, ".", "stop"), event(0, "", "stop"), "data: [DONE]\n\n"):
            yield e

    async def collect():
        return [e async for e in _with_citations(events(), [hit])]

    out = asyncio.run(collect())
    assert out[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(e[len("data: "):]) for e in out[:-1]]
    assert payloads[0]["citations"][0]["doc_id"] == "cy" and "citations" not in payloads[1]
    (one,) = payloads[3]["choices"][0]["citation_checks"]  # choice 1 cites [2]: there is no passage 2
    assert one["n"] == 2 and not one["exists"] and not one["ok"]
    (zero,) = payloads[4]["choices"][0]["citation_checks"]  # choice 0's sentence is in passage 1
    assert zero["n"] == 1 and zero["ok"] and zero["doc_id"] == "cy"
    assert "citation_checks" not in payloads[2]["choices"][0]


def test_embeddings_match_the_embedder_in_float_and_base64(client, rag_server):
    _, emb = rag_server
    texts = ["Ada Ashford was born in Amberhaven.", "cello"]
    got = client.embeddings.create(model="hash-64", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens == 7
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), emb.embed(texts), atol=1e-6)
    plain = client.embeddings.create(model="hash-64", input="cello", encoding_format="float")
    np.testing.assert_allclose(plain.data[0].embedding, emb.embed(["cello"])[0], atol=1e-6)


def test_bad_requests_are_400s_and_the_server_keeps_answering(client, rag_server):
    srv, _ = rag_server
    bad = [
        lambda: client.embeddings.create(model="hash-64", input=["ok", ""]),
        lambda: client.embeddings.create(model="hash-64", input="x", dimensions=8),
        lambda: client.chat.completions.create(model="tiny-llama", max_tokens=4,
                                               messages=[{"role": "user", "content": "x"}],
                                               extra_body={"rag": {"k": 0}}),
        lambda: client.chat.completions.create(model="tiny-llama", max_tokens=4,
                                               messages=[{"role": "user", "content": "x"}],
                                               extra_body={"rag": {"mode": "fuzzy"}}),
        lambda: client.chat.completions.create(model="tiny-llama", max_tokens=4,
                                               messages=[{"role": "system", "content": "only a system turn"}],
                                               extra_body={"rag": {}}),
    ]
    for call in bad:
        with pytest.raises(openai.BadRequestError):
            call()
    with pytest.raises(openai.NotFoundError, match="not served for embeddings"):
        client.embeddings.create(model="other", input="x")
    long_query = "where " * 3000  # far longer than the tiny model's context: trimmed, not an error
    r = client.chat.completions.create(model="tiny-llama", max_tokens=4, temperature=0.0,
                                       messages=[{"role": "user", "content": long_query}],
                                       extra_body={"rag": {"k": 3, "mode": "bm25"}})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert any("question" in t for t in r.model_extra["rag_trimmed"])
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_a_server_without_an_index_refuses_rag_and_embeddings(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.BadRequestError, match="--rag_index"):
            c.chat.completions.create(model="tiny-llama", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                                      extra_body={"rag": {"k": 1}})
        with pytest.raises(openai.NotFoundError, match="no embedder"):
            c.embeddings.create(model="x", input="x")
