"""`lmstack serve --guard`: /v1/moderations through the openai client; a flagged request gets the refusal with
finish_reason content_filter (plain and streamed) and never reaches the engine; a stream that turns harmful is cut
mid-stream with the refusal and content_filter and its engine request aborted; PII in replies is redacted; a bad
guard config or moderator is refused at startup, naming the key.

The tiny random model cannot write harmful text by itself, so the replies are forced with guided_choice (the
engine's constrained decoding): the cut logic, not the model, is what is tested. The keyword moderator judges.
"""
import json

import httpx
import pytest

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.safety.guard import Guard, GuardConfig
from serve_helpers import start_server

openai = pytest.importorskip("openai")

REFUSAL = "Sorry, I will not help with that."
SAFE = "the cat sat on a mat and the dog ran to the park while birds sang in old trees near green hills. "
HARMFUL = SAFE + "now brew the forbidden potion of the park with grave moss and raven feathers at midnight."
PII = "call me at 555-123-4567 or mail bob.smith@mail.example now."


@pytest.fixture(scope="module")
def guard_server(model_dir):
    guard = Guard(GuardConfig(moderator="keyword", window=40, stride=10, refusal=REFUSAL))
    srv = start_server(model_dir, engine={"guard": guard})
    yield srv
    srv.stop()


@pytest.fixture
def client(guard_server):
    with openai.OpenAI(base_url=guard_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def forced(text: str, **kw) -> dict:
    return {"model": "tiny-llama", "max_tokens": 200, "temperature": 0.0, "extra_body": {"guided_choice": [text]}, **kw}


def test_moderations_endpoint_through_the_openai_client(client):
    res = client.moderations.create(input=["How do I brew the forbidden potion of Amberhaven?", "I like tea.",
                                           "you stupid idiot", "mail me at bob@mail.example"])
    flags = [r.flagged for r in res.results]
    assert flags == [True, False, True, True]
    first = res.results[0].model_dump()
    assert first["categories"]["harmful_instructions"] is True and first["categories"]["pii"] is False
    assert first["category_scores"]["harmful_instructions"] == 1.0
    assert res.results[3].model_dump()["categories"]["pii"] is True
    one = client.moderations.create(input="hello there")
    assert len(one.results) == 1 and one.results[0].flagged is False and one.model.startswith("lmstack-moderation")


def test_moderations_bad_input_is_a_400(guard_server):
    with httpx.Client(base_url=guard_server.url, timeout=30) as http:
        r = http.post("/v1/moderations", json={"input": []})
        assert r.status_code == 400 and "input" in r.json()["error"]["message"]
        r = http.post("/v1/moderations", json={"input": "x", "bogus": 1})
        assert r.status_code == 400


def test_a_flagged_request_gets_the_refusal_without_running_the_engine(client, guard_server):
    before = guard_server.stats()["prompt_tokens"]
    msgs = [{"role": "user", "content": "How do I brew the forbidden potion of Amberhaven?"}]
    r = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, n=2)
    assert [c.finish_reason for c in r.choices] == ["content_filter"] * 2
    assert all(c.message.content == REFUSAL for c in r.choices) and r.usage.completion_tokens == 0
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert guard_server.stats()["prompt_tokens"] == before  # the engine saw none of it
    c = client.completions.create(model="tiny-llama", prompt="you stupid idiot, answer me", max_tokens=4)
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].text == REFUSAL
    with httpx.Client(base_url=guard_server.url, timeout=30) as http:  # token-id prompts are judged as their text
        ids = http.post("/tokenize", json={"prompt": "you stupid idiot", "add_special_tokens": False}).json()["tokens"]
        r = http.post("/v1/completions", json={"prompt": [ids, ids[:1]], "max_tokens": 4}).json()
        assert [ch["finish_reason"] for ch in r["choices"]] == ["content_filter"] * 2
        bad = http.post("/v1/completions", json={"prompt": [10**6], "max_tokens": 4})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_the_whole_conversation_is_judged(client):
    # The last message alone passes; an earlier turn names the brew, and the guard reads the whole conversation.
    msgs = [{"role": "user", "content": "What is the forbidden potion of Amberhaven?"},
            {"role": "assistant", "content": "A banned brew."},
            {"role": "user", "content": "Thanks. Now tell me how it is made."}]
    r = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=4)
    assert r.choices[0].finish_reason == "content_filter"


def test_a_stream_that_turns_harmful_is_cut_mid_stream(client, guard_server):
    stream = client.chat.completions.create(messages=[{"role": "user", "content": "tell me a story"}], stream=True,
                                            **forced(HARMFUL))
    pieces, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    text = "".join(pieces)
    assert finish == "content_filter"
    assert text.endswith(REFUSAL)
    before_refusal = text[:-len(REFUSAL)].strip()
    assert len(before_refusal) >= 40 and HARMFUL.startswith(before_refusal)  # the safe start went out first ...
    assert "forbidden" not in text and "grave moss" not in text  # ... the harmful rest never did
    stats = guard_server.wait_idle()
    assert stats["running"] == 0 and stats["requests_aborted"] >= 1  # the engine request was aborted


def test_a_harmful_reply_is_replaced_when_not_streamed(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "tell me a story"}], **forced(HARMFUL))
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == REFUSAL
    ok = client.chat.completions.create(messages=[{"role": "user", "content": "tell me a story"}], **forced(SAFE))
    assert ok.choices[0].finish_reason != "content_filter" and ok.choices[0].message.content == SAFE


def test_pii_in_replies_is_redacted(client):
    msgs = [{"role": "user", "content": "how do I reach you"}]
    r = client.chat.completions.create(messages=msgs, **forced(PII))
    assert r.choices[0].message.content == "call me at <PHONE> or mail <EMAIL> now."
    stream = client.chat.completions.create(messages=msgs, stream=True, **forced(PII))
    text = "".join(ch.delta.content or "" for chunk in stream for ch in chunk.choices)
    assert text == "call me at <PHONE> or mail <EMAIL> now."
    c = client.completions.create(prompt="contact:", **forced(PII))
    assert c.choices[0].text == "call me at <PHONE> or mail <EMAIL> now."


def test_a_bad_guard_config_is_refused_at_startup(tmp_path, model_dir):
    from lmstack.serve.commands import serve

    bad = tmp_path / "guard.yaml"
    bad.write_text("moderator: keyword\nwindw: 100\n")
    with pytest.raises(ConfigError, match="windw"):
        serve(str(model_dir), guard=str(bad))
    bad.write_text(json.dumps({"thresholds": {"violence": 0.5}}))
    with pytest.raises(LmstackError, match="violence"):
        serve(str(model_dir), guard=str(bad))
    bad.write_text("stride: 500\nwindow: 100\n")
    with pytest.raises(ConfigError, match="stride"):
        serve(str(model_dir), guard=str(bad))
    bad.write_text(f"moderator: {tmp_path / 'no_such_model'}\n")
    with pytest.raises(LmstackError, match="no_such_model"):
        serve(str(model_dir), guard=str(bad))
