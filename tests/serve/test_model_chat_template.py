"""A transformers-made Llama directory with the Llama-3 template: every chat caller (server, LLM.chat, lmstack
generate --chat, lmstack chat, SFT masks) renders the model's own template, generation stops on
generation_config.json's eos list and the template's <|eot_id|>, and bad templates are one clear error."""
import json
from pathlib import Path

import httpx
import pytest

import hf_tiny
import lmstack
from lmstack.cli import main
from lmstack.errors import LmstackError
from serve_helpers import start_server

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def _llama_dir(path: Path, template: str | None = None):
    """A transformers Llama directory with the Llama-3 tokens; `template` replaces the published Llama-3 one."""
    return hf_tiny.build_dir(path, "llama", style="llama3", template=template)[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama3")
    return d, _llama_dir(d)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_broken")
    _llama_dir(d, "{{ raise_exception('this model only takes user turns') }}")
    return d


def test_stop_set_and_llm_chat_use_the_models_template(llama):
    d, hf = llama
    eot, eos = hf.convert_tokens_to_ids("<|eot_id|>"), hf.eos_token_id
    llm = lmstack.LLM(str(d), max_model_len=128, device="cpu")
    assert {eot, eos} <= llm.engine.eos_ids
    want = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    want = want if isinstance(want, list) else want["input_ids"]
    # <|eot_id|> forced as the first token: the reply ends at once, on the template's end of turn
    params = lmstack.SamplingParams(max_tokens=8, temperature=0.0, logit_bias={eot: 100.0})
    out = llm.chat(CHAT, params)[0]
    assert out.prompt_token_ids == want
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) <= 1
    free = llm.chat(CHAT, lmstack.SamplingParams(max_tokens=6, temperature=0.0, logit_bias={eot: -100.0,
                                                                                           eos: -100.0}))[0]
    assert len(free.outputs[0].token_ids) == 6  # without the bias it runs to max_tokens


def test_server_renders_the_models_template(llama):
    d, hf = llama
    srv = start_server(d, engine={"max_model_len": 128})
    try:
        with httpx.Client(base_url=srv.url, timeout=30.0) as http:
            got = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
            want = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
            assert got == (want if isinstance(want, list) else want["input_ids"])
            r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(got)
    finally:
        srv.stop()


def test_sft_masks_come_from_the_template(llama):
    from lmstack.adapt.sft import encode_rows

    d, hf = llama
    tok = lmstack.load_tokenizer(d)
    rows = [{"messages": CHAT + [{"role": "assistant", "content": "hi!"}]}]
    (ex,), _ = encode_rows(tok, rows, max_len=256)
    learned = "".join(tok.decode([i]) for i, m in zip(ex.ids, ex.mask) if m)
    assert learned == "hi!<|eot_id|>"


def test_bad_template_is_one_clear_error_in_python_server_and_cli(broken, capsys):
    tok = lmstack.load_tokenizer(broken)
    where = f"{broken / 'chat_template.jinja'}"
    with pytest.raises(LmstackError, match="this model only takes user turns"):
        tok.apply_chat_template(CHAT, add_generation_prompt=True)
    srv = start_server(broken, engine={"max_model_len": 128})
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400
        assert where in r.json()["error"]["message"] and "only takes user turns" in r.json()["error"]["message"]
    finally:
        srv.stop()
    capsys.readouterr()
    rc = main(["generate", "--model", str(broken), "--prompt", "hi", "--chat", "--max_tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("lmstack: error:") and where in lines[-1] and "only takes user turns" in lines[-1]


def test_each_bad_template_is_one_cli_error_line_naming_file_and_field(broken, capsys):
    cfg_file = broken / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    jinja = broken / "chat_template.jinja"
    cases = [
        ("{{ raise_exception('no system turns') }}", None, f"{jinja}", "raised: no system turns"),
        ("{{ messages[0].content }}{{ greeting.upper() }}", None, f"{jinja}",
         "undefined value: 'greeting' is undefined"),
        (None, {"rag": "x", "tool_use": "y"}, f"{cfg_file}:chat_template", "none is called 'default'"),
    ]
    try:
        for jinja_text, cfg_template, where, message in cases:
            if jinja_text is not None:
                jinja.write_text(jinja_text)
            else:
                jinja.unlink()
                cfg_file.write_text(json.dumps({**cfg, "chat_template": cfg_template}))
            capsys.readouterr()
            rc = main(["generate", "--model", str(broken), "--prompt", "hi", "--chat", "--max_tokens", "2"])
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "shards" not in ln]
            assert rc == 2 and len(err) == 1, err
            assert err[0].startswith("lmstack: error:") and where in err[0] and message in err[0], err
    finally:
        jinja.write_text("{{ raise_exception('this model only takes user turns') }}")
        cfg_file.write_text(json.dumps(cfg))


def test_lmstack_chat_renders_the_models_template(llama):
    from lmstack.serve.terminal_chat import LocalBackend, run_chat

    d, hf = llama
    lines = iter(["hello there", "and again"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    backend = LocalBackend(str(d), device="cpu", max_model_len=128)
    seen = []
    add = backend.engine.add_request
    backend.engine.add_request = lambda rid, ids, *a, **k: (seen.append(list(ids)), add(rid, ids, *a, **k))[1]
    history = run_chat(backend, {"temperature": 0.0, "max_tokens": 4}, read=read, write=lambda s: None)
    assert len(seen) == 2 and len(history) == 4
    want = hf.apply_chat_template(history[:3], tokenize=True, add_generation_prompt=True)
    assert seen[1] == (want if isinstance(want, list) else want["input_ids"])


def test_eval_chat_mode_renders_the_models_template(llama):
    from lmstack.eval.local_lm import LocalLM

    d, hf = llama
    lm = LocalLM(d, device="cpu", chat_template=True)
    msgs = [{"role": "user", "content": "Question: 2 + 2?"}]
    text = lm.render_chat(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert lm.encode(text) == (want if isinstance(want, list) else want["input_ids"])  # one BOS, not two


def test_server_passes_chat_template_kwargs(tmp_path):
    tpl = ("{% if enable_thinking is defined and not enable_thinking %}<|eot_id|>{% endif %}"
           "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _llama_dir(tmp_path, tpl)
    srv = start_server(tmp_path, engine={"max_model_len": 128})
    try:
        with httpx.Client(base_url=srv.url, timeout=30.0) as http:
            plain = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
            off = http.post("/tokenize", json={"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
            assert off.json()["tokens"] == [4] + plain  # <|eot_id|> is id 4 (the fifth special token)
            r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
            assert r.json()["usage"]["prompt_tokens"] == len(plain) + 1
            bad = http.post("/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": {"tools": []}})
            assert bad.status_code == 400 and "chat_template_kwargs may not set tools" in bad.json()["error"]["message"]
    finally:
        srv.stop()
