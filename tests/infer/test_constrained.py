"""Guided decoding: sampled outputs always match the regex, the JSON schema, or one of the choices."""
import json
import re

import pytest

from lmstack.infer import LLM, SamplingParams, SamplingParamsError
from lmstack.infer.constrained import choice_regex, escape_regex

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def llm(tok, model):
    return LLM(model, tokenizer=tok, block_size=4, num_blocks=512, max_num_seqs=16)


def sample(llm, params, n=8, prompt="Answer:"):
    outs = llm.generate([prompt] * n, [params.clone(seed=s) for s in range(n)])
    return [o.outputs[0] for o in outs]


def test_regex_outputs_always_match(llm):
    pattern = r"(yes|no), [0-9]{2,3} (cats|dogs)\."
    for c in sample(llm, SamplingParams(regex=pattern, temperature=1.0, max_tokens=40)):
        assert re.fullmatch(pattern, c.text), c.text
        assert c.finish_reason == "stop"


def test_json_schema_outputs_always_validate(llm):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green"]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "score": {"type": "number"}}, "required": ["name", "age", "color", "tags"], "additionalProperties": False}
    for c in sample(llm, SamplingParams(json_schema=schema, temperature=1.0, max_tokens=120)):
        assert c.finish_reason == "stop", c.text
        obj = json.loads(c.text)
        assert set(obj) <= set(schema["properties"]) and {"name", "age", "color", "tags"} <= set(obj)
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
        assert obj["color"] in ("red", "green")
        assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and all(isinstance(t, bool) for t in obj["tags"])
        if "score" in obj:
            assert isinstance(obj["score"], (int, float))


def test_choice_and_response_format(llm):
    choices = ["red apple", "green (pear)", "a.b*c"]
    seen = set()
    for c in sample(llm, SamplingParams(choice=choices, temperature=1.0, max_tokens=20), n=12):
        assert c.text in choices
        seen.add(c.text)
    assert len(seen) > 1  # the mask restricts, it does not force one answer
    rf = {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": {"type": "integer"},
                                                           "minItems": 1, "maxItems": 2}}}
    for c in sample(llm, SamplingParams(response_format=rf, temperature=1.0, max_tokens=40), n=4):
        val = json.loads(c.text)
        assert isinstance(val, list) and 1 <= len(val) <= 2 and all(isinstance(x, int) for x in val)


def test_guided_with_parallel_samples_and_greedy(llm):
    out = llm.generate(["Q"], SamplingParams(regex=r"[a-c]{3}", n=4, temperature=1.0, seed=1, max_tokens=10))[0]
    assert all(re.fullmatch(r"[a-c]{3}", c.text) for c in out.outputs)
    greedy = llm.generate(["Q"], SamplingParams(regex=r"[0-9]+", temperature=0.0, max_tokens=5))[0].outputs[0]
    assert re.fullmatch(r"[0-9]+", greedy.text) and greedy.finish_reason in ("length", "stop")


def test_bad_grammars_are_rejected_with_the_field_name(llm):
    with pytest.raises(SamplingParamsError, match="regex"):
        llm.generate(["Q"], SamplingParams(regex="(unclosed"))
    assert llm.engine.bm.num_free_blocks == llm.engine.num_blocks


def test_escaping():
    assert re.fullmatch(choice_regex(["a.b", "(x)"]), "(x)")
    assert escape_regex("1+1=2?") == "1\\+1=2\\?"
