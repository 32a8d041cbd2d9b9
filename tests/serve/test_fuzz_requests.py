"""hypothesis fuzzing (issue 15 §6): SamplingParams in-process, and request bodies against the live server.

(a) Any SamplingParams that is accepted (and that the engine's make_request accepts) samples finitely: a few
    engine steps raise nothing, fail no sequence, emit only ids inside the vocabulary, and a healthy greedy
    neighbour in the same batch keeps its lone-run tokens. Whatever is rejected is rejected with LmstackError.
(b) Request bodies, valid and not, sent raw to /v1/completions and /v1/chat/completions: every answer is
    a 4xx JSON error in OpenAI's shape or a correct 200, never a 5xx, and the engine counts no failed step.

Usage:
    pytest -q tests/serve/test_fuzz_requests.py
"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_bad_input_matrix import Case, _check_error_shape, _check_ok

EDGE_FLOATS = [0.0, 1e-40, 5e-324, 1e-300, -1e-40, -1.0, 0.5, 1.0, 2.0, 100.0, 1e300, 2.0**64,
               float("inf"), float("-inf"), float("nan")]
EDGE_INTS = [0, 1, 2, 3, 64, 65, 2**31, 2**63, 2**64, -1, -(2**64)]


def floats(lo: float = -2.0, hi: float = 2.0):
    """Mostly in [lo, hi] (so whole combinations get accepted and run), sometimes an edge value or junk."""
    return st.one_of(st.floats(lo, hi), st.floats(lo, hi), st.sampled_from(EDGE_FLOATS),
                     st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(),
                     st.just("0.5"))


def ints(lo: int = -2, hi: int = 8):
    return st.one_of(st.integers(max(lo, 0), hi), st.integers(max(lo, 0), hi), st.integers(lo, hi),
                     st.sampled_from(EDGE_INTS), st.booleans(), st.just(1.5))


def token_ids(vocab: int):
    return st.lists(st.one_of(st.integers(0, vocab - 1), st.integers(0, vocab - 1),
                              st.sampled_from([vocab, 99999, 2**31, 2**64, -1])), max_size=4)


WORDS = st.sampled_from(["the", "cat", " sat", "a", "mat", "!", "\u00e9", "zz", "\ud800", "", "the cat"])


def sampling_kwargs(vocab: int):
    return st.fixed_dictionaries({}, optional={
        "temperature": floats(0.0, 2.0), "top_p": floats(0.01, 1.0), "min_p": floats(0.0, 1.0),
        "top_k": ints(-2, 400), "repetition_penalty": floats(0.01, 3.0), "frequency_penalty": floats(),
        "presence_penalty": floats(), "length_penalty": floats(),
        "logit_bias": st.dictionaries(st.one_of(st.integers(0, vocab - 1), st.integers(-1, vocab + 2),
                                                st.just(2**64), st.just("x")), floats(-100, 100), max_size=3),
        "stop_token_ids": token_ids(vocab),
        "bad_words": st.lists(WORDS, max_size=3), "stop": st.lists(WORDS, max_size=3),
        "max_tokens": st.one_of(st.integers(0, 4), st.sampled_from([None, 2**64, -1])),
        "min_tokens": ints(0, 4), "n": ints(1, 4), "best_of": st.one_of(st.none(), ints(1, 4)), "seed": ints(),
        "logprobs": st.one_of(st.none(), ints(-1, 21)), "prompt_logprobs": st.one_of(st.none(), ints(-1, 21)),
        "use_beam_search": st.booleans(), "beam_width": ints(0, 64), "ignore_eos": st.booleans(),
    })


@pytest.fixture(scope="module")
def engine(model_dir):
    from lmstack.infer import LLMEngine

    return LLMEngine(str(model_dir), max_num_seqs=8)


def _run(engine, request_id: str, steps: int) -> dict:
    """Step the engine at most `steps` times; the last output of every request seen, by id."""
    last = {}
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            last[out.request_id] = out
    return last


def test_fuzz_sampling_params_in_process(engine, one_thread):
    from lmstack.errors import LmstackError
    from lmstack.infer import SamplingParams

    vocab = engine.emit_vocab
    neighbour = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    engine.add_request("lone", prompt, neighbour)
    lone = _run(engine, "lone", 20)["lone"].outputs[0].token_ids
    assert len(lone) == 6
    seen = {"accepted": 0, "rejected": 0}

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kw=sampling_kwargs(vocab), prompt_kind=st.sampled_from(["ids", "text"]))
    def check(kw, prompt_kind):
        try:
            params = SamplingParams(**kw)
        except LmstackError:
            seen["rejected"] += 1
            return
        prompt_in = {"ids": prompt, "text": "the cat sat"}[prompt_kind]
        try:
            engine.add_request("fuzz", prompt_in, params)
        except LmstackError:
            seen["rejected"] += 1
            return
        seen["accepted"] += 1
        engine.add_request("healthy", prompt, neighbour)
        try:
            last = _run(engine, "fuzz", 7)
        finally:
            for rid in ("fuzz", "healthy"):
                engine.abort_request(rid)
        out = last.get("fuzz")
        for c in out.outputs if out is not None else []:
            assert c.finish_reason in (None, "stop", "length"), (kw, c.finish_reason, getattr(out, "error", None))
            assert all(0 <= t < vocab for t in c.token_ids), (kw, c.token_ids)
        healthy = last["healthy"].outputs[0]
        assert healthy.token_ids == lone, kw
        stats = engine.stats()
        assert stats["num_blocks_free"] == stats["num_blocks_total"], (kw, stats)

    check()
    # the strategy reaches both sides of the validation
    assert seen["accepted"] >= 30 and seen["rejected"] >= 30, seen


# ---------------------------------------------------------------------------------------------- live server
JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                max_size=3),
                    max_leaves=8)


def some(valid):
    """Mostly a plausible value, sometimes an edge value or any JSON at all."""
    return st.one_of(valid, valid, st.sampled_from(EDGE_INTS + EDGE_FLOATS + ["\ud800", "", "nan"]), JUNK)


MESSAGE = st.fixed_dictionaries({"role": some(st.sampled_from(["user", "system", "assistant", "robot"])),
                                 "content": some(st.text(max_size=20))})
COMMON = {
    "temperature": some(st.floats(0, 2)), "top_p": some(st.floats(0, 1)), "top_k": some(st.integers(-1, 50)),
    "min_p": some(st.floats(0, 1)), "repetition_penalty": some(st.floats(0, 3)),
    "presence_penalty": some(st.floats(-2, 2)), "frequency_penalty": some(st.floats(-2, 2)),
    "n": some(st.integers(1, 3)), "seed": some(st.integers(0, 100)), "stop": some(st.lists(WORDS, max_size=2)),
    "stop_token_ids": some(st.lists(st.integers(-1, 400), max_size=3)), "min_tokens": some(st.integers(0, 3)),
    "bad_words": some(st.lists(WORDS, max_size=2)), "stream": some(st.booleans()),
    "logit_bias": some(st.dictionaries(st.integers(-1, 400).map(str), st.floats(-100, 100), max_size=2)),
    "use_beam_search": some(st.booleans()), "beam_width": some(st.integers(1, 8)),
    "ignore_eos": some(st.booleans()), "model": some(st.just("tiny-llama")),
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": some(st.one_of(st.text(max_size=30), st.lists(st.integers(-1, 400), max_size=5),
                              st.lists(st.text(max_size=8), max_size=3)))},
    optional={**COMMON, "max_tokens": st.one_of(st.integers(-1, 6), st.just(2**64), JUNK),
              "echo": some(st.booleans()), "logprobs": some(st.integers(0, 5)), "best_of": some(st.integers(1, 3))})
CHAT = st.fixed_dictionaries(
    {"messages": some(st.lists(MESSAGE, max_size=3))},
    optional={**COMMON, "max_tokens": st.one_of(st.integers(-1, 6), st.just(2**64), JUNK),
              "logprobs": some(st.booleans()), "top_logprobs": some(st.integers(0, 5))})


def test_fuzz_request_bodies_against_the_live_server(server):
    errors_before = server.aengine.errors
    statuses: dict[int, int] = {}

    with httpx.Client(base_url=server.url, timeout=60) as client:
        @settings(max_examples=80, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
        def check(route, data):
            body = data.draw(COMPLETION if route == "/v1/completions" else CHAT)
            if isinstance(body.get("max_tokens"), int) and 6 < body["max_tokens"] < 2**63:
                body["max_tokens"] = 6  # keep every generation short; huge values still go through as 2**64
            body.setdefault("max_tokens", 4)
            raw = json.dumps(body).encode()  # ensure_ascii keeps lone surrogates as escapes
            r = client.post(route, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.status_code, r.text[:200], raw[:300])
            if r.status_code == 200:
                problem = _check_ok(Case("fuzz", route), r)
            else:
                assert 400 <= r.status_code < 500, r.status_code
                problem = _check_error_shape(r)
            assert problem is None, (problem, raw[:300])
            assert client.get("/health").status_code == 200

        check()
    assert server.aengine.errors == errors_before, "an engine step failed during the fuzz"
    assert statuses.get(200, 0) >= 3 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 20, statuses
    idle = server.wait_idle()
    assert idle["num_blocks_free"] == idle["num_blocks_total"]
