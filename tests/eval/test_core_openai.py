"""OpenAICompletionsLM against our own server: per-item scores equal LocalLM's to 1e-4, generation, errors."""
import sys
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.lm import GenArgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

REQS = [("the cat sat on", " the mat"), ("the cat sat on ", "the mat."), ("birds sang in old", " trees"),
        ("one two three", " four five six seven eight"), ("Question: what is it?\nAnswer:", " a rock"),
        ("", "hello world")]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from serve_helpers import start_server

    srv = start_server(tiny_model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_lm(server, tiny_model_dir):
    from lmstack.eval.openai_lm import OpenAICompletionsLM

    lm = OpenAICompletionsLM(server.url, "tiny-llama", tokenizer=tiny_model_dir, batch_size=4, max_length=127)
    yield lm
    lm.close()


def test_token_mode_scores_equal_local_lm(api_lm, tiny_lm):
    local = tiny_lm.loglikelihood(REQS)
    remote = api_lm.loglikelihood(REQS)
    for (a, ga), (b, gb) in zip(local, remote):
        assert b == pytest.approx(a, abs=1e-4)
        assert ga == gb
    assert api_lm.stats["requests"] >= len(REQS) and api_lm.stats["prompt_tokens"] > 0


def test_text_mode_lets_the_server_tokenize_and_agrees(server, tiny_lm):
    from lmstack.eval.openai_lm import OpenAICompletionsLM

    lm = OpenAICompletionsLM(server.url + "/v1", "tiny-llama", batch_size=3, max_length=127)
    reqs = REQS[:-1]   # an empty context needs the local tokenizer's prefix token
    for (a, _), (b, _) in zip(tiny_lm.loglikelihood(reqs), lm.loglikelihood(reqs)):
        assert b == pytest.approx(a, abs=1e-4)
    with pytest.raises(LmstackError, match="empty context"):
        lm.loglikelihood([("", "x")])
    with pytest.raises(LmstackError, match="needs a local tokenizer"):
        lm.loglikelihood_rolling(["the cat"])
    lm.close()


def test_rolling_through_the_server_equals_local(api_lm, tiny_model_dir):
    from lmstack.eval.local_lm import LocalLM

    local = LocalLM(tiny_model_dir, max_length=126, device="cpu")    # the API's windows hold max_length - 1
    text = "the cat sat on the mat and the dog ran to the park while birds sang in old trees " * 4
    [a] = local.loglikelihood_rolling([text])
    [b] = api_lm.loglikelihood_rolling([text])
    assert b == pytest.approx(a, abs=1e-3)   # a sum over ~300 tokens: fp32 rounding adds up


def test_generate_until_matches_local_greedy(api_lm, tiny_lm):
    args = GenArgs(max_gen_toks=10)
    [local] = tiny_lm.generate_until([("the cat sat", args)])
    [remote] = api_lm.generate_until([("the cat sat", args)])
    assert remote == local
    stop = local[3:4]
    [cut] = api_lm.generate_until([("the cat sat", GenArgs(until=[stop], max_gen_toks=10))])
    assert stop not in cut and local.startswith(cut)


def test_server_errors_are_clear(server, tiny_model_dir):
    from lmstack.eval.openai_lm import OpenAICompletionsLM

    wrong = OpenAICompletionsLM(server.url, "no-such-model", tokenizer=tiny_model_dir, max_length=127)
    with pytest.raises(LmstackError, match="404"):
        wrong.loglikelihood([("a", " b")])
    dead = OpenAICompletionsLM("http://127.0.0.1:9", "x", max_retries=0)
    with pytest.raises(LmstackError, match="cannot reach"):
        dead.generate_until([("hi", GenArgs(max_gen_toks=2))])
