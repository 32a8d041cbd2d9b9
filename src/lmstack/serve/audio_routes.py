"""Speech in the server: /v1/audio/transcriptions (`--asr DIR`) and /v1/audio/speech (`--tts DIR`), as OpenAI's.

POST /v1/audio/transcriptions, multipart/form-data (the openai client's `audio.transcriptions.create`):
    file             WAV, FLAC or MP3, checked by serve/audio_input.py (format from the content, length from the
                     header, 8-48 kHz resampled to 16 kHz, stereo averaged; every refusal a 400 naming it, 413 for
                     more than --max_audio_bytes)
    model            any name: the server has one recognizer, and OpenAI's answer does not echo it
    language         "en" or absent (the recognizer transcribes English; another language is a 400 naming en)
    response_format  json (default: {"text"}), text, verbose_json ({"task", "language", "duration", "text"}),
                     srt or vtt (one cue over the whole clip: the recognizer gives no timestamps)
    temperature      0 or absent: decoding is deterministic (greedy or beam); other values are a 400
    beam             lmstack extension: beam width, 1 (greedy) to MAX_BEAM (default DEFAULT_BEAM)
`prompt`, `stream`, timestamps and the other OpenAI fields are a 400 that names the field: silently ignoring
them would answer a different question than the one asked.

POST /v1/audio/speech, JSON (the openai client's `audio.speech.create`): {"model", "input", "voice",
"response_format", "speed", "seed"}: `input` 1 to the synthesizer's max_chars characters; `voice` one of its voices
(a 400 lists them); `response_format` mp3 (default, as OpenAI's), wav, flac or pcm (raw 16-bit little-endian
mono at 16 kHz, not OpenAI's 24 kHz); opus and aac are a 400 naming these; `speed` 1.0 only unless the synthesizer
takes a speed; `seed` (extension, default 0) makes the audio reproducible. The body is the audio file.

Without its model a route answers 404 naming the flag that loads one. Both routes take the server's API key, and
run decoding and the model in the server's worker pool (ServerState.run), so a long transcription never stalls
the event loop; one model call runs at a time per model (a lock), since a model's modules are not reentrant.
With --guard, /v1/audio/speech input the moderator blocks is a 400 with code content_policy_violation;
transcripts are not moderated (they are what the user said).

Usage (server side):
    app = create_app(aengine, config, asr=SpeechRecognizer.from_dir("runs/asr"),
                     tts=SpeechSynthesizer.from_dir("runs/tts"), audio_limits=AudioLimits(max_seconds=30))
"""
from __future__ import annotations

import io
import json
import threading
from typing import Any

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, write_wav
from lmstack.serve.audio_input import AudioLimits, AudioRejected
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.guard_routes import refuse_flagged
from lmstack.serve.limits import reject_lone_surrogates

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
SPEECH_FORMATS = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}
DEFAULT_BEAM, MAX_BEAM = 1, 8
_FORM_FIELDS = ("file", "model", "language", "response_format", "temperature", "beam", "timestamp_granularities[]",
                "timestamp_granularities")
GRANULARITIES = ("word",)
CUE_WORDS = 7
"""Words per srt/vtt cue when the recognizer gives word timestamps."""
_LANGUAGES = {"en": "english", "english": "english"}
MULTIPART_OVERHEAD = 64 << 10
"""Bytes a multipart body may carry beyond its file (boundaries, headers, the other fields)."""


class SpeechRequest(BaseModel):
    """The /v1/audio/speech body; unknown fields are a 400 naming them, as in the other routes."""
    model_config = ConfigDict(extra="forbid")
    input: str
    voice: str
    model: str | None = None
    response_format: str = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    seed: int = Field(default=0, ge=0, le=2 ** 31 - 1)
    """lmstack extension: the synthesizer's random seed (the same request gives the same audio)."""


class ServedModel:
    """A model behind a route, with the lock that keeps its calls one at a time."""

    def __init__(self, model: Any):
        self.model = model
        self.lock = threading.Lock()


def _form_value(form, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a plain form field, not a file", param=name)
    return value


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def cues(text: str, duration: float, words: list | None) -> list[tuple[float, float, str]]:
    """srt/vtt cues: CUE_WORDS words each, from the first word's start to the last one's end; without word
    timestamps (a recognizer that gives none, or no words) one cue over the whole clip."""
    if not words:
        return [(0.0, duration, text)]
    return [(group[0][1], group[-1][2], " ".join(w[0] for w in group))
            for group in (words[i:i + CUE_WORDS] for i in range(0, len(words), CUE_WORDS))]


def transcription_response(text: str, duration: float, language: str, fmt: str, words: list | None = None,
                           granularities: tuple = ()) -> Response:
    """The answer in the asked format. verbose_json carries `words` ([{word, start, end}]) when "word" is in
    `granularities`; srt/vtt give one cue per CUE_WORDS words with their times (`cues`)."""
    if fmt == "json":
        return Response(_json({"text": text}), media_type="application/json")
    if fmt == "verbose_json":
        payload = {"task": "transcribe", "language": language, "duration": round(duration, 3), "text": text}
        if "word" in granularities:
            payload["words"] = [{"word": w, "start": round(a, 3), "end": round(b, 3)} for w, a, b in words or []]
        return Response(_json(payload), media_type="application/json")
    if fmt == "text":
        return PlainTextResponse(text)
    parts = cues(text, duration, words)
    if fmt == "srt":
        return PlainTextResponse("".join(f"{i}\n{_timestamp(a, ',')} --> {_timestamp(b, ',')}\n{t}\n\n"
                                         for i, (a, b, t) in enumerate(parts, 1)))
    return PlainTextResponse("WEBVTT\n\n" + "".join(f"{_timestamp(a, '.')} --> {_timestamp(b, '.')}\n{t}\n\n"
                                                      for a, b, t in parts), media_type="text/vtt")


def _json(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


async def read_transcription_form(request: Request, limits: AudioLimits) -> tuple[bytes, str | None, dict]:
    """(file bytes, file name, the checked fields) of a transcription request, or APIError(400) naming the field."""
    try:
        form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS) + 8)
    except Exception as e:  # noqa: BLE001 - Starlette raises its own types for a malformed multipart body
        raise APIError(400, f"the body is not a readable multipart/form-data form: {e}", param="file") from None
    try:
        fields = checked_fields(form)
        upload = form["file"]
        data = await upload.read(limits.max_bytes + 1)  # never more than the limit plus the byte that proves it
        return data, upload.filename, fields
    finally:
        await form.close()  # the upload's spooled temporary file, whatever was refused


def checked_fields(form) -> dict:
    """The transcription form's fields, checked: {"response_format", "language", "beam"}, or APIError(400)."""
    unknown = sorted(set(form.keys()) - set(_FORM_FIELDS))
    if unknown:
        raise APIError(400, f"{unknown[0]} is not supported by this server; /v1/audio/transcriptions takes "
                            f"{', '.join(_FORM_FIELDS)}", param=unknown[0])
    upload = form.get("file")
    if upload is None:
        raise APIError(400, "file is missing; send the audio as a multipart/form-data part named file", param="file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file must be an uploaded file (a multipart part with a filename), not a text field",
                       param="file")
    fmt = _form_value(form, "response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise APIError(400, f"response_format={fmt!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}",
                       param="response_format")
    language = (_form_value(form, "language") or "en").strip().lower()
    if language not in _LANGUAGES:
        raise APIError(400, f"language={language!r} is not supported; this recognizer transcribes English (en)",
                       param="language")
    temperature = _form_value(form, "temperature")
    try:
        if temperature is not None and float(temperature) != 0.0:
            raise APIError(400, f"temperature={temperature} is not supported; decoding is deterministic (greedy or "
                                "beam search): send 0 or leave it out", param="temperature")
    except ValueError:
        raise APIError(400, f"temperature={temperature!r} is not a number", param="temperature") from None
    beam_text = _form_value(form, "beam")
    beam = DEFAULT_BEAM
    if beam_text is not None:
        if not beam_text.strip().isdecimal() or not 1 <= int(beam_text) <= MAX_BEAM:
            raise APIError(400, f"beam={beam_text!r} is not allowed; give an integer from 1 to {MAX_BEAM}",
                           param="beam")
        beam = int(beam_text)
    granularities = []
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        for value in form.getlist(name):
            if not isinstance(value, str) or value not in GRANULARITIES:
                raise APIError(400, f"{name}={value!r} is not supported; this server gives word timestamps "
                                    f"(send word)", param=name)
            if fmt != "verbose_json":
                raise APIError(400, f"{name} is not supported with response_format={fmt}; word timestamps come "
                                    "in verbose_json", param=name)
            granularities.append(value)
    return {"response_format": fmt, "language": _LANGUAGES[language], "beam": beam,
            "granularities": tuple(granularities)}


def transcribe_now(asr: ServedModel, limits: AudioLimits, data: bytes, filename: str | None, fields: dict) -> Response:
    """Decode, check and transcribe one upload (runs in the worker pool)."""
    try:
        samples = limits.decode(data, filename, getattr(asr.model, "max_seconds", None))
    except AudioRejected as e:
        raise APIError(e.status, str(e), param="file", code="invalid_audio") from None
    timed = "word" in fields["granularities"] or fields["response_format"] in ("srt", "vtt")
    words = None
    with asr.lock:
        if timed and hasattr(asr.model, "transcribe_words"):
            text, words = asr.model.transcribe_words(samples, beam=fields["beam"])
        elif "word" in fields["granularities"]:
            raise APIError(400, "this speech recognizer gives no word timestamps", param="timestamp_granularities[]")
        else:
            text = asr.model.transcribe(samples, beam=fields["beam"])
    return transcription_response(text, len(samples) / SAMPLE_RATE, fields["language"], fields["response_format"],
                                  words, fields["granularities"])


def encode_speech(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """float samples in [-1, 1] -> the bytes of `fmt` (wav, pcm, flac, mp3)."""
    x = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if fmt == "wav":
        return write_wav(x, rate)
    if fmt == "pcm":
        return (np.round(x * 32767.0)).astype("<i2").tobytes()
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt.upper())
    return buf.getvalue()


def check_speech(tts: Any, req: SpeechRequest) -> None:
    """APIError(400) naming the field for what the synthesizer cannot say (runs in the worker pool)."""
    reject_lone_surrogates(req)
    if req.response_format not in SPEECH_FORMATS:
        raise APIError(400, f"response_format={req.response_format!r} is not supported; use one of "
                            f"{', '.join(SPEECH_FORMATS)} (wav is uncompressed)", param="response_format")
    if not req.input.strip():
        raise APIError(400, "input is empty; give the text to speak", param="input")
    max_chars = int(getattr(tts, "max_chars", 4096))
    if len(req.input) > max_chars:
        raise APIError(400, f"input has {len(req.input)} characters; this synthesizer speaks at most {max_chars}",
                       param="input")
    voices = list(tts.voices)
    if req.voice not in voices:
        raise APIError(400, f"voice={req.voice!r} is not one of this synthesizer's voices: {', '.join(voices)}",
                       param="voice")
    if req.speed != 1.0:
        raise APIError(400, f"speed={req.speed:g} is not supported; this synthesizer speaks at speed 1.0 only",
                       param="speed")


def speak_now(tts: ServedModel, req: SpeechRequest, guard: Any = None) -> Response:
    """The /v1/audio/speech answer (runs in the worker pool); with a guard, blocked input is a 400."""
    check_speech(tts.model, req)
    refuse_flagged(guard, req.input, "input", "speak")
    try:
        with tts.lock:
            samples, rate = tts.model.speak(req.input, voice=req.voice, seed=req.seed)
    except LmstackError as e:  # text the model cannot say (characters it never learned): it names them
        raise APIError(400, str(e), param="input") from None
    return Response(encode_speech(samples, rate, req.response_format),
                    media_type=SPEECH_FORMATS[req.response_format])


def add_audio_routes(app: FastAPI, state: ServerState, auth: list, asr: Any = None, tts: Any = None,
                     limits: AudioLimits | None = None, guard: Any = None) -> None:
    """Register /v1/audio/transcriptions and /v1/audio/speech on `app`, each behind `auth` (the API key);
    `guard` (a safety.guard.Guard) judges the text to speak first."""
    limits = limits or AudioLimits()
    served_asr = ServedModel(asr) if asr is not None else None
    served_tts = ServedModel(tts) if tts is not None else None

    @app.post("/v1/audio/transcriptions", dependencies=auth)
    async def transcriptions(request: Request):
        if served_asr is None:
            raise APIError(404, "this server has no speech recognizer; start it with --asr DIR (a directory written "
                                "by lmstack.multimodal.asr.SpeechRecognizer.save)")
        data, filename, fields = await read_transcription_form(request, limits)
        return await state.run(transcribe_now, served_asr, limits, data, filename, fields)

    @app.post("/v1/audio/speech", dependencies=auth)
    async def speech(body: SpeechRequest):
        if served_tts is None:
            raise APIError(404, "this server has no speech synthesizer; start it with --tts DIR (a directory "
                                "written by lmstack.multimodal.tts.SpeechSynthesizer.save)")
        return await state.run(speak_now, served_tts, body, guard)


def upload_limit(config_bytes: int, limits: AudioLimits) -> int:
    """The body limit of the upload route: its audio limit plus the multipart framing, at least the server's."""
    return max(config_bytes, limits.max_bytes + MULTIPART_OVERHEAD)

