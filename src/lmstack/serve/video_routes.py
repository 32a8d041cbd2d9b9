"""Questions about a video in the server: POST /v1/video/answers (`lmstack serve --video DIR`), an lmstack extension.

OpenAI has no video API, and vLLM's `video_url` chat parts need a video language model, which we do not have: this
route serves the video QA classifier of lmstack.multimodal.video_train (`lmstack mm train-video`), which picks its
answer from a fixed vocabulary. JSON body:
    model     any name: the server has one video model, and the answer does not echo it
    video     {"frames": [data URL, ...]}  one PNG/JPEG picture per frame, in time order; or
              {"sheet": data URL, "frames": N}  a sprite sheet, the N frames side by side (width = N x height), as
              `lmstack data synth-video` writes them; without "frames" N is width / height
    question  1 to MAX_QUESTION_CHARS characters, at most the model's max_question_len tokens
    top_k     1 to MAX_TOP_K (default 3): how many answers come back with their probabilities
-> {"object": "video.answer", "answer": str, "top": [{"answer", "probability"}, ...], "frames": F}

The rules, each refusal a 400 naming the field (`video`, `video.frames`, `video.frames.K`, `video.sheet`,
`question`, `top_k`), with the server still serving the next request:
- exactly one of video.frames (a list) or video.sheet; a sheet's frames is a count, a list's entries data URLs;
- no frames at all (an empty list, a sheet with frames 0, a sheet narrower than one square frame) is refused: there
  is no video to answer about;
- more than MAX_VIDEO_FRAMES frames, or any count other than the one the model was trained on (the message names
  it): the temporal position embeddings exist for exactly that many frames, so frames are never dropped or repeated;
- every picture is decoded and checked by multimodal/images.py (corrupt, CMYK, 16-bit, bad base64, over the pixel
  cap are refused by name); frames of different sizes are refused, and so are frames of any size but the model's
  own SxS: they are NOT resized, since the model only ever saw SxS renders and a rescaled frame moves and blurs the
  small shapes it answers about;
- words: the model was trained on the video world's templated questions. A question none of whose words it was
  trained on is refused (its answer would be the answer prior, whatever the question); a question with some unknown
  words is answered, with a "warnings" list naming them (status 200, as /v1/images/generations warns).
Decoding and the model run in the server's worker pool, one model call at a time (a lock). Without --video the route
answers 404 naming the flag.

Usage (server side):
    app = create_app(aengine, config, video=VideoAnswerer.from_dir("runs/video"))
    answerer.answer(clip_uint8, "How many shapes are there in frame 3?", top_k=3)   # {"answer", "top", ...}
"""
from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lmstack.errors import LmstackError
from lmstack.multimodal.images import decode_data_url, decode_image
from lmstack.multimodal.video_model import MAX_FRAMES, VideoQA, clip_to_pixels
from lmstack.multimodal.video_train import encode_questions, load_video_qa
from lmstack.multimodal.video_world import build_video_world
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.limits import reject_lone_surrogates

MAX_VIDEO_FRAMES = MAX_FRAMES
"""Most frames a request may carry (refused before any picture is decoded)."""
MAX_TOP_K = 5
MAX_QUESTION_CHARS = 500
MIN_FRAME_PIXELS = 256 * 256
"""A frame's pixel cap is 4x the model's frame area, at least this: checked from the header before decoding."""
LEXICON_CLIPS = 200
_WORD = re.compile(r"[a-z0-9]+")


class VideoInput(BaseModel):
    """The request's video: frames (data URLs) or a sprite sheet with its frame count."""
    model_config = ConfigDict(extra="forbid")
    frames: list[StrictStr] | StrictInt | None = None
    sheet: StrictStr | None = None


class VideoAnswerRequest(BaseModel):
    """The /v1/video/answers body; unknown fields are a 400 naming them, as in the other routes."""
    model_config = ConfigDict(extra="forbid")
    video: VideoInput
    question: str
    model: str | None = None
    top_k: int = Field(default=3, ge=1, le=MAX_TOP_K)


def words_of(text: str) -> list[str]:
    """Lower-case words (letters and digits) in order of first appearance."""
    return list(dict.fromkeys(_WORD.findall(text.lower())))


def question_lexicon(frames: int) -> set[str]:
    """Every word of the video world's questions (the templates, colours, shapes, frame numbers 0..frames-1)."""
    records = build_video_world(LEXICON_CLIPS, frames=min(max(frames, 2), MAX_FRAMES), size=32, seed=0)
    return {w for rec in records for q in rec["questions"] for w in words_of(q["question"])}


class VideoAnswerer:
    """A video QA model (VideoQA, its tokenizer and answer vocabulary) with the lock that keeps calls one at a time."""

    def __init__(self, model: VideoQA, tok: Any, answers: list[str]):
        if len(answers) != model.config.n_answers:
            raise LmstackError(f"the model has {model.config.n_answers} answer classes but {len(answers)} answers")
        self.model, self.tok, self.answers = model.eval(), tok, list(answers)
        video = model.config.video
        self.frames, self.size = video.frames, video.vision.image_size
        self.lexicon = question_lexicon(self.frames) | {w for a in self.answers for w in words_of(a)}
        self.lock = threading.Lock()

    @classmethod
    def from_dir(cls, path) -> "VideoAnswerer":
        """A directory written by lmstack.multimodal.video_train.save_video_qa (`lmstack mm train-video`)."""
        return cls(*load_video_qa(path))

    @property
    def frame_pixel_cap(self) -> int:
        return max(4 * self.size * self.size, MIN_FRAME_PIXELS)

    def unknown_words(self, question: str) -> tuple[list[str], list[str]]:
        """(the question's words, those this model never saw in a training question)."""
        words = words_of(question)
        return words, [w for w in words if w not in self.lexicon]

    @torch.no_grad()
    def answer(self, clip: np.ndarray, question: str, top_k: int = 3) -> dict:
        """uint8 (F, S, S, 3) frames + a question -> {"answer", "top": [{"answer", "probability"}]}; the model's
        checks (no frames, wrong count, wrong shape) and an over-long question raise LmstackError."""
        pixels = clip_to_pixels(clip, self.frames, self.size)
        ids, mask = encode_questions(self.tok, [question], self.model.config.max_question_len)
        device = next(self.model.parameters()).device
        with self.lock:
            logits = self.model(pixels[None].to(device), ids.to(device), mask.to(device))[0]
        probs = torch.softmax(logits.float(), dim=-1)
        p, idx = probs.topk(min(top_k, len(self.answers)))
        top = [{"answer": self.answers[i], "probability": round(float(q), 6)} for q, i in zip(p.tolist(), idx.tolist())]
        return {"answer": top[0]["answer"], "top": top}


def _picture(url: str, where: str, max_pixels: int) -> np.ndarray:
    """A data URL -> uint8 (H, W, 3), or APIError(400) naming `where` and what images.py found wrong."""
    try:
        return np.asarray(decode_image(decode_data_url(url), max_pixels), dtype=np.uint8)
    except LmstackError as e:
        raise APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None


def _check_count(n: int, video: VideoAnswerer, where: str) -> None:
    if n == 0:
        raise APIError(400, f"the video has no frames ({where} holds none); send the {video.frames} frames this "
                            "model reads", param=where, code="invalid_video")
    if n > MAX_VIDEO_FRAMES:
        raise APIError(400, f"{where}: {n} frames is over this server's cap of {MAX_VIDEO_FRAMES} per request",
                       param=where, code="limit_exceeded")
    if n != video.frames:
        raise APIError(400, f"{where}: the video has {n} frames; this model reads exactly {video.frames} (it was "
                            f"trained on {video.frames}-frame clips; frames are not dropped or repeated)",
                       param=where, code="invalid_video")


def _check_size(h: int, w: int, video: VideoAnswerer, where: str) -> None:
    s = video.size
    if (h, w) != (s, s):
        raise APIError(400, f"{where}: frames are {w}x{h}; this model reads {s}x{s} frames (they are not resized: "
                            f"render or scale them to {s}x{s})", param=where, code="invalid_video")


def frames_from_list(urls: list[str], video: VideoAnswerer) -> np.ndarray:
    """video.frames as a list of data URLs -> uint8 (F, S, S, 3), or APIError(400)."""
    _check_count(len(urls), video, "video.frames")  # before decoding anything
    pictures = []
    for k, url in enumerate(urls):
        pic = _picture(url, f"video.frames.{k}", video.frame_pixel_cap)
        if pictures and pic.shape != pictures[0].shape:
            where = f"video.frames.{k}"
            raise APIError(400, f"{where} is {pic.shape[1]}x{pic.shape[0]} but video.frames.0 is "
                                f"{pictures[0].shape[1]}x{pictures[0].shape[0]}: every frame must have one size",
                           param=where, code="invalid_video")
        pictures.append(pic)
    _check_size(*pictures[0].shape[:2], video, "video.frames")
    return np.stack(pictures)


def frames_from_sheet(url: str, count: int | None, video: VideoAnswerer) -> np.ndarray:
    """video.sheet (frames side by side) with its frame count (None: width / height) -> uint8 (F, S, S, 3)."""
    if count is not None:
        if count < 0:
            raise APIError(400, f"video.frames={count} is not a frame count; give the sheet's number of frames",
                           param="video.frames", code="invalid_video")
        _check_count(count, video, "video.frames")
    sheet = _picture(url, "video.sheet", video.frame_pixel_cap * MAX_VIDEO_FRAMES)
    h, w = sheet.shape[:2]
    if w < h:
        raise APIError(400, f"video.sheet is {w}x{h}: narrower than one square {h}x{h} frame, so the video has no "
                            "frames (a sheet is its frames side by side, width = frames x height)",
                       param="video.sheet", code="invalid_video")
    if count is None:
        if w % h:
            raise APIError(400, f"video.sheet is {w}x{h}: its width is not a whole number of square {h}x{h} frames; "
                                "send video.frames with the count", param="video.sheet", code="invalid_video")
        count = w // h
        _check_count(count, video, "video.sheet")
    elif w != count * h:
        raise APIError(400, f"video.sheet is {w}x{h}: with video.frames={count} its width must be frames x height = "
                            f"{count} x {h} = {count * h}", param="video.sheet", code="invalid_video")
    _check_size(h, h, video, "video.sheet")
    return np.ascontiguousarray(sheet.reshape(h, count, h, 3).transpose(1, 0, 2, 3))


def read_video(spec: VideoInput, video: VideoAnswerer) -> np.ndarray:
    """The request's video -> uint8 (F, S, S, 3), or APIError(400) naming the field."""
    if isinstance(spec.frames, list):
        if spec.sheet is not None:
            raise APIError(400, "video has both frames (a list of pictures) and sheet; send exactly one of them",
                           param="video", code="invalid_video")
        return frames_from_list(spec.frames, video)
    if spec.sheet is None:
        what = (f"video.frames={spec.frames} is a count but there is no video.sheet" if spec.frames is not None
                else "video has neither frames nor sheet")
        raise APIError(400, f"{what}; send video.frames as a list of data URLs (data:image/png;base64,...), one per "
                            "frame, or video.sheet with video.frames = its frame count", param="video",
                       code="invalid_video")
    return frames_from_sheet(spec.sheet, spec.frames, video)


def check_question(video: VideoAnswerer, question: str) -> list[str]:
    """The question's unknown words (a warning), or APIError(400) when it is empty, too long or all unknown."""
    if not question.strip():
        raise APIError(400, "question is empty; ask something about the video", param="question")
    if len(question) > MAX_QUESTION_CHARS:
        raise APIError(400, f"question has {len(question)} characters; this server takes at most "
                            f"{MAX_QUESTION_CHARS}", param="question")
    words, unknown = video.unknown_words(question)
    if not words:
        raise APIError(400, "question has no words (letters or digits); ask something about the video",
                       param="question")
    if len(unknown) == len(words):
        raise APIError(400, "question: none of its words is one this model was trained on, so its answer would not "
                            "depend on the question; it answers the video world's questions, e.g. 'How many shapes "
                            "are there in frame 2?' or 'Which way does the red circle move?'", param="question")
    return unknown


def answer_now(video: VideoAnswerer, req: VideoAnswerRequest) -> dict:
    """The /v1/video/answers answer (runs in the worker pool)."""
    reject_lone_surrogates(req)
    unknown = check_question(video, req.question)
    clip = read_video(req.video, video)
    try:
        out = video.answer(clip, req.question, req.top_k)
    except LmstackError as e:  # a question over max_question_len tokens (the frames were checked above)
        raise APIError(400, f"question: {e}", param="question") from None
    body: dict[str, Any] = {"object": "video.answer", "answer": out["answer"], "top": out["top"],
                            "frames": int(clip.shape[0])}
    if unknown:
        body["warnings"] = [f"the question's words {', '.join(map(repr, unknown))} are not in any question this "
                            "model was trained on; the answer rests on the others"]
    return body


def add_video_routes(app: FastAPI, state: ServerState, auth: list, video: VideoAnswerer | None = None) -> None:
    """Register /v1/video/answers on `app`, behind `auth` (the API key)."""

    @app.post("/v1/video/answers", dependencies=auth)
    async def video_answers(body: VideoAnswerRequest):
        if video is None:
            raise APIError(404, "this server has no video model; start it with --video DIR (a directory written by "
                                "`lmstack mm train-video`, lmstack.multimodal.video_train.save_video_qa)")
        return await state.run(answer_now, video, body)


__all__ = ["VideoAnswerer", "VideoAnswerRequest", "VideoInput", "add_video_routes", "answer_now", "read_video",
           "question_lexicon", "MAX_VIDEO_FRAMES", "MAX_TOP_K", "MAX_QUESTION_CHARS"]
