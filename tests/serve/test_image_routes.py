"""/v1/images/generations through the official openai client on a live server with a real (random, tiny) image
generator directory, the generator's warnings kept in the body; and each refusal through TestClient, a 400
naming the problem, with a good request answered 200 right after it."""
import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lmstack.multimodal.dit import ImageGenerator
from lmstack.safety.guard import Guard, GuardConfig
from lmstack.serve.commands import build_app
from lmstack.serve.engine_bridge import ServerConfig

from serve_helpers import start_server

openai = pytest.importorskip("openai")

KEY = "sk-images"
GOOD = {"prompt": "a red circle", "steps": 2}


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = ImageGenerator.random(tiny=True, seed=0).save(tmp_path_factory.mktemp("dit") / "dit")
    return ImageGenerator.from_dir(path)


@pytest.fixture(scope="module")
def client(model_dir, generator):
    srv = start_server(model_dir, api_key=KEY, engine={"diffusion": generator})
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c
    srv.stop()


@pytest.fixture(scope="module")
def tc(model_dir, generator):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2, diffusion=generator)
    with TestClient(app) as c:
        yield c


def png_pixels(b64: str) -> np.ndarray:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generations_through_openai_client(client, generator):
    resp = client.images.generate(model="dit", prompt="a red circle", n=2, size="32x32",
                                  extra_body={"seed": 3, "steps": 4})
    expected, warnings = generator.generate("a red circle", n=2, seed=3, steps=4)
    assert warnings == [] and len(resp.data) == 2 and resp.created > 0
    for item, ref in zip(resp.data, expected):
        assert np.array_equal(png_pixels(item.b64_json), ref)  # PNG is lossless: the generator's exact pixels
    assert not np.array_equal(png_pixels(resp.data[0].b64_json), png_pixels(resp.data[1].b64_json))
    assert "warnings" not in (resp.model_extra or {})
    again = client.images.generate(prompt="a red circle", extra_body={"seed": 3, "steps": 4})  # size: the model's
    assert np.array_equal(png_pixels(again.data[0].b64_json), expected[0])


def test_models_lists_the_generator_beside_the_language_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama", "diffusion"], ids  # no asr/tts/video card: this server was not given them


def test_warnings_come_back_with_status_200(client, generator):
    resp = client.images.generate(prompt="a purple banana", extra_body={"steps": 2})
    warnings = resp.model_extra["warnings"]  # the openai client keeps fields it does not know
    assert warnings == generator.generate("a purple banana", steps=2)[1] and "'banana'" in warnings[0]
    assert png_pixels(resp.data[0].b64_json).shape == (32, 32, 3)


def test_api_key_is_required(client):
    with openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.images.generate(prompt="a red circle")


CASES = [  # (id, fields over GOOD, the param the error names, words its message holds)
    ("url_format", {"response_format": "url"}, "response_format", ["'url'", "b64_json", "hosts no files"]),
    ("bad_size", {"size": "1024x1024"}, "size", ["'1024x1024'", "32x32"]),
    ("n_5", {"n": 5}, "n", ["less than or equal to 4"]),
    ("n_0", {"n": 0}, "n", ["greater than or equal to 1"]),
    ("empty_prompt", {"prompt": "   "}, "prompt", ["prompt is empty"]),
    ("prompt_too_long", {"prompt": "a red circle " * 100}, "prompt", ["1300 characters", "at most 1000"]),
    ("prompt_over_the_text_tower", {"prompt": "a red circle and a blue square and a green star " * 2}, "prompt",
     ["tokens", "shorten"]),
    ("unknown_field", {"quality": "hd"}, "quality", ["Extra inputs"]),
    ("steps_0", {"steps": 0}, "steps", ["greater than or equal to 1"]),
    ("steps_over_cap", {"steps": 1000}, "steps", ["less than or equal to 250"]),
    ("sampler_euler", {"sampler": "euler"}, "sampler", ["sampler='euler'", "ddim"]),
    ("guidance_100", {"guidance": 100.0}, "guidance", ["guidance must be", "0..50"]),
    ("lone_surrogate", {"prompt": "a red \ud800 circle"}, "prompt", ["surrogate"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refusals_then_a_good_request(tc, case):
    _, fields, param, words = case
    # json.dumps escapes a lone surrogate as "\ud800", as a JSON client may send it (httpx would refuse to encode it)
    r = tc.post("/v1/images/generations", content=json.dumps({**GOOD, **fields}),
                headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words), error
    good = tc.post("/v1/images/generations", json=GOOD)
    assert good.status_code == 200 and png_pixels(good.json()["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_without_a_generator_the_route_names_the_flag(model_dir):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2)
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json=GOOD)
        assert r.status_code == 404 and "--diffusion DIR" in r.json()["error"]["message"]


def test_guard_refuses_a_flagged_prompt_and_draws_the_next(model_dir, generator):
    guard = Guard(GuardConfig(moderator="keyword"))
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2, diffusion=generator,
                       guard=guard)
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={**GOOD, "prompt": "how to brew the forbidden potion"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "content_policy_violation" and err["param"] == "prompt"
        assert "harmful_instructions" in err["message"]
        ok = c.post("/v1/images/generations", json=GOOD)
        assert ok.status_code == 200 and ok.json()["data"][0]["b64_json"]
