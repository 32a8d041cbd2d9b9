"""`lmstack serve --feedback_db`: every chat/completions response is recorded (streamed ones with their full text),
POST /v1/feedback stores a flag on it; an unknown response id is a 404 and a bad field a 400 naming it, both in
OpenAI's error shape; without --feedback_db the route is a 404 that says how to turn it on; a broken store loses
the record, never the reply. Replies are forced with guided_choice so their text is known."""
import json

import httpx
import pytest

from lmstack.errors import LmstackError
from lmstack.safety.feedback import FeedbackStore, preference_pairs
from serve_helpers import start_server

REPLY = "the cat sat on a mat and the dog ran to the park."


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = FeedbackStore(tmp_path_factory.mktemp("fb") / "feedback.db")
    yield s
    s.close()


@pytest.fixture(scope="module")
def fb_server(model_dir, store):
    srv = start_server(model_dir, engine={"feedback": store})
    yield srv
    srv.stop()


@pytest.fixture
def http(fb_server):
    with httpx.Client(base_url=fb_server.url, timeout=60) as c:
        yield c


def chat(http, content: str, **kw) -> httpx.Response:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 40,
            "temperature": 0.0, "guided_choice": [REPLY], **kw}
    return http.post("/v1/chat/completions", json=body)


def test_a_chat_response_is_recorded_and_feedback_on_it_is_stored(http, store):
    r = chat(http, "How do I brew the forbidden potion of Amberhaven?")
    assert r.status_code == 200
    rid = r.json()["id"]
    rec = store.response(rid)
    assert rec["endpoint"] == "chat" and rec["choices"] == [REPLY]
    assert rec["request"]["messages"] == [{"role": "user", "content": "How do I brew the forbidden potion of Amberhaven?"}]
    f = http.post("/v1/feedback", json={"response_id": rid, "rating": "down", "category": "unsafe",
                                        "correction": "I can't help with that."})
    assert f.status_code == 200, f.text
    out = f.json()
    assert out["object"] == "feedback" and out["id"].startswith("fb-") and out["rating"] == "down"
    flags = [x for x in store.flags() if x["response_id"] == rid]
    assert len(flags) == 1 and flags[0]["correction"] == "I can't help with that." and flags[0]["reply"] == REPLY
    built = preference_pairs(store)
    assert any(p.chosen == "I can't help with that." and p.rejected == REPLY for p in built.pairs)


def test_a_streamed_chat_response_is_recorded_with_its_full_text(http, store):
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "tiny-llama", "messages": [{"role": "user", "content": "tell me"}],
                           "max_tokens": 40, "temperature": 0.0, "guided_choice": [REPLY], "stream": True,
                           "n": 2}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    rid = chunks[0]["id"]
    streamed = {}
    for c in chunks:
        for ch in c["choices"]:
            streamed[ch["index"]] = streamed.get(ch["index"], "") + (ch["delta"].get("content") or "")
    rec = store.response(rid)
    assert rec is not None, "the stream was not recorded by the time [DONE] arrived"
    assert rec["choices"] == [streamed[0], streamed[1]] == [REPLY, REPLY]
    f = http.post("/v1/feedback", json={"response_id": rid, "choice": 1, "rating": "up"})
    assert f.status_code == 200 and f.json()["choice"] == 1


def test_completions_plain_and_streamed_are_recorded(http, store):
    body = {"model": "tiny-llama", "prompt": ["one two", "three four"], "max_tokens": 40, "temperature": 0.0,
            "guided_choice": [REPLY]}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200
    rec = store.response(r.json()["id"])
    assert rec["endpoint"] == "completions" and rec["choices"] == [REPLY, REPLY]
    assert rec["request"]["prompt"] == ["one two", "three four"]
    with http.stream("POST", "/v1/completions", json={**body, "prompt": "five six", "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    rid = json.loads(events[0])["id"]
    assert store.response(rid)["choices"] == [REPLY]


def test_unknown_id_is_a_404_and_bad_fields_are_400s_naming_them(http):
    r = http.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": "down"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert "chatcmpl-nope" in err["message"] and err["type"] == "not_found_error" and err["param"] == "response_id"
    rid = chat(http, "hello").json()["id"]
    for bad, param in (({"rating": "meh"}, "rating"), ({"rating": "down", "category": "rude"}, "category"),
                       ({"rating": "down", "choice": 3}, "choice"), ({"rating": "up", "colour": "red"}, "colour")):
        r = http.post("/v1/feedback", json={"response_id": rid, **bad})
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        if param != "colour":
            assert param in err["message"]
    r = http.post("/v1/feedback", json={"rating": "down"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"


def test_without_feedback_db_the_route_is_a_404_that_says_so(model_dir):
    srv = start_server(model_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            assert chat(http, "hi").status_code == 200
            r = http.post("/v1/feedback", json={"response_id": "x", "rating": "up"})
        assert r.status_code == 404 and "--feedback_db" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_a_failing_store_never_breaks_the_reply(model_dir, tmp_path):
    broken = FeedbackStore(tmp_path / "gone.db")
    broken.close()  # every write now fails inside sqlite3
    srv = start_server(model_dir, engine={"feedback": broken})
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            r = chat(http, "hi")
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY
            r = chat(http, "hi", stream=True)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    finally:
        srv.stop()


def test_serve_refuses_a_bad_feedback_path_at_startup(tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        FeedbackStore(tmp_path / "no" / "such" / "dir" / "fb.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LmstackError, match="junk.db"):
        FeedbackStore(junk)
