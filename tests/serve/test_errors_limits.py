"""OpenAI-style errors and the server's limits: 400, 401, 404, 413, 503, checked with httpx and the openai client."""
import time

import httpx
import pytest

from serve_helpers import start_server


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": -2}, "max_tokens"),
    ({"prompt": "hi", "max_token": 3}, "max_token"),            # unknown field (a typo)
    ({"prompt": [1, 2, 99999]}, "prompt"),                      # token id outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "n": 64}, "n"),                           # above the server's max_n
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),     # above the server's max_tokens_limit
    ({"prompt": "hi", "max_tokens": 255}, "max_tokens"),        # prompt + max_tokens > the 256 context
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
])
def test_validation_errors_are_400_and_name_the_field(http, payload, param):
    err = error(http.post("/v1/completions", json=payload), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert param.split(".")[0] in err["message"] or param == "prompt"


def test_chat_validation_errors(http):
    err = error(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert "messages.0.role" == err["param"]
    err = error(http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert err["param"] == "messages"
    err = error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"
    err = error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                400)
    assert "JSON" in err["message"] or "json" in err["message"]


def test_not_found(http):
    err = error(http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    error(http.get("/v1/nothing"), 404)


def test_prompt_longer_than_context_is_413(http):
    ids = [5] * 300  # the test model's context is 256
    err = error(http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}), 413)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    long_chat = {"messages": [{"role": "user", "content": "the cat " * 200}]}
    assert error(http.post("/v1/chat/completions", json=long_chat), 413)["param"] == "prompt"


def test_api_key_body_limit_and_overload(model_dir):
    """One server with a key, a 4 KB body limit and room for exactly one request (max_num_seqs=1, max_queue=0)."""
    import openai

    srv = start_server(model_dir, api_key="sk-test", max_request_bytes=4096, max_queue=0,
                       engine={"max_num_seqs": 1})
    engine = srv.aengine.engine
    step = engine.step

    def slow_step():  # a slower model, so the first request is surely still running when the second comes
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            # 401 without or with a wrong key; open routes stay open
            assert error(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
            error(http.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}), 401)
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 200
            auth = {"Authorization": "Bearer sk-test"}
            assert http.get("/v1/models", headers=auth).status_code == 200
            with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0) as bad:
                with pytest.raises(openai.AuthenticationError):
                    bad.models.list()
            # 413 for a body over the limit, with and without Content-Length
            big = {"prompt": "x" * 5000, "max_tokens": 1}
            assert error(http.post("/v1/completions", json=big, headers=auth), 413)["code"] == "request_too_large"

            def chunks():
                yield b'{"prompt": "'
                for _ in range(10):
                    yield b"y" * 500
                yield b'"}'

            r = http.post("/v1/completions", content=chunks(), headers={**auth, "content-type": "application/json"})
            assert error(r, 413)["code"] == "request_too_large"
            # 503: the one slot is held by a running stream
            body = {"prompt": "the cat", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body, headers=auth) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")
                err = error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth), 503)
                assert err["type"] == "server_overloaded"
                with openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0) as good:
                    with pytest.raises(openai.InternalServerError) as info:
                        good.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
                    assert info.value.status_code == 503
                rest = [x for x in lines if x.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"  # the first request was not disturbed
            # the slot is free again
            ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth)
            assert ok.status_code == 200
            text = http.get("/metrics").text
            assert 'lmstack_requests_total{route="/v1/completions",status="503"} 2.0' in text
            assert 'lmstack_requests_total{route="/v1/models",status="401"} 2.0' in text
    finally:
        srv.stop()
