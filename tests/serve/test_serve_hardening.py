"""Server hardening (issue 15 §1, server side): heavy requests stay off the event loop (/health answers within
100 ms while each runs), request caps are 400s naming the field, huge prompts are 413 before encoding, lone
surrogates are 400s that keep the connection, empty prompts are 400 unless allowed, every 503 has Retry-After,
the API key covers what the docs say, and a request that fails inside the engine is a 500 for it alone.
"""
import asyncio
import gc
import http.client
import json
import threading
import time

import httpx
import pytest

from serve_helpers import make_text, start_server

HEALTH_LIMIT_S = 0.1


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def post_raw(client: httpx.Client, path: str, body: dict, **kw) -> httpx.Response:
    """json.dumps escapes non-ASCII, so a lone surrogate travels as the JSON escape "\\ud800"."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}, **kw)


class HealthProbe:
    """GETs /health every 10 ms on its own keep-alive connection while the `with` block runs."""

    def __init__(self, url: str):
        self.url, self.times, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            c.get("/health")  # connect first, so the probes time /health and not the handshake
            while not self.stop.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                self.times.append(time.perf_counter() - t)
                time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


TEXT = " ".join(make_text(40000, seed=1))  # ~1.6 MB of words


def heavy_cases(limits):
    gen = {"prompt": "the cat", "max_tokens": 4, "ignore_eos": True}
    words = TEXT.split()
    long_words = [f"{w}{i}".ljust(limits.max_bad_word_chars, "q") for i, w in enumerate(words[:limits.max_bad_words])]
    return {
        "bad_words_at_cap": ("/v1/completions", {**gen, "bad_words": long_words}, 200),
        "bad_words_60k": ("/v1/completions", {**gen, "bad_words": words[:60_000]}, 400),
        "tokenize_0.96MB": ("/tokenize", {"prompt": TEXT[:960_000]}, 200),
        "prompt_1MB": ("/v1/completions", {"prompt": TEXT[:1_000_000 - 100], "max_tokens": 1}, 413),
        "chat_1MB": ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT[:1_000_000 - 200]}]},
                     413),
        "stop_at_cap": ("/v1/completions", {**gen, "stop": [f"{i:04d}".ljust(limits.max_stop_chars, "y")
                                                            for i in range(limits.max_stop)]}, 200),
        "stop_1000x1000": ("/v1/completions", {**gen, "stop": [f"{i:04d}".ljust(1000, "y") for i in range(1000)]},
                           400),
    }


@pytest.mark.parametrize("case", ["bad_words_at_cap", "bad_words_60k", "tokenize_0.96MB", "prompt_1MB", "chat_1MB",
                                  "stop_at_cap", "stop_1000x1000"])
def test_health_answers_within_100ms_while_a_heavy_request_runs(server, case):
    path, body, status = heavy_cases(server.app.state.lmstack.limits)[case]
    # The test server shares this pytest process (and its GIL) with the whole suite's heap: freeze that heap so
    # a full garbage collection of it does not land in /health's timing, and give the case a second try, since a
    # server that really blocks its loop fails both (a lone run never needed one; the full suite once saw 656 ms).
    gc.collect()
    gc.freeze()
    try:
        for attempt in range(2):
            with HealthProbe(server.url) as probe, httpx.Client(base_url=server.url, timeout=120) as c:
                r = c.post(path, json=body)
                time.sleep(0.03)
            assert r.status_code == status, r.text[:300]
            assert len(probe.times) >= 3
            if max(probe.times) < HEALTH_LIMIT_S:
                break
    finally:
        gc.unfreeze()
    assert max(probe.times) < HEALTH_LIMIT_S, f"/health took {max(probe.times) * 1000:.0f} ms during {case}"
    if status == 200 and path == "/tokenize":
        assert r.json()["count"] > 100_000


def test_a_huge_prompt_is_refused_by_bytes_before_it_is_encoded(server, monkeypatch):
    state = server.app.state.lmstack
    calls = []
    encode = state.tokenizer.encode
    monkeypatch.setattr(state.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    limit = state.prompt_bytes_limit
    assert limit == state.max_model_len * state.bytes_per_token and state.bytes_per_token >= 16
    with httpx.Client(base_url=server.url, timeout=30) as c:
        err = error(c.post("/v1/completions", json={"prompt": "a" * (limit + 1), "max_tokens": 1}), 413)
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt" and str(limit) in err["message"]
        assert not calls  # refused without encoding
        err = error(c.post("/v1/completions", json={"prompt": ["hi", "é" * (limit // 2 + 1)], "max_tokens": 1}), 413)
        assert err["param"] == "prompt.1" and not calls  # counted in UTF-8 bytes, not characters
        # at the bound it is encoded, and the token count decides (413 as before: 'a' * limit > 256 tokens)
        err = error(c.post("/v1/completions", json={"prompt": "a" * limit, "max_tokens": 1}), 413)
        assert calls and "tokens" in err["message"]


@pytest.mark.parametrize("field,value,param", [
    ("stop", lambda L: ["x"] * (L.max_stop + 1), "stop"),
    ("stop", lambda L: ["y" * (L.max_stop_chars + 1)], "stop.0"),
    ("stop", lambda L: "y" * (L.max_stop_chars + 1), "stop.0"),
    ("bad_words", lambda L: ["w"] * (L.max_bad_words + 1), "bad_words"),
    ("bad_words", lambda L: ["ok", "w" * (L.max_bad_word_chars + 1)], "bad_words.1"),
    ("logit_bias", lambda L: {str(i): 1.0 for i in range(L.max_logit_bias + 1)}, "logit_bias"),
    ("stop_token_ids", lambda L: [1] * (L.max_stop_token_ids + 1), "stop_token_ids"),
    ("guided_choice", lambda L: ["a"] * (L.max_guided_choices + 1), "guided_choice"),
    ("guided_regex", lambda L: "a" * (L.max_guided_chars + 1), "guided_regex"),
])
def test_caps_are_400_naming_the_field(http, server, field, value, param):
    limits = server.app.state.lmstack.limits
    err = error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, field: value(limits)}), 400)
    assert err["param"] == param and err["code"] == "limit_exceeded"
    assert field in err["message"] and "limits.max_" in err["message"]


def test_caps_on_messages_and_prompts_and_at_the_cap_are_accepted(model_dir):
    from lmstack.serve.limits import RequestLimits

    srv = start_server(model_dir, limits=RequestLimits(max_messages=3, max_stop=2, max_stop_chars=5, max_prompts=2))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            msgs = [{"role": "user", "content": "hi"}] * 4
            err = error(c.post("/v1/chat/completions", json={"messages": msgs}), 400)
            assert err["param"] == "messages" and "at most 3" in err["message"]
            assert error(c.post("/tokenize", json={"messages": msgs}), 400)["param"] == "messages"
            ok = c.post("/v1/chat/completions", json={"messages": msgs[:3], "max_tokens": 2, "stop": ["abcde", "x"]})
            assert ok.status_code == 200, ok.text
            assert error(c.post("/v1/completions", json={"prompt": "hi", "stop": ["abcdef"]}), 400)["param"] == "stop.0"
            err = error(c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1}), 400)
            assert err["param"] == "prompt" and "limits.max_prompts" in err["message"]
            assert c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200
    finally:
        srv.stop()


def _keepalive_pair(port: int, first: tuple[str, str, str]) -> tuple[int, dict, int, bool]:
    """On one HTTP/1.1 connection: the `first` request, then a good completion. Returns (first status, first
    body, second status, whether the second went over the very same socket)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        method, path, body = first
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        status, payload = r.status, json.loads(r.read())
        assert (r.getheader("connection") or "").lower() != "close"
        sock = conn.sock
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "the cat", "max_tokens": 2}),
                     headers={"content-type": "application/json"})
        r2 = conn.getresponse()
        r2.read()
        return status, payload, r2.status, conn.sock is sock and sock is not None
    finally:
        conn.close()


@pytest.mark.parametrize("path,body,param,pos", [
    ("/v1/completions", {"prompt": "abc \ud800", "max_tokens": 1}, "prompt", 4),
    ("/v1/completions", {"prompt": ["ok", "x\udfffy"], "max_tokens": 1}, "prompt.1", 1),
    ("/v1/completions", {"prompt": "ok", "stop": ["a", "\ud800"], "max_tokens": 1}, "stop.1", 0),
    ("/v1/completions", {"prompt": "ok", "bad_words": ["zz\udc00"], "max_tokens": 1}, "bad_words.0", 2),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud83d there"}]},
     "messages.0.content", 3),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text", 0),
    ("/tokenize", {"prompt": "abc \ud800"}, "prompt", 4),
])
def test_lone_surrogates_are_400_naming_field_and_position_and_keep_the_connection(server, path, body, param, pos):
    status, payload, second, same = _keepalive_pair(server.port, ("POST", path, json.dumps(body)))
    assert status == 400, payload
    err = payload["error"]
    assert err["param"] == param and err["code"] == "invalid_unicode"
    assert f"at character {pos}" in err["message"] and "surrogate" in err["message"]
    assert second == 200 and same, "the keep-alive connection must survive the bad request"


def test_a_valid_surrogate_pair_is_fine(http):
    r = post_raw(http, "/tokenize", {"prompt": "smile \U0001F600"})  # sent as the pair \ud83d\ude00
    assert r.status_code == 200 and r.json()["count"] > 1


def test_an_internal_error_is_a_500_json_and_keeps_the_connection(server, monkeypatch):
    state = server.app.state.lmstack

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "check_ids", broken)
    status, payload, second, same = _keepalive_pair(server.port, ("POST", "/detokenize", '{"tokens": [1, 2]}'))
    assert status == 500 and payload["error"]["message"] == "internal error: RuntimeError"
    assert "a bug" not in json.dumps(payload)  # no internals leak
    assert second == 200 and same


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", ""]}, "prompt.1"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [[5], []]}, "prompt.1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}, {"role": "user", "content": []}]},
     "messages"),
])
def test_empty_prompts_are_400(http, path, body, param):
    err = error(http.post(path, json={**body, "max_tokens": 2}), 400)
    assert err["param"] == param and "empty" in err["message"] and "allow_empty_prompt" in err["message"]


def test_empty_prompts_are_served_when_the_request_allows_them(http):
    r = http.post("/v1/completions", json={"prompt": "", "max_tokens": 3, "allow_empty_prompt": True,
                                           "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] >= 1 and r.json()["usage"]["completion_tokens"] == 3
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}], "max_tokens": 2,
                                                "allow_empty_prompt": True})
    assert r.status_code == 200, r.text


def test_every_503_has_retry_after(model_dir):
    srv = start_server(model_dir, max_queue=0, engine={"max_num_seqs": 1})
    aengine = srv.aengine
    engine = aengine.engine
    step = engine.step
    engine.step = lambda: time.sleep(0.005) or step()  # so the first request surely still runs
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            body = {"prompt": "the cat", "max_tokens": 100, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")
                for path, req in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                    r = c.post(path, json=req)
                    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                for _ in lines:
                    pass
            # the engine is down: /health is a 503 with Retry-After too
            loop = asyncio.new_event_loop()
            dead = loop.create_future()
            dead.set_exception(RuntimeError("engine died"))
            real, aengine._task = aengine._task, dead
            try:
                r = c.get("/health")
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            finally:
                aengine._task = real
                dead.exception()  # retrieved: no "never retrieved" warning
                loop.close()
            assert c.get("/health").status_code == 200
    finally:
        engine.step = step
        srv.stop()


def test_a_flood_of_preparation_work_is_503_with_retry_after(model_dir):
    from lmstack.serve.limits import RequestLimits

    srv = start_server(model_dir, limits=RequestLimits(prep_threads=1, max_preparing=1))
    tok = srv.aengine.tokenizer
    encode = tok.encode
    tok.encode = lambda *a, **k: time.sleep(0.5) or encode(*a, **k)  # a slow tokenisation holds the one slot
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            first = threading.Thread(target=lambda: c.post("/tokenize", json={"prompt": "the cat"}))
            first.start()
            time.sleep(0.2)
            with httpx.Client(base_url=srv.url, timeout=30) as c2:
                r = c2.post("/tokenize", json={"prompt": "the dog"})
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                assert "busy preparing 1 requests" in r.json()["error"]["message"]
                assert c2.get("/health").status_code == 200
                assert 'lmstack_requests_rejected_total{reason="busy"} 1.0' in c2.get("/metrics").text
            first.join(10)
            assert c.post("/tokenize", json={"prompt": "the dog"}).status_code == 200  # the slot is free again
    finally:
        tok.encode = encode
        srv.stop()


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.5", False), ("my-box.example", False)])
def test_which_hosts_count_as_loopback(host, loopback):
    from lmstack.serve.engine_bridge import ServerConfig

    cfg = ServerConfig(host=host, api_key="k")
    assert cfg.loopback is loopback and cfg.key_on_everything is (not loopback)
    assert not ServerConfig(host=host).key_on_everything  # no key, nothing to protect with


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_api_key_coverage(model_dir, host):
    """Loopback: the API needs the key, the page and /metrics do not. Non-loopback: all but /health need it."""
    srv = start_server(model_dir, api_key="sk-x", host=host)  # binds loopback either way; host sets the policy
    key = {"Authorization": "Bearer sk-x"}
    open_on_loopback = {("GET", "/"), ("GET", "/metrics")}
    routes = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
              ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
              ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [5]}),
              ("GET", "/tokenizer_info", None), ("GET", "/metrics", None), ("GET", "/", None)]
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            # the OpenAPI schema: open where the page is, gone (404, nothing to read) on a network host
            assert c.get("/openapi.json").status_code == (200 if host == "127.0.0.1" else 404)
            for method, path, body in routes:
                bare = c.request(method, path, json=body)
                if host == "127.0.0.1" and (method, path) in open_on_loopback:
                    assert bare.status_code == 200, (path, bare.text[:200])
                else:
                    assert bare.status_code == 401, (host, path, bare.status_code)
                    assert bare.json()["error"]["code"] == "invalid_api_key"
                    assert c.request(method, path, json=body, headers={"Authorization": "Bearer no"}).status_code == 401
                assert c.request(method, path, json=body, headers=key).status_code == 200, path
    finally:
        srv.stop()


def _poison(monkeypatch):
    """A logits processor that fails any batch holding a row with seed 666 (the poisoned request); the engine
    then fails that request alone (issue 15's per-request failure contract)."""
    from lmstack.infer import logits_processors as lp

    def boom(logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("poisoned processor")
        return logits

    monkeypatch.setitem(lp.PROCESSORS, "poison", boom)


def test_a_request_that_fails_in_the_engine_is_a_500_for_it_alone(server, monkeypatch):
    healthy = {"prompt": "the cat sat", "max_tokens": 24, "ignore_eos": True, "temperature": 0.0}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        lone = c.post("/v1/completions", json=healthy).json()["choices"][0]["text"]
        _poison(monkeypatch)
        poison = {"prompt": "the dog", "max_tokens": 8, "temperature": 0.7, "seed": 666, "top_k": 5}
        out = {}

        def stream_healthy():
            text = []
            with httpx.Client(base_url=server.url, timeout=60) as h:
                with h.stream("POST", "/v1/completions", json={**healthy, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text.append(json.loads(line[6:])["choices"][0]["text"] if
                                        json.loads(line[6:])["choices"] else "")
            out["healthy"] = "".join(text)

        t = threading.Thread(target=stream_healthy)
        t.start()
        bad = c.post("/v1/completions", json=poison)
        bad_chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 8, "seed": 666, "temperature": 0.7, "top_k": 5})
        with c.stream("POST", "/v1/completions", json={**poison, "stream": True}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        t.join(60)
    for r in (bad, bad_chat):
        err = error(r, 500)
        assert err["type"] == "server_error" and err["code"] == "request_failed"
        assert "poisoned processor" in err["message"]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["error"]["type"] == "server_error" and "poisoned processor" in last["error"]["message"]
    assert out["healthy"] == lone  # the healthy stream beside them is untouched
    idle = server.wait_idle()
    assert idle["num_blocks_free"] == idle["num_blocks_total"]
