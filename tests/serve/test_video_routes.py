"""/v1/video/answers (lmstack extension) on a live uvicorn server through httpx, with a real (random, tiny) video QA
directory written by save_video_qa: frames and a sprite sheet of a rendered video-world clip give the model's own
probabilities; and each refusal through TestClient, a 400 naming the problem, with a good request answered after it."""
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.multimodal.video_model import VideoConfig, VideoQA, VideoQAConfig, clip_to_pixels
from lmstack.multimodal.video_train import answer_vocab, encode_questions, save_video_qa, video_tokenizer
from lmstack.multimodal.video_world import build_video_world, sheet_bytes
from lmstack.multimodal.vit import VisionConfig
from lmstack.serve.commands import build_app, serve
from lmstack.serve.engine_bridge import ServerConfig
from lmstack.serve.video_routes import VideoAnswerer

from serve_helpers import start_server

KEY = "sk-video"
FRAMES, SIZE = 4, 32
QUESTION = "How many shapes are there in frame 2?"


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    tok, answers = video_tokenizer(300, n_clips=40), answer_vocab()
    torch.manual_seed(0)
    vision = VisionConfig(image_size=SIZE, patch_size=16, d_model=32, n_layers=1, n_heads=2)
    model = VideoQA(VideoQAConfig(video=VideoConfig(vision=vision, frames=FRAMES, temporal_layers=1),
                                  vocab_size=tok.vocab_size, n_answers=len(answers), d_model=32, n_layers=1,
                                  n_heads=2, max_question_len=40))
    return save_video_qa(model.eval(), tok, answers, tmp_path_factory.mktemp("video") / "video")


@pytest.fixture(scope="module")
def video(video_dir):
    return VideoAnswerer.from_dir(video_dir)


@pytest.fixture(scope="module")
def record():
    return build_video_world(3, frames=FRAMES, size=SIZE, seed=1)[0]


def png_url(picture) -> str:
    buf = io.BytesIO()
    (picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture, np.uint8))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def sheet(record):
    return np.asarray(Image.open(io.BytesIO(sheet_bytes(record))).convert("RGB"))  # (S, F*S, 3)


@pytest.fixture(scope="module")
def frames(sheet):
    return [sheet[:, t * SIZE:(t + 1) * SIZE] for t in range(FRAMES)]


@pytest.fixture(scope="module")
def good(frames):
    return {"model": "video-qa", "video": {"frames": [png_url(f) for f in frames]}, "question": QUESTION}


def expected_top(video_dir, frames, question, k):
    """The model's own softmax, computed here from the saved directory (not through the server's code)."""
    answerer = VideoAnswerer.from_dir(video_dir)
    pixels = clip_to_pixels(np.stack(frames), FRAMES, SIZE)
    ids, mask = encode_questions(answerer.tok, [question], answerer.model.config.max_question_len)
    with torch.no_grad():
        probs = torch.softmax(answerer.model(pixels[None], ids, mask)[0], -1)
    order = torch.argsort(probs, descending=True)[:k].tolist()
    return [(answerer.answers[i], float(probs[i])) for i in order]


@pytest.fixture(scope="module")
def live(model_dir, video):
    srv = start_server(model_dir, api_key=KEY, engine={"video": video})
    yield srv
    srv.stop()


def test_frames_and_sheet_get_the_models_answer_on_a_live_server(live, video_dir, frames, sheet, good):
    want = expected_top(video_dir, frames, QUESTION, 3)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        by_frames = http.post("/v1/video/answers", json=good)
        assert by_frames.status_code == 200, by_frames.text
        body = by_frames.json()
        assert body["object"] == "video.answer" and body["frames"] == FRAMES and "warnings" not in body
        assert [t["answer"] for t in body["top"]] == [a for a, _ in want] and body["answer"] == want[0][0]
        assert [t["probability"] for t in body["top"]] == pytest.approx([p for _, p in want], abs=1e-5)
        by_sheet = http.post("/v1/video/answers", json={"video": {"sheet": png_url(sheet), "frames": FRAMES},
                                                        "question": QUESTION, "top_k": 5}).json()
        assert by_sheet["top"][:3] == body["top"] and len(by_sheet["top"]) == 5  # the same clip, sliced the same
        inferred = http.post("/v1/video/answers", json={"video": {"sheet": png_url(sheet)}, "question": QUESTION,
                                                        "top_k": 1}).json()  # frames = width / height
        assert inferred["top"] == body["top"][:1] and inferred["frames"] == FRAMES
        refused = http.post("/v1/video/answers", json={**good, "video": {"frames": []}})
        assert refused.status_code == 400 and "no frames" in refused.json()["error"]["message"]
        assert http.get("/health").status_code == 200  # the server keeps serving
        assert http.post("/v1/video/answers", json=good).json() == body
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.post("/v1/video/answers", json=good).status_code == 401


def test_the_order_of_frames_reaches_the_model(live, frames, good):
    """The temporal encoder sees time: the reversed clip is a different input (probabilities change)."""
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        forward = http.post("/v1/video/answers", json={**good, "top_k": 5}).json()["top"]
        reverse = http.post("/v1/video/answers", json={**good, "top_k": 5, "video": {
            "frames": [png_url(f) for f in frames[::-1]]}}).json()["top"]
    assert [t["probability"] for t in forward] != [t["probability"] for t in reverse]


class HeldModel:
    """The real model, each call held until released, counting the calls that run at once."""

    def __init__(self, model, started, release):
        self.model, self.config, self.started, self.release = model, model.config, started, release
        self.active = self.most = 0
        self.count = threading.Lock()

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args):
        with self.count:
            self.active += 1
            self.most = max(self.most, self.active)
        self.started.set()
        self.release.wait(10)
        try:
            return self.model(*args)
        finally:
            with self.count:
                self.active -= 1


def test_model_calls_run_one_at_a_time_off_the_event_loop(model_dir, video_dir, good):
    """Two worker threads take two requests at once; the lock lets one model call run, and /health answers."""
    answerer = VideoAnswerer.from_dir(video_dir)
    started, release = threading.Event(), threading.Event()
    held = answerer.model = HeldModel(answerer.model, started, release)
    srv = start_server(model_dir, engine={"video": answerer})
    out = []
    try:
        def ask():
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                out.append(http.post("/v1/video/answers", json=good))

        workers = [threading.Thread(target=ask) for _ in range(3)]
        for w in workers:
            w.start()
        assert started.wait(10)
        time.sleep(0.3)  # the second worker thread reaches the lock meanwhile
        t0 = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=5) as http:
            assert http.get("/health").status_code == 200
        assert time.monotonic() - t0 < 2.0
        release.set()
        for w in workers:
            w.join(20)
    finally:
        release.set()
        srv.stop()
    assert [r.status_code for r in out] == [200] * 3 and len({r.text for r in out}) == 1
    assert held.most == 1


@pytest.fixture(scope="module")
def tc(model_dir, video):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2, video=video)
    with TestClient(app) as c:
        yield c


def test_unknown_words_are_answered_with_a_warning(tc, good, video_dir, frames):
    question = "How many zebras are there in frame 2?"
    r = tc.post("/v1/video/answers", json={**good, "question": question})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == expected_top(video_dir, frames, question, 1)[0][0]
    assert len(body["warnings"]) == 1 and "'zebras'" in body["warnings"][0] and "'many'" not in body["warnings"][0]


def _solid(side, colour=(200, 30, 30), w=None):
    return np.full((side, w or side, 3), colour, np.uint8)


def _cmyk_url():
    buf = io.BytesIO()
    Image.new("CMYK", (SIZE, SIZE), (0, 50, 100, 0)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _video(frames=None, sheet=None, **extra):
    return {k: v for k, v in (("frames", frames), ("sheet", sheet)) if v is not None} | extra


def _sheet_of(n):
    return png_url(np.concatenate([_solid(SIZE, (10 * t, 90, 160)) for t in range(n)], axis=1))


def _frames_of(n, side=SIZE):
    return [png_url(_solid(side, (10 * t, 90, 160))) for t in range(n)]


CASES = [  # (id, fields over GOOD, the param the error names, words its message holds)
    ("empty_frame_list", {"video": _video([])}, "video.frames", ["no frames"]),
    ("sheet_with_frames_0", {"video": _video(0, _sheet_of(4))}, "video.frames", ["no frames"]),
    ("sheet_narrower_than_a_frame", {"video": _video(sheet=png_url(_solid(SIZE, w=SIZE // 2)))}, "video.sheet",
     ["16x32", "narrower than one square", "no frames"]),
    ("three_frames", {"video": _video(_frames_of(3))}, "video.frames", ["3 frames", "exactly 4"]),
    ("sheet_of_six_frames", {"video": _video(6, _sheet_of(6))}, "video.frames", ["6 frames", "exactly 4"]),
    ("sheet_counted_three_inferred", {"video": _video(sheet=_sheet_of(3))}, "video.sheet", ["3 frames", "exactly 4"]),
    ("sheet_width_not_its_count", {"video": _video(4, _sheet_of(3))}, "video.sheet",
     ["96x32", "4 x 32 = 128"]),
    ("sheet_not_whole_frames", {"video": _video(sheet=png_url(_solid(SIZE, w=SIZE * 3 + 5)))}, "video.sheet",
     ["101x32", "whole number"]),
    ("over_the_frame_cap", {"video": _video(_frames_of(1) * 33)}, "video.frames", ["33 frames", "cap of 32"]),
    ("frames_of_two_sizes", {"video": _video(_frames_of(2) + _frames_of(1, 24) + _frames_of(1))}, "video.frames.2",
     ["24x24", "video.frames.0 is 32x32", "one size"]),
    ("frames_of_the_wrong_size", {"video": _video(_frames_of(4, 48))}, "video.frames",
     ["48x48", "32x32", "not resized"]),
    ("sheet_of_the_wrong_size", {"video": _video(4, png_url(_solid(16, w=64)))}, "video.sheet",
     ["16x16", "32x32"]),
    ("frames_and_sheet", {"video": _video(_frames_of(4), _sheet_of(4))}, "video", ["both"]),
    ("neither", {"video": {}}, "video", ["neither frames nor sheet"]),
    ("count_without_sheet", {"video": _video(4)}, "video", ["video.frames=4 is a count", "no video.sheet"]),
    ("negative_count", {"video": _video(-2, _sheet_of(4))}, "video.frames", ["-2"]),
    ("corrupt_frame", {"video": _video(_frames_of(1) + ["data:image/png;base64,"
                                                         + base64.b64encode(b"not a png at all").decode()]
                                       + _frames_of(2))}, "video.frames.1", ["could not be read"]),
    ("bad_base64", {"video": _video(_frames_of(3) + ["data:image/png;base64,@@@@"])}, "video.frames.3",
     ["base64 does not decode"]),
    ("cmyk_frame", {"video": _video([_cmyk_url()] + _frames_of(3))}, "video.frames.0", ["CMYK"]),
    ("http_url_frame", {"video": _video(["https://example.com/f.png"] + _frames_of(3))}, "video.frames.0",
     ["data URL"]),
    ("huge_frame", {"video": _video([png_url(_solid(300))] + _frames_of(3))}, "video.frames.0",
     ["300x300", "over the cap"]),
    ("unknown_video_field", {"video": _video(_frames_of(4), fps=2)}, "video.fps", ["Extra inputs"]),
    ("frames_not_strings", {"video": _video([1, 2, 3, 4])}, "video.frames", ["string"]),
    ("empty_question", {"question": "   "}, "question", ["question is empty"]),
    ("over_long_question", {"question": "what " * 101}, "question", ["505 characters", "at most 500"]),
    ("question_over_the_token_limit", {"question": "which way does the red circle move " * 6}, "question",
     ["tokens", "max_question_len=40"]),
    ("no_known_word", {"question": "Quelle heure est-il?"}, "question", ["none of its words"]),
    ("no_words_at_all", {"question": "?!"}, "question", ["has no words"]),
    ("missing_question", {"question": None}, "question", ["Field required"]),
    ("top_k_0", {"top_k": 0}, "top_k", ["greater than or equal to 1"]),
    ("top_k_6", {"top_k": 6}, "top_k", ["less than or equal to 5"]),
    ("unknown_field", {"stream": True}, "stream", ["Extra inputs"]),
    ("lone_surrogate", {"question": "how many \ud800 shapes"}, "question", ["surrogate"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refusals_then_a_good_request(tc, good, case):
    _, fields, param, words = case
    body = {k: v for k, v in {**good, **fields}.items() if v is not None}
    # json.dumps escapes a lone surrogate as "\ud800", as a JSON client may send it (httpx would refuse to encode it)
    r = tc.post("/v1/video/answers", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"] or "").startswith(param) and all(w in error["message"] for w in words), error
    ok = tc.post("/v1/video/answers", json=good)
    assert ok.status_code == 200 and ok.json()["frames"] == FRAMES and len(ok.json()["top"]) == 3


def test_without_a_video_model_the_route_names_the_flag(model_dir, good):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2)
    with TestClient(app) as c:
        r = c.post("/v1/video/answers", json=good)
        assert r.status_code == 404 and "--video DIR" in r.json()["error"]["message"]


def test_a_bad_video_dir_fails_before_the_server_starts(model_dir, tmp_path):
    with pytest.raises(LmstackError, match=r"--video .*not a video QA directory: config.json is missing"):
        serve(str(model_dir), video=str(tmp_path))


def test_answerer_refuses_a_mismatched_answer_list(video):
    with pytest.raises(LmstackError, match="answer classes"):
        VideoAnswerer(video.model, video.tok, video.answers[:-1])
