"""The official `openai` client against a live lmstack server on loopback, checked against the engine itself."""
import pytest
import torch

openai = pytest.importorskip("openai")

import lmstack  # noqa: E402
from lmstack.infer import LLM, SamplingParams  # noqa: E402

PROMPT = "the cat sat on a mat and"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_num_seqs=4)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama"]


def test_greedy_completion_equals_the_engine(client, llm):
    resp = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]
    choice = resp.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_token_id_prompts_and_prompt_lists(client, llm, model_dir):
    tok = lmstack.load_tokenizer(model_dir)
    ids_a, ids_b = tok.encode("hello world"), tok.encode("one two three")
    resp = client.completions.create(model="tiny-llama", prompt=[ids_a, ids_b], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    refs = llm.generate([ids_a, ids_b], SamplingParams(max_tokens=6, temperature=0.0))
    # greedy: both samples of a prompt are the engine's greedy text
    assert [c.text for c in resp.choices] == [refs[0].outputs[0].text] * 2 + [refs[1].outputs[0].text] * 2
    assert resp.usage.prompt_tokens == len(ids_a) + len(ids_b)
    single = client.completions.create(model="tiny-llama", prompt=ids_a, max_tokens=6, temperature=0)
    assert single.choices[0].text == refs[0].outputs[0].text


def test_echo_logprobs_match_the_model(client, model_dir):
    """echo + logprobs + max_tokens=0 scores the prompt: each token's logprob is the model's log-softmax."""
    tok = lmstack.load_tokenizer(model_dir)
    ids = tok.encode("the dog ran to the park")
    resp = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                     temperature=0)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == tok.decode(ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    model = lmstack.load_model(model_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).log_softmax(-1)[0]
    expected = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for p in range(1, len(ids)):
        # the top entry is the argmax; the token itself is always listed (lm-eval's is_greedy check)
        assert max(lp.top_logprobs[p].values()) == pytest.approx(float(ref[p - 1].max()), abs=1e-4)
        assert lp.top_logprobs[p][lp.tokens[p]] == pytest.approx(lp.token_logprobs[p], abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_generated_logprobs_shape(client):
    resp = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, logprobs=2, temperature=0)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and value <= 0
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_chat_completion_and_template(client, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    resp = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    ref = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.outputs[0].text
    ids, _ = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(ids)


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "one two three"}]
    full = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, roles, finish, usage = [], [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completion_streaming_matches_non_streaming(client):
    full = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"continuous_usage_stats": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    counts = [c.usage.completion_tokens for c in chunks]  # running token count in every chunk
    assert counts == sorted(counts) and counts[-1] == full.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_samples_with_seed_are_reproducible(client):
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # three different samples of a random model
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_n_samples_stream_per_choice(client):
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=1.0, n=2, seed=7, stream=True)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finished  # each choice finishes exactly once
                finished.add(c.index)
    assert finished == {0, 1}
    full = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=1.0, n=2, seed=7)
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0)
    text = base.choices[0].text
    assert len(text) >= 8
    stop = text[4:6]
    cut = text.find(stop)
    resp = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].text == text[:cut]
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == text[:cut]  # the stop string never leaks into the stream


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy = top-1
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_tokenize_detokenize_roundtrip(http, model_dir):
    tok = lmstack.load_tokenizer(model_dir)
    r = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("hello world")
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 256
    back = http.post("/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.json() == {"prompt": "hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["tokens"] == tok.apply_chat_template([{"role": "user", "content": "hi"}], True)[0]
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["model_max_length"] == 256


def test_health_and_web_page(http):
    assert http.get("/health").json()["status"] == "ok"
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '"tiny-llama"' in page.text and "/v1/chat/completions" in page.text


def test_response_format_json_schema_and_regex(client, http):
    import json
    import re

    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["age", "ok"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=120, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
    value = json.loads(resp.choices[0].message.content)
    assert set(value) == {"age", "ok"} and isinstance(value["age"], int) and isinstance(value["ok"], bool)
    resp = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=12, seed=5,
        extra_body={"response_format": {"type": "regex", "regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", resp.choices[0].message.content)
    resp = client.completions.create(model="tiny-llama", prompt="pick", max_tokens=8,
                                     extra_body={"guided_choice": ["yes", "no"]})
    assert resp.choices[0].text in ("yes", "no")
    # a broken grammar is a 400 before any stream starts
    r = http.post("/v1/completions", json={"prompt": "x", "guided_regex": "[0-9", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex"


def test_prompt_logprobs_without_echo(http):
    r = http.post("/v1/completions", json={"prompt": [5, 9, 12, 40], "max_tokens": 1, "prompt_logprobs": 2}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert r["choices"][0]["logprobs"] is None and len(plp) == 4 and plp[0] is None
    assert all(2 <= len(entry) <= 3 and max(entry.values()) <= 0 for entry in plp[1:])
