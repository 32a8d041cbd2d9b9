"""`lmstack chat` (local engine and remote server backends), `lmstack serve` routing, and LoRA adapters by name."""
import httpx
import pytest

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer import LLM, AsyncLLMEngine, SamplingParams
from lmstack.serve.terminal_chat import LocalBackend, RemoteBackend, chat, run_chat

from serve_helpers import LiveServer

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def replies(transcript: str) -> list[str]:
    return [line[len("model> "):] for line in transcript.split("\n") if line.startswith("model> ")]


def test_local_chat_streams_greedy_replies_and_keeps_history(model_dir):
    out = []
    backend = LocalBackend(str(model_dir), device="cpu")
    history = run_chat(backend, GREEDY, read=scripted(["hello", "/system be brief", "and again", "/reset", "hi"]),
                       write=out.append)
    transcript = "".join(out)
    assert "(system prompt set)" in transcript and "(conversation cleared)" in transcript
    assert history[0] == {"role": "user", "content": "hi"} and len(history) == 2  # /reset forgot the first turns
    llm = LLM(str(model_dir))
    first = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(**GREEDY))[0].outputs[0].text
    second = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": first}, {"role": "user", "content": "and again"}],
                      SamplingParams(**GREEDY))[0].outputs[0].text
    got = replies(transcript)
    assert got[:2] == [first, second] and len(got) == 3
    assert backend.engine.stats()["num_blocks_free"] == backend.engine.stats()["num_blocks_total"]


def test_remote_chat_matches_local(server, model_dir):
    out = []
    run_chat(RemoteBackend(server.url), GREEDY, read=scripted(["hello"]), write=out.append)
    llm = LLM(str(model_dir))
    ref = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(**GREEDY))[0].outputs[0].text
    assert replies("".join(out)) == [ref]


def test_remote_chat_reports_server_errors(server):
    with pytest.raises(LmstackError, match="404"):
        list(RemoteBackend(server.url, model="no-such-adapter").stream([{"role": "user", "content": "x"}], GREEDY))
    out = []  # a turn too long for the context is reported, dropped, and the chat goes on
    history = run_chat(RemoteBackend(server.url), GREEDY, read=scripted(["the cat " * 300, "hi"]), write=out.append)
    assert "[error: server answered 413" in "".join(out)
    assert [m["content"] for m in history if m["role"] == "user"] == ["hi"]


def test_chat_and_serve_arguments(model_dir, tmp_path):
    with pytest.raises(LmstackError, match="exactly one"):
        chat()
    with pytest.raises(LmstackError, match="exactly one"):
        chat(model=str(model_dir), url="http://127.0.0.1:1")
    with pytest.raises(LmstackError, match="config.json"):
        chat(model=str(tmp_path))
    from lmstack.runtime.device import pick_device
    from lmstack.serve.commands import build_app, parse_adapters
    from lmstack.serve.engine_bridge import ServerConfig

    with pytest.raises(LmstackError, match="config.json"):
        build_app(str(tmp_path), ServerConfig())
    with pytest.raises(LmstackError, match="NAME=PATH"):
        parse_adapters(["oops"])
    with pytest.raises(LmstackError, match="dtype"):
        pick_device("cpu", "fp8")
    assert str(pick_device("cpu", "auto")[1]) == "torch.float32"


def test_cli_routes_serve_and_chat(capsys):
    from lmstack.cli import main, run

    for stage, flag in (("serve", "--api_key"), ("chat", "--adapter")):
        with pytest.raises(SystemExit) as info:
            run([stage, "--help"])
        assert info.value.code == 0
        assert flag in capsys.readouterr().out
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_lora_adapters_are_served_by_name(model_dir):
    """A request naming an adapter gets the adapted model; other requests in the same server get the base."""
    from lmstack.infer.lora_hook import LinearLoRA
    from lmstack.serve import ServerConfig, create_app

    tok = lmstack.load_tokenizer(model_dir)
    model = lmstack.load_model(model_dir)
    adapter = LinearLoRA.random(model, rank=4, std=0.5, targets=("q_proj", "v_proj", "down_proj"), seed=1)
    aengine = AsyncLLMEngine(model, tokenizer=tok, lora_adapters={"math": adapter}, max_num_seqs=4)
    srv = LiveServer(create_app(aengine, ServerConfig(model_name="tiny-llama")), aengine).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert models == ["tiny-llama", "math"]
            body = {"prompt": "the cat sat on", "max_tokens": 10, "temperature": 0}
            base = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            tuned = http.post("/v1/completions", json={**body, "model": "math"}).json()["choices"][0]["text"]
    finally:
        srv.stop()
    ref_model = lmstack.load_model(model_dir)
    ref_adapter = LinearLoRA({k: (a.clone(), b.clone()) for k, (a, b) in adapter.weights.items()}, adapter.scale)
    llm = LLM(ref_model, tokenizer=tok, lora_adapters={"math": ref_adapter})
    params = SamplingParams(max_tokens=10, temperature=0.0)
    assert tuned == llm.generate(["the cat sat on"], params, lora="math")[0].outputs[0].text
    assert base == llm.generate(["the cat sat on"], params)[0].outputs[0].text
    assert tuned != base
