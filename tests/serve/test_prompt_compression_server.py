"""Prompt compression in the server (issue 16 §1): off by default (the same prompt ids and answer as a server
without it), on per request it shrinks usage.prompt_tokens by about the rate and still streams, the protected
tail (the question) is kept, bad settings are 400s / start-up errors naming the field, and scoring runs off the
event loop (/health answers while a long prompt is compressed).
"""
import json
import threading
import time

import httpx
import pytest
import torch

from serve_helpers import make_text, start_server

from lmstack.errors import LmstackError
from lmstack.serve.prompt_compression import CompressionConfig, Plan, compress_prompt_ids, rewrite_messages

CONTEXT = " ".join(make_text(4, seed=3))  # ~100 tokens of words (the test tokenizer is small)
SYSTEM = " ".join(make_text(2, seed=4))
QUESTION = " Question: where did the dog run?"


def _save_tiny(path, tok, seed: int, max_seq_len: int):
    import lmstack
    from lmstack.model.presets import preset

    torch.manual_seed(seed)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def scorer_dir(model_dir, tmp_path_factory):
    import lmstack

    # max_seq_len 64 < the prompts' length: the scorer works through them in overlapping windows
    return _save_tiny(tmp_path_factory.mktemp("scorer") / "scorer", lmstack.load_tokenizer(model_dir), 5, 64)


@pytest.fixture(scope="module")
def cserver(model_dir, scorer_dir):
    srv = start_server(model_dir, compression=CompressionConfig(model=str(scorer_dir), keep_last_tokens=12))
    yield srv
    srv.stop()


def post(srv, path: str, body: dict) -> httpx.Response:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        return c.post(path, json=body)


def test_off_by_default_the_prompt_and_answer_are_unchanged(server, cserver):
    body = {"prompt": CONTEXT + QUESTION, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "echo": True,
            "logprobs": 0}
    plain, with_scorer = post(server, "/v1/completions", body).json(), post(cserver, "/v1/completions", body).json()
    n = post(server, "/tokenize", {"prompt": CONTEXT + QUESTION}).json()["count"]
    for r in (plain, with_scorer):  # a scorer on the server changes nothing for a request that does not opt in
        assert r["usage"]["prompt_tokens"] == n
        assert "prompt_tokens_before_compression" not in r["usage"]
    assert with_scorer["choices"][0]["logprobs"]["tokens"] == plain["choices"][0]["logprobs"]["tokens"]
    assert with_scorer["choices"][0]["text"] == plain["choices"][0]["text"]
    assert cserver.app.state.lmstack.scorer is not None and server.app.state.lmstack.scorer is None


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_compression_shrinks_prompt_tokens_by_about_the_rate(cserver, rate):
    body = {"prompt": CONTEXT + QUESTION, "max_tokens": 4, "ignore_eos": True,
            "prompt_compression": {"rate": rate, "keep_last_tokens": 12}}
    usage = post(cserver, "/v1/completions", body).json()["usage"]
    n, k = usage["prompt_tokens_before_compression"], 12
    want = rate * (n - k) + k
    assert n > 80 and usage["prompt_tokens"] < n
    # whole words are kept, so the head's budget can be passed by at most about one word
    assert want - 2 <= usage["prompt_tokens"] <= want + 4, (usage, want)
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_compressed_chat_streams_and_reports_both_counts(cserver):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CONTEXT + QUESTION}]
    body = {"messages": messages, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "prompt_compression": {"rate": 0.5}}
    with httpx.Client(base_url=cserver.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                                      json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    usage = chunks[-1]["usage"]
    assert text and usage["completion_tokens"] == 5
    n = usage["prompt_tokens_before_compression"]
    assert n == post(cserver, "/tokenize", {"messages": messages}).json()["count"]
    assert usage["prompt_tokens"] < 0.65 * n  # both messages ~halved; the question and the template stay


def test_the_protected_tail_and_the_template_are_kept(cserver):
    state = cserver.app.state.lmstack
    tok = state.tokenizer
    ids = tok.encode(CONTEXT + QUESTION)
    k = len(tok.encode(QUESTION, add_special_tokens=False))
    out = compress_prompt_ids(state, ids, Plan(rate=0.3, keep_last_tokens=k, unit="word", canonicalize=False))
    assert len(out) < 0.5 * len(ids) and out[-k:] == ids[-k:]
    # through HTTP: the echoed (compressed) prompt still ends with the question
    body = {"prompt": CONTEXT + QUESTION, "max_tokens": 0, "echo": True,
            "prompt_compression": {"rate": 0.3, "keep_last_tokens": k}}
    assert post(cserver, "/v1/completions", body).json()["choices"][0]["text"].endswith(QUESTION)
    # chat: system and user contents shrink, the last user message keeps its question, the assistant's is untouched
    msgs = [{"role": "system", "content": CONTEXT}, {"role": "user", "content": CONTEXT},
            {"role": "assistant", "content": CONTEXT}, {"role": "user", "content": CONTEXT + QUESTION}]
    new = rewrite_messages(state, msgs, Plan(rate=0.4, keep_last_tokens=k, unit="word", canonicalize=False))
    assert [m["role"] for m in new] == [m["role"] for m in msgs]
    assert len(new[0]["content"]) < 0.7 * len(CONTEXT) and len(new[1]["content"]) < 0.7 * len(CONTEXT)
    assert new[2]["content"] == CONTEXT
    assert new[3]["content"].endswith(QUESTION) and len(new[3]["content"]) < len(CONTEXT)
    # the chat template's special tokens are all there, once per message, after compression
    full, _ = tok.apply_chat_template(new, True)
    specials = [t for t in full if t in tok.special_ids]
    assert specials == [t for t in tok.apply_chat_template(msgs, True)[0] if t in tok.special_ids]


def test_canonicalize_alone_needs_no_scorer(server):
    raw = "\u201cthe  cat\u201d \u2014   sat\u00a0on the mat"
    r = post(server, "/v1/completions", {"prompt": raw, "max_tokens": 1, "prompt_compression": {"canonicalize": True}})
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == post(server, "/tokenize", {"prompt": '"the cat" - sat on the mat'}).json()["count"]
    assert usage["prompt_tokens_before_compression"] == post(server, "/tokenize", {"prompt": raw}).json()["count"]


@pytest.mark.parametrize("options, param, words", [
    ({"rate": 0}, "prompt_compression.rate", "greater than 0"),
    ({"rate": 1.5}, "prompt_compression.rate", "less than or equal to 1"),
    ({"keep_last_tokens": -1}, "prompt_compression.keep_last_tokens", "greater than or equal to 0"),
    ({"unit": "char"}, "prompt_compression.unit", "word"),
    ({"rate": 0.5, "ratio": 2}, "prompt_compression.ratio", "Extra inputs"),
])
def test_bad_request_options_are_400_naming_the_field(cserver, options, param, words):
    for path, body in (("/v1/completions", {"prompt": "the cat"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat"}]})):
        r = post(cserver, path, {**body, "max_tokens": 1, "prompt_compression": options})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"]


def test_compression_without_a_scorer_is_400_naming_the_flag(server):
    for path, body in (("/v1/completions", {"prompt": "the cat"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat"}]})):
        r = post(server, path, {**body, "max_tokens": 1, "prompt_compression": {"rate": 0.5}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt_compression.rate" and "--compression.model" in err["message"]


def test_bad_server_settings_fail_at_start_up(model_dir, tmp_path):
    from lmstack.serve.commands import build_app
    from lmstack.serve.engine_bridge import ServerConfig
    from lmstack.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="compression.rate=0.5 needs a scorer"):
        CompressionConfig(rate=0.5)
    with pytest.raises(ValueError, match=r"compression.rate=1.5 .*\(0, 1\]"):
        CompressionConfig(model="x", rate=1.5)
    with pytest.raises(ValueError, match="compression.unit='char'.*word, token"):
        CompressionConfig(model="x", unit="char")
    # a scorer trained with another tokenizer reads other ids: refused when the server starts
    other = train_tokenizer(texts=make_text(seed=9)[:100], type="bpe", vocab_size=280, special_tokens="chat",
                            show_progress=False)
    bad = _save_tiny(tmp_path / "other", other, 1, 64)
    with pytest.raises(LmstackError, match="compression.model .*vocabulary does not match the served tokenizer"):
        build_app(str(model_dir), ServerConfig(compression=CompressionConfig(model=str(bad))))
    with pytest.raises(LmstackError, match="compression.model .*no config.json"):
        build_app(str(model_dir), ServerConfig(compression=CompressionConfig(model=str(tmp_path))))


def test_the_serve_command_line_names_the_bad_compression_flag(capsys):
    from lmstack.cli import main

    assert main(["serve", "--model", "/nonexistent", "--compression.rate", "0.5"]) == 2
    assert "compression.rate=0.5 needs a scorer: give compression.model DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "/nonexistent", "--compression.unit", "char"])
    assert info.value.code == 2
    assert "--compression.unit='char' is not allowed; choose one of word, token" in capsys.readouterr().err


class SlowScorer(torch.nn.Module):
    """The real scorer, 0.5 s slower per forward pass: stands in for a big scorer on a long prompt."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x):
        time.sleep(0.5)
        return self.model(x)


def test_health_answers_while_a_long_prompt_is_compressed(cserver, monkeypatch):
    state = cserver.app.state.lmstack
    monkeypatch.setattr(state, "scorer", SlowScorer(state.scorer))
    body = {"prompt": CONTEXT + QUESTION, "max_tokens": 1, "prompt_compression": {"rate": 0.5}}
    done: dict = {}
    worker = threading.Thread(target=lambda: done.setdefault("r", post(cserver, "/v1/completions", body)))
    times = []
    with httpx.Client(base_url=cserver.url, timeout=30) as c:
        c.get("/health")
        start = time.perf_counter()
        worker.start()
        while worker.is_alive():
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t)
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
    worker.join()
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["prompt_tokens_before_compression"] > 80
    assert elapsed > 1.0 and len(times) >= 10  # several windows of 0.5 s: the probes ran during the scoring
    assert max(times) < 0.25, f"/health took {max(times) * 1000:.0f} ms while a prompt was compressed"
