"""hypothesis fuzzing (issue 15 §6): SamplingParams in-process, and request bodies against the live server.

(a) Valid SamplingParams keywords with 0-2 fields pushed to an edge value (1e-40, 2**64, NaN, ids past the
    vocabulary, lone surrogates, ...). Any combination that is accepted (and that the engine's make_request
    accepts) samples finitely: a few engine steps raise nothing, fail no sequence, emit only ids inside the
    vocabulary, and a healthy greedy neighbour in the same batch keeps its lone-run tokens. Whatever is
    rejected is rejected with LmstackError.
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


WORDS = st.sampled_from(["the", "cat", " sat", "a", "mat", "!", "\u00e9", "zz", "the cat"])
BAD_WORDS = st.sampled_from(["\ud800", "", "a\udfff", "x" * 5000])


def valid_kwargs(vocab: int):
    """SamplingParams keywords with values in range (a combination may still be invalid: min_tokens above
    max_tokens, n above beam_width, ...)."""
    ids = st.integers(0, vocab - 1)
    return st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "min_p": st.floats(0, 0.5),
        "top_k": st.integers(-1, 50), "repetition_penalty": st.floats(0.5, 2),
        "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
        "length_penalty": st.floats(-2, 2), "logit_bias": st.dictionaries(ids, st.floats(-100, 100), max_size=3),
        "stop_token_ids": st.lists(ids, max_size=3), "bad_words": st.lists(WORDS, max_size=3),
        "stop": st.lists(WORDS, max_size=3), "max_tokens": st.integers(1, 4), "min_tokens": st.integers(0, 2),
        "n": st.integers(1, 3), "best_of": st.integers(1, 4), "seed": st.integers(0, 1000),
        "logprobs": st.integers(0, 5), "prompt_logprobs": st.integers(0, 5), "use_beam_search": st.booleans(),
        "beam_width": st.integers(1, 8), "ignore_eos": st.booleans(),
    })


def edge_values(vocab: int) -> dict:
    """Per field: values at and past the edges (tiny, huge, non-finite, ids past the vocabulary, junk)."""
    floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                       st.booleans(), st.just("0.5"), st.none())
    ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(), st.booleans(), st.just(1.5), st.none())
    bad_ids = st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from([vocab, 99999, 2**31, 2**64, -1])),
                       min_size=1, max_size=3)
    words = st.one_of(st.lists(st.one_of(WORDS, BAD_WORDS), min_size=1, max_size=3), st.just("the"), ints)
    out = {name: floats for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                                     "presence_penalty", "length_penalty")}
    out.update({name: ints for name in ("top_k", "max_tokens", "min_tokens", "n", "best_of", "seed", "logprobs",
                                        "prompt_logprobs", "beam_width")})
    out.update(stop_token_ids=st.one_of(bad_ids, ints), bad_words=words, stop=words,
               logit_bias=st.one_of(st.dictionaries(st.one_of(st.integers(0, vocab - 1), st.sampled_from(
                   [vocab, 99999, 2**64, -1, "x"])), st.one_of(st.floats(-100, 100), floats), min_size=1,
                   max_size=3), ints),
               use_beam_search=st.one_of(st.booleans(), ints), ignore_eos=st.one_of(st.booleans(), ints))
    return out


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

    edges = edge_values(vocab)

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kw=valid_kwargs(vocab), mutate=st.lists(st.sampled_from(sorted(edges)), max_size=2, unique=True),
           prompt_kind=st.sampled_from(["ids", "text"]), data=st.data())
    def check(kw, mutate, prompt_kind, data):
        # a valid combination with 0-2 fields pushed to an edge: each edge value meets an otherwise sane request
        for name in mutate:
            kw[name] = data.draw(edges[name], label=name)
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
# A mutation: an edge value (huge, negative, non-finite, a lone surrogate, empty) or any JSON at all.
MUTANT = st.one_of(st.sampled_from(EDGE_INTS + EDGE_FLOATS + ["\ud800", "", "nan", [], {}]), JUNK)

GOOD_WORDS = st.sampled_from(["the", "cat", " sat", "a", "mat", "!", "\u00e9", "zz", "the cat"])
IDS = st.integers(0, 299)  # inside the test tokenizer's 300 ids
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": st.text(min_size=1, max_size=20)})
# Valid values for every field; a body is then mutated in 0-2 fields, so a third stays valid (-> a correct
# 200) and the rest probe one or two bad fields at a time.
COMMON = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.1, 3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "n": st.integers(1, 2), "seed": st.integers(0, 100), "stop": st.lists(GOOD_WORDS, max_size=2),
    "stop_token_ids": st.lists(IDS, max_size=3), "min_tokens": st.integers(0, 1),
    "bad_words": st.lists(GOOD_WORDS, max_size=2), "stream": st.booleans(),
    "logit_bias": st.dictionaries(IDS.map(str), st.floats(-100, 100), max_size=2),
    "ignore_eos": st.booleans(), "model": st.just("tiny-llama"), "max_tokens": st.integers(1, 6),
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=30), st.lists(IDS, min_size=1, max_size=5),
                         st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3))},
    optional={**COMMON, "echo": st.booleans(), "logprobs": st.integers(0, 5)})
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
                             optional={**COMMON, "logprobs": st.booleans()})
MUTABLE = sorted(set(COMMON) | {"prompt", "messages", "echo", "logprobs", "best_of", "top_logprobs",
                                "use_beam_search", "beam_width", "max_completion_tokens", "suffix", "user"})


def test_fuzz_request_bodies_against_the_live_server(server):
    errors_before = server.aengine.errors
    statuses: dict[int, int] = {}

    with httpx.Client(base_url=server.url, timeout=60) as client:
        @settings(max_examples=100, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
        def check(route, data):
            body = data.draw(COMPLETION if route == "/v1/completions" else CHAT)
            body.setdefault("max_tokens", 4)  # keep every generation short
            for name in data.draw(st.lists(st.sampled_from(MUTABLE), max_size=2, unique=True)):
                body[name] = data.draw(MUTANT)
                if name == "max_tokens" and isinstance(body[name], int) and 6 < body[name] < 2**63:
                    body[name] = 6  # a long generation is no edge case; 2**64 and 2**63 still go through
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
    # both sides are reached: correct answers to valid bodies, and 4xx errors to mutated ones
    assert statuses.get(200, 0) >= 15 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 15, statuses
    idle = server.wait_idle()
    assert idle["num_blocks_free"] == idle["num_blocks_total"]
