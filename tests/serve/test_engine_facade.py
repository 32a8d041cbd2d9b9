"""The server reaches the engine only through AsyncLLMEngine's public facade, and prepares each request once.

- A scan of src/lmstack/serve: no `aengine.engine`, no engine internals (`._task`, `.scheduler`, `.bm`,
  `.runner`, `.make_request`, ...), and where serve/ holds an LLMEngine itself (the terminal chat), only
  its public API after `.engine.`.
- A scan of the engine's collaborators in src/lmstack/infer: none takes or keeps the engine.
- A streamed completion with two prompts and a chat completion build their engine requests exactly once
  each (today's server built a stream's request twice: once to validate, once to run).
"""
import ast
import json
from pathlib import Path

import httpx
import pytest

from serve_helpers import start_server

SRC = Path(__file__).resolve().parents[2] / "src" / "lmstack"

# What serve/ may call on an LLMEngine it holds (the terminal chat): the engine's public API.
ENGINE_PUBLIC = {"add_request", "step", "abort_request", "has_unfinished_requests", "stats", "run_to_completion",
                 "tokenizer", "generation_defaults"}
# Engine internals: never read from serve/, whatever object they hang off.
INTERNALS = {"_task", "_queues", "_pending_add", "_pending_abort", "scheduler", "bm", "runner", "make_request",
             "add_prepared", "emit_vocab", "sampler", "builder"}
# The engine's collaborators: each gets what it needs (sampler, scheduler, context), never the engine.
COLLABORATORS = ("beam_search", "context", "loading", "output_processor", "postprocess", "request_builder", "sampler",
                 "scheduler", "speculative", "step_plan", "block_manager", "detokenizer", "logits_processors")


def _attribute_uses(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node


def test_serve_uses_only_the_engine_facade():
    bad = []
    for path in sorted((SRC / "serve").rglob("*.py")):
        for node in _attribute_uses(path):
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
            owner = node.value
            if node.attr in INTERNALS:
                bad.append(f"{where}: .{node.attr}")
            elif node.attr == "engine" and (isinstance(owner, ast.Name) and owner.id == "aengine" or
                                            isinstance(owner, ast.Attribute) and owner.attr == "aengine"):
                bad.append(f"{where}: aengine.engine (use AsyncLLMEngine's public properties)")
            elif isinstance(owner, ast.Attribute) and owner.attr == "engine" and node.attr not in ENGINE_PUBLIC:
                bad.append(f"{where}: .engine.{node.attr}")
    assert not bad, "serve/ reaches into the engine:\n" + "\n".join(bad)


def test_the_engines_collaborators_hold_no_engine():
    bad = []
    for name in COLLABORATORS:
        path = SRC / "infer" / f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.arg in ("engine", "eng"):
                bad.append(f"{name}.py:{node.lineno}: parameter {node.arg}")
            elif isinstance(node, ast.Attribute) and node.attr == "engine":
                bad.append(f"{name}.py:{node.lineno}: .engine")
            elif isinstance(node, ast.ImportFrom) and node.module in ("lmstack.infer.engine",
                                                                       "lmstack.infer.async_engine"):
                bad.append(f"{name}.py:{node.lineno}: imports {node.module}")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def counting_server(model_dir):
    srv = start_server(model_dir)
    builder = srv.aengine.engine.builder
    made = []
    real = builder.make

    def make(request_id, *a, **kw):
        made.append(request_id)
        return real(request_id, *a, **kw)

    builder.make = make
    yield srv, made
    srv.stop()


def _events(response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_a_streamed_completion_prepares_each_engine_request_once(counting_server):
    srv, made = counting_server
    made.clear()
    body = {"prompt": ["the cat", "a dog sat"], "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=srv.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = _events(r)
    assert len(made) == 2 and len(set(made)) == 2 and all(m.startswith("cmpl-") for m in made)
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert {ch["index"] for e in events for ch in e["choices"]} == {0, 1}


def test_a_chat_completion_prepares_its_engine_request_once(counting_server):
    srv, made = counting_server
    for stream in (False, True):
        made.clear()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": stream}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert len(made) == 1 and made[0].startswith("chatcmpl-")


def test_a_bad_grammar_is_a_400_before_the_stream_starts(counting_server):
    srv, _ = counting_server
    body = {"prompt": "the cat", "max_tokens": 4, "stream": True, "guided_regex": "([a-z]"}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text


def test_the_facade_reports_what_the_server_needs(counting_server):
    srv, _ = counting_server
    a = srv.aengine
    assert a.max_model_len == 256 and a.max_num_seqs == 8 and a.vocab_size == a.tokenizer.vocab_size
    assert a.adapters == [] and a.loop_error is None and a.model_dtype is not None
    assert set(a.stats()) >= {"running", "waiting", "num_blocks_free"}
