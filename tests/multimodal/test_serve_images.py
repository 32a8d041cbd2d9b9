"""`lmstack serve --model VLM_DIR` through the openai client: image_url parts answered by a tiny random VLM, the
same picture twice hits the prefix cache with the same greedy reply, streaming with a picture, and every kind of bad
picture a 400 after which the server keeps serving; a text-only model asked about a picture says it takes none."""
import base64
import io
import socket
import threading
import time

import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig
from lmstack.model.hf_io import save_model
from lmstack.multimodal.engine_adapter import IMAGE_MARKER
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import Obj, Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig, load_vlm, save_vlm
from lmstack.serve.commands import build_app
from lmstack.serve.engine_bridge import ServerConfig
from lmstack.serve.errors import APIError
from lmstack.serve.image_input import ImageLimits, read_part


class Server:
    """uvicorn in a background thread on a free loopback port (signal handlers off: not the main thread)."""

    def __init__(self, model_dir, images=None):
        self.app, self.aengine = build_app(str(model_dir), ServerConfig(model_name="vlm"), images=images,
                                           max_num_seqs=4, block_size=4, num_blocks=256)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.server.config.install_signal_handlers = False
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "the test server did not stop"


def png_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture(colour="red", shape="circle"):
    return render(Scene(size=32, background="white", objects=(Obj(shape, colour, "large", 16, 16, 6),)))


def image_message(url: str, text: str = "what colour is the shape?", n_images: int = 1) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(n_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


GREEDY = {"max_tokens": 6, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=330, n_images=20)


def make_vlm(tok, fusion="projector"):
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=4)
    lm = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                     eos_token_id=tok.token_to_id("<|eos|>"))
    return VLM(VLMConfig(vision=vision, lm=lm, fusion=fusion, image_token_id=tok.token_to_id(IMAGE_TOKEN))).eval()


@pytest.fixture(scope="module")
def vlm_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "vlm"
    save_vlm(make_vlm(tok), tok, d)
    return d


@pytest.fixture(scope="module")
def server(vlm_dir):
    with Server(vlm_dir, ImageLimits(max_images=2, max_pixels=96 * 96)) as srv:
        yield srv


def reference_reply(tok, vlm_dir, img, text):
    """The VLM's own greedy generate on the chat template's ids, <image> where the picture goes."""
    vlm = load_vlm(vlm_dir)  # the saved copy, as the server loaded it
    content = IMAGE_MARKER + text
    rendered = tok.render_messages([{"role": "user", "content": content}], add_generation_prompt=True).ids
    marker = tok.encode(IMAGE_MARKER, allow_special=False)
    i = next(k for k in range(len(rendered)) if rendered[k:k + len(marker)] == marker)
    ids = rendered[:i] + [vlm.image_token_id] + rendered[i + len(marker):]
    return vlm.generate(torch.tensor([vlm.expand_prompt(ids)]), to_pixels([img], 32), max_new_tokens=6,
                        eos_token_id=-1)[0]


def reply_bytes(response) -> bytes:
    return b"".join(bytes(t.bytes) for t in response.choices[0].logprobs.content)


def test_vlm_answers_an_image_and_the_same_image_hits_the_prefix_cache(server, tok, vlm_dir):
    img = picture("blue", "square")
    url = png_url(img)
    before = server.aengine.stats()["prefix_cache_hit_tokens"]
    first = server.client.chat.completions.create(model="vlm", messages=image_message(url, "what is it?"),
                                                  logprobs=True, **GREEDY)
    hits_first = server.aengine.stats()["prefix_cache_hit_tokens"] - before
    second = server.client.chat.completions.create(model="vlm", messages=image_message(url, "what is it?"),
                                                   logprobs=True, **GREEDY)
    hits_second = server.aengine.stats()["prefix_cache_hit_tokens"] - before - hits_first
    assert hits_first == 0 and hits_second > 16  # past the picture's 16 placeholder positions
    assert first.choices[0].message.content == second.choices[0].message.content
    state = server.app.state.lmstack  # the VLM's own greedy tokens, as bytes (a reply may end mid-character)
    want = reference_reply(tok, vlm_dir, img, "what is it?")
    assert reply_bytes(first) == reply_bytes(second) == b"".join(state.token_bytes(t) for t in want)
    assert first.usage.prompt_tokens > 16 and first.usage.completion_tokens == 6
    # another picture is encoded once more
    store = server.app.state.lmstack.vision.model.store
    encoded = store.encoded
    other = server.client.chat.completions.create(model="vlm", messages=image_message(png_url(picture("green")),
                                                                                      "what is it?"), **GREEDY)
    assert store.encoded == encoded + 1 and other.choices[0].message.content is not None


def test_streaming_with_an_image(server):
    url = png_url(picture("purple", "triangle"))
    whole = server.client.chat.completions.create(model="vlm", messages=image_message(url), **GREEDY)
    stream = server.client.chat.completions.create(model="vlm", messages=image_message(url), stream=True, **GREEDY)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert server.app.state.lmstack.vision.stats()["images_stored"] >= 1


def _bad_png_16bit():
    return Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))


BAD = {
    "corrupt": ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode(),
                "could not be read"),
    "cmyk": (png_url(Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "JPEG"), "CMYK"),
    "16-bit": (None, "not supported"),
    "over the pixel cap": (png_url(Image.new("RGB", (200, 200), "white")), "over the cap"),
    "bad base64": ("data:image/png;base64,@@not-base64@@", "base64 does not decode"),
    "non-data url": ("https://example.com/cat.png", "fetches nothing from the network"),
    "local path without the flag": ("/tmp/cat.png", "--allow_local_images"),
}


def test_bad_images_are_400_and_the_server_keeps_serving(server):
    good = image_message(png_url(picture()))
    for name, (url, says) in BAD.items():
        url = url or png_url(_bad_png_16bit())
        with pytest.raises(openai.BadRequestError) as info:
            server.client.chat.completions.create(model="vlm", messages=image_message(url), **GREEDY)
        assert says in info.value.message, (name, info.value.message)
        assert info.value.body["param"] == "messages.0.content.0", name
        ok = server.client.chat.completions.create(model="vlm", messages=good, **GREEDY)
        assert ok.choices[0].message.content is not None, name
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        server.client.chat.completions.create(model="vlm", messages=image_message(good[0]["content"][0]["image_url"]
                                                                                  ["url"], n_images=3), **GREEDY)
    with pytest.raises(openai.BadRequestError, match="repetition_penalty is not supported with images"):
        server.client.chat.completions.create(model="vlm", messages=good, max_tokens=2,
                                              extra_body={"repetition_penalty": 1.2})
    with pytest.raises(openai.BadRequestError, match="U\\+E000"):  # text may not forge a picture's marker
        server.client.chat.completions.create(model="vlm", messages=image_message(png_url(picture()),
                                                                                  "two " + IMAGE_MARKER), **GREEDY)
    # nothing stays pinned after refused, finished and streamed requests
    store = server.app.state.lmstack.vision.model.store
    assert all(e.pins == 0 for e in store._entries.values())
    assert server.client.chat.completions.create(model="vlm", messages=good, **GREEDY).choices


def test_text_only_model_refuses_images(tok, tmp_path):
    vlm = make_vlm(tok)
    save_model(vlm.lm, tmp_path / "lm")
    tok.save(tmp_path / "lm")
    with Server(tmp_path / "lm") as srv:
        with pytest.raises(openai.BadRequestError, match="this model does not take images"):
            srv.client.chat.completions.create(model="vlm", messages=image_message(png_url(picture())), **GREEDY)
        ok = srv.client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": "hi"}],
                                                **GREEDY)
        assert ok.choices[0].message.content is not None


def test_flamingo_vlm_is_refused_at_load(tok, tmp_path):
    save_vlm(make_vlm(tok, "xattn"), tok, tmp_path / "flamingo")
    with pytest.raises(LmstackError, match="cross-attention"):
        build_app(str(tmp_path / "flamingo"), ServerConfig())


def test_local_image_files_only_with_the_flag(tmp_path):
    class Part:
        image_url = {"url": str(tmp_path / "x.png")}

    picture("orange").save(tmp_path / "x.png")
    with pytest.raises(APIError, match="--allow_local_images"):
        read_part(Part(), ImageLimits(), "messages.0.content.0")
    img = read_part(Part(), ImageLimits(allow_local_images=True), "messages.0.content.0")
    assert img.size == (32, 32)
    Part.image_url = {"url": "file://" + str(tmp_path / "missing.png")}
    with pytest.raises(APIError, match="no image file"):
        read_part(Part(), ImageLimits(allow_local_images=True), "messages.0.content.0")


def test_a_client_cannot_name_another_requests_picture_by_its_placeholder_ids(server, tok):
    """Placeholder ids are the server's own: a raw-ids prompt that names a stored picture (someone else's upload)
    is a 400, so no client reads a picture it did not send."""
    server.client.chat.completions.create(model="vlm", messages=image_message(png_url(picture("green"))), **GREEDY)
    model = server.app.state.lmstack.vision.model
    entry = next(iter(model.store._entries.values()))  # a picture still stored
    placeholder = model.placeholder_ids(entry.slot)[0]
    assert model.check_prompt_ids([placeholder])  # the engine would take it: the server must not pass it on
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        server.client.completions.create(model="vlm", prompt=[1, 2, placeholder], max_tokens=2)
    assert server.client.completions.create(model="vlm", prompt=[1, 2, 3], max_tokens=2).choices
