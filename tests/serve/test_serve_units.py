"""Server parts that need no model: Prometheus text, OpenAI error bodies, request models, config checks."""
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmstack.infer import SamplingParams
from lmstack.serve.errors import APIError, from_value_error
from lmstack.serve.engine_bridge import ServerConfig
from lmstack.serve.metrics import Counter, Histogram, ServerMetrics
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_text_parses_with_prometheus_parser():
    m = ServerMetrics("tiny")
    m.requests.inc(route="/v1/completions", status="200")
    m.requests.inc(route="/v1/completions", status="200")
    m.requests.inc(route='we"ird\\path\n', status="400")  # label values must be escaped
    m.prompt_tokens.inc(12)
    for v in (0.003, 0.02, 0.2, 100.0):
        m.ttft.observe(v)
    text = m.render({"running": 2, "waiting": 1, "num_blocks_total": 64, "num_blocks_free": 60})
    fam = families(text)
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in fam["lmstack_requests"].samples}
    assert reqs[("/v1/completions", "200")] == 2 and reqs[('we"ird\\path\n', "400")] == 1
    assert fam["lmstack_prompt_tokens"].samples[0].value == 12
    buckets = {s.labels["le"]: s.value for s in fam["lmstack_time_to_first_token_seconds"].samples
               if s.name.endswith("_bucket")}
    # cumulative counts: 0.003 <= 0.005; 0.02 <= 0.025; 0.2 <= 0.25; 100 only in +Inf
    assert buckets["0.005"] == 1 and buckets["0.025"] == 2 and buckets["0.25"] == 3 and buckets["60.0"] == 3
    assert buckets["+Inf"] == 4
    count = [s.value for s in fam["lmstack_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert count == [4]
    gauges = {name: fam[name].samples[0].value for name in
              ("lmstack_num_requests_running", "lmstack_num_requests_waiting", "lmstack_kv_blocks_total",
               "lmstack_kv_blocks_free", "lmstack_kv_blocks_used")}
    assert gauges == {"lmstack_num_requests_running": 2, "lmstack_num_requests_waiting": 1,
                      "lmstack_kv_blocks_total": 64, "lmstack_kv_blocks_free": 60, "lmstack_kv_blocks_used": 4}


def test_metric_misuse_is_an_error():
    c = Counter("x", "help", ("a",))
    with pytest.raises(ValueError, match="only go up"):
        c.inc(-1, a="1")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(b="1")
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("h", "help", (1.0, 0.5))
    h = Histogram("h", "help", (1.0,))
    h.observe(math.inf)
    assert h.counts == [0, 1]


def test_sampling_params_error_names_the_field():
    with pytest.raises(ValueError) as info:
        SamplingParams(top_p=1.5)
    err = from_value_error(info.value)
    assert err.status == 400 and err.param == "top_p" and "top_p" in err.message
    body = APIError(401, "no").body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == "invalid_api_key"
    assert APIError(503, "busy").type == "server_overloaded"


def test_request_models_accept_every_prompt_shape_and_forbid_unknown_fields():
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt
    with pytest.raises(ValueError, match="max_token"):
        CompletionRequest.model_validate({"prompt": "hi", "max_token": 3})
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert req.response_format.to_sampling() == {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}


@pytest.mark.parametrize("field,value", [("max_queue", -1), ("max_tokens_limit", 0), ("max_n", 0),
                                         ("max_request_bytes", "big"), ("api_key", "")])
def test_server_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: value})
