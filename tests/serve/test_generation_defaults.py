"""generation_config.json sampling defaults (infer/generation_defaults.py) in LLM.generate, `lmstack generate`,
both server endpoints and `lmstack chat`; whatever the call, request or flag gives wins."""
import io
import json

import httpx
import pytest

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.commands import generate
from lmstack.infer.generation_defaults import defaults_from_dict, load_generation_defaults, merge_sampling
from lmstack.serve.terminal_chat import chat

from serve_helpers import start_server

GEN = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 50}


@pytest.fixture(scope="module")
def gen_dir(model_dir, tmp_path_factory):
    """The session's tiny model with a generation_config.json saying greedy, 3 new tokens."""
    import shutil

    path = tmp_path_factory.mktemp("gen") / "tiny-llama"
    shutil.copytree(model_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None, **GEN}))
    return path


@pytest.fixture(scope="module")
def llm(gen_dir):
    return LLM(str(gen_dir))


def test_fields_map_to_sampling_params(tmp_path):
    assert defaults_from_dict({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
                               "max_new_tokens": 7, "do_sample": True, "eos_token_id": [1, 2]}) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 7}
    # do_sample false is transformers' greedy search: the sampling knobs are moot
    assert defaults_from_dict({"do_sample": False, "temperature": 0.6, "top_p": 0.9}) == {"temperature": 0.0}
    assert load_generation_defaults(tmp_path) == {}          # no file: no defaults
    assert merge_sampling({"temperature": 0.0, "max_tokens": 3}, {"temperature": None, "max_tokens": 9}) == {
        "temperature": 0.0, "max_tokens": 9}


@pytest.mark.parametrize("bad, field", [({"temperature": "hot"}, "temperature"), ({"top_p": 2.0}, "top_p"),
                                        ({"do_sample": "yes"}, "do_sample"), ({"max_new_tokens": 2.5}, "max_new")])
def test_bad_values_name_the_file_and_field(tmp_path, bad, field):
    (tmp_path / "generation_config.json").write_text(json.dumps(bad))
    with pytest.raises(LmstackError, match=f"generation_config.json.*{field}"):
        load_generation_defaults(tmp_path)


def test_llm_generate_uses_the_defaults_and_params_win(llm):
    assert llm.get_default_sampling_params().max_tokens == 3
    default = llm.generate(["the cat sat"])[0].outputs[0]
    greedy3 = llm.generate(["the cat sat"], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert default.token_ids == greedy3.token_ids and len(default.token_ids) == 3
    longer = llm.generate(["the cat sat"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(longer[0].outputs[0].token_ids) == 6


def test_generate_command_defaults_and_flags(gen_dir, llm, capsys):
    [rec] = generate(str(gen_dir), prompt="the dog ran", json_output=True)
    ref = llm.generate(["the dog ran"], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert rec["completions"][0]["token_ids"] == ref.token_ids
    [rec] = generate(str(gen_dir), prompt="the dog ran", max_tokens=5, ignore_eos=True, json_output=True)
    assert len(rec["completions"][0]["token_ids"]) == 5                     # the flag wins
    sampled = [generate(str(gen_dir), prompt="the dog ran", temperature=5.0, seed=s, max_tokens=3, ignore_eos=True,
                        json_output=True)[0]["completions"][0]["token_ids"] for s in range(6)]
    assert any(s != sampled[0] for s in sampled)                             # --temperature beat the file's 0


def test_both_server_endpoints_use_the_defaults_and_requests_win(gen_dir, llm):
    srv = start_server(gen_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=60.0) as http:
            ref = llm.generate(["the cat"], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
            r = http.post("/v1/completions", json={"prompt": "the cat"}).json()
            assert r["usage"]["completion_tokens"] == len(ref.token_ids) == 3
            assert r["choices"][0]["text"] == ref.text
            r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 7, "ignore_eos": True}).json()
            assert r["usage"]["completion_tokens"] == 7
            texts = {http.post("/v1/completions", json={"prompt": "the cat", "temperature": 5.0, "seed": s,
                                                        "ignore_eos": True}).json()["choices"][0]["text"]
                     for s in range(6)}
            assert len(texts) > 1                                            # the request's temperature wins

            msgs = [{"role": "user", "content": "hello"}]
            ref = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
            r = http.post("/v1/chat/completions", json={"messages": msgs}).json()
            assert r["usage"]["completion_tokens"] == len(ref.token_ids) == 3
            assert r["choices"][0]["message"]["content"] == ref.text
            r = http.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 6,
                                                         "ignore_eos": True}).json()
            assert r["usage"]["completion_tokens"] == 6
    finally:
        srv.stop()


def test_chat_command_uses_the_defaults_and_flags_win(gen_dir, llm, monkeypatch, capsys):
    msgs = [{"role": "user", "content": "the cat sat"}]
    ref3 = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0].text
    ref8 = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].text
    assert ref3 and ref8 != ref3
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))         # `lmstack chat`, scripted on stdin
    chat(model=str(gen_dir), device="cpu", threads=1)
    assert f"model> {ref3}\n" in capsys.readouterr().out                    # greedy, 3 tokens: the file's
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    chat(model=str(gen_dir), device="cpu", threads=1, max_tokens=8)
    assert f"model> {ref8}\n" in capsys.readouterr().out                    # the flag wins
