"""/v1/audio/transcriptions and /v1/audio/speech through the official openai client on a live server, with real
(random, tiny) recognizer and synthesizer directories; and every refusal through TestClient, each a 400 (or 413)
naming the problem, with a good request answered 200 right after it."""
import io
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from lmstack.multimodal.asr import SpeechRecognizer
from lmstack.multimodal.audio import read_wav, write_wav
from lmstack.multimodal.espeak import synthesize
from lmstack.multimodal.tts import SpeechSynthesizer
from lmstack.multimodal.whisper import WhisperConfig
from lmstack.safety.guard import Guard, GuardConfig
from lmstack.serve.audio_input import AudioLimits, decode_audio
from lmstack.serve.commands import build_app
from lmstack.serve.engine_bridge import ServerConfig

from serve_helpers import start_server

openai = pytest.importorskip("openai")

KEY = "sk-audio"
LIMITS = AudioLimits(max_seconds=30.0, max_bytes=400_000)


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    cfg = WhisperConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, n_text_ctx=24)
    path = SpeechRecognizer.random(cfg, seed=0).save(tmp_path_factory.mktemp("asr") / "asr")
    return SpeechRecognizer.from_dir(path)


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    path = SpeechSynthesizer.random(tiny=True, seed=0).save(tmp_path_factory.mktemp("tts") / "tts")
    return SpeechSynthesizer.from_dir(path)


@pytest.fixture(scope="module")
def speech():
    samples, rate = synthesize("the cat sat on a mat")
    return samples, rate


@pytest.fixture(scope="module")
def live(model_dir, asr, tts):
    srv = start_server(model_dir, api_key=KEY, engine={"asr": asr, "tts": tts, "audio_limits": LIMITS})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tc(model_dir, asr, tts):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2, asr=asr, tts=tts,
                       audio_limits=LIMITS)
    with TestClient(app) as c:
        yield c


def encoded(samples, rate=16000, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def test_transcriptions_through_openai_client(client, asr, speech):
    samples, rate = speech
    for fmt in ("WAV", "FLAC", "MP3"):
        data = encoded(samples, rate, fmt)
        expected = asr.transcribe(decode_audio(data, None))
        resp = client.audio.transcriptions.create(file=(f"speech.{fmt.lower()}", data), model="whisper-1")
        assert resp.text == expected and expected  # the recognizer's greedy text on the decoded upload
    data = encoded(samples, rate)
    text = client.audio.transcriptions.create(file=("s.wav", data), model="asr", response_format="text",
                                              language="en")
    assert text.strip() == asr.transcribe(decode_audio(data, None))
    verbose = client.audio.transcriptions.create(file=("s.wav", data), model="asr", response_format="verbose_json")
    assert verbose.duration == pytest.approx(len(samples) / rate, abs=1e-3) and verbose.language == "english"
    srt = client.audio.transcriptions.create(file=("s.wav", data), model="asr", response_format="srt")
    cue_words = [w for cue in srt.strip().split("\n\n") for w in cue.split("\n")[2].split()]
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0")
    assert cue_words == asr.transcribe(decode_audio(data, None)).split()
    beam = client.audio.transcriptions.create(file=("s.wav", data), model="asr", extra_body={"beam": 2})
    assert beam.text == asr.transcribe(decode_audio(data, None), beam=2)


def test_word_timestamps_through_openai_client(client, asr, speech):
    """verbose_json with timestamp_granularities=["word"] carries OpenAI's words: the transcript's words with
    monotonic times inside the clip; vtt cues carry the same times (their quality is the benchmark's job)."""
    data = encoded(*speech)
    samples = decode_audio(data, None)
    text, expected = asr.transcribe_words(samples)
    resp = client.audio.transcriptions.create(file=("s.wav", data), model="asr", response_format="verbose_json",
                                              timestamp_granularities=["word"])
    words = [(w.word, w.start, w.end) for w in resp.words]
    assert resp.text == text and [w for w, _, _ in words] == text.split() and words
    assert [(w, round(a, 3), round(b, 3)) for w, a, b in expected] == words
    times = [t for _, a, b in words for t in (a, b)]
    assert all(a <= b for a, b in zip(times, times[1:])) and 0 <= times[0] and times[-1] <= resp.duration
    vtt = client.audio.transcriptions.create(file=("s.wav", data), model="asr", response_format="vtt")
    first = vtt.split("\n\n")[1].split("\n")[0]
    assert vtt.startswith("WEBVTT") and first.startswith("00:00:00.000 --> ") and first.endswith(
        f"{int(round(expected[min(6, len(expected) - 1)][2] * 1000)) % 1000:03d}")


def test_models_lists_the_speech_models_it_serves(client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "asr", "tts"]


def test_speech_through_openai_client(client, tts):
    ref, rate = tts.speak("hello there", voice="en", seed=3)
    wav = client.audio.speech.create(model="tts-1", voice="en", input="hello there", response_format="wav",
                                     extra_body={"seed": 3}).content
    got, got_rate = read_wav(wav)
    assert got_rate == rate == 16000
    assert np.abs(got - np.clip(ref, -1, 1)).max() <= 1 / 32767 + 1e-6  # the synthesizer's audio, 16-bit
    pcm = client.audio.speech.create(model="tts-1", voice="en", input="hello there", response_format="pcm",
                                     extra_body={"seed": 3}).content
    assert pcm == wav[44:]  # raw 16-bit PCM: the WAV's data without its header
    mp3 = client.audio.speech.create(model="tts-1", voice="en", input="hello there", extra_body={"seed": 3}).content
    decoded, mp3_rate = sf.read(io.BytesIO(mp3), dtype="float32")
    assert mp3_rate == 16000 and abs(len(decoded) - len(ref)) <= 2304  # mp3 by default, as OpenAI's


def test_api_key_guards_both_routes(live, speech):
    data = encoded(*speech)
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.post("/v1/audio/transcriptions", files={"file": ("s.wav", data)}).status_code == 401
        assert http.post("/v1/audio/speech", json={"input": "hi", "voice": "en"}).status_code == 401


def test_a_slow_transcription_leaves_the_event_loop_free(model_dir, asr, speech):
    """The model runs in the worker pool: /health answers while a transcription is held mid-call."""
    started, release = threading.Event(), threading.Event()

    class HeldRecognizer:  # the real recognizer, held at the start of each call until released
        max_seconds = asr.max_seconds

        def transcribe(self, samples, beam=1):
            started.set()
            release.wait(10)
            return asr.transcribe(samples, beam=beam)

    srv = start_server(model_dir, engine={"asr": HeldRecognizer()})
    try:
        data, out = encoded(*speech), {}

        def upload():
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                out["r"] = http.post("/v1/audio/transcriptions", files={"file": ("s.wav", data)})

        worker = threading.Thread(target=upload)
        worker.start()
        assert started.wait(10)
        t0 = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=5) as http:
            assert http.get("/health").status_code == 200
        assert time.monotonic() - t0 < 2.0
        release.set()
        worker.join(20)
        assert out["r"].status_code == 200 and out["r"].json()["text"] == asr.transcribe(decode_audio(data, None))
    finally:
        release.set()
        srv.stop()


def _wav_header_minutes(minutes: int) -> bytes:
    data = bytearray(write_wav(0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440), 16000))
    n = minutes * 60 * 16000 * 2
    data[40:44], data[4:8] = n.to_bytes(4, "little"), (n + 36).to_bytes(4, "little")
    return bytes(data)


def _tone(seconds, rate=16000):
    return (0.3 * np.sin(np.arange(int(seconds * rate)) / rate * 2 * np.pi * 300)).astype(np.float32)


# (id, files, form fields, status, words the message must hold)
UPLOAD_CASES = [
    ("text_named_wav", {"file": ("speech.wav", b"just some text, not audio\n" * 8)}, {}, 400,
     ["text", "WAV, FLAC or MP3"]),
    ("ogg_named_wav", {"file": ("speech.wav", encoded(_tone(0.5), fmt="OGG"))}, {}, 400, ["OGG", "WAV, FLAC or MP3"]),
    ("ninety_minute_header", {"file": ("long.wav", _wav_header_minutes(90))}, {}, 400, ["5400.0 s", "header"]),
    ("silence", {"file": ("quiet.wav", write_wav(np.zeros(16000)))}, {}, 400, ["silent"]),
    ("4_khz", {"file": ("low.wav", encoded(_tone(0.5, 4000), 4000))}, {}, 400, ["4000 Hz", "8000-48000"]),
    ("zero_length", {"file": ("empty.wav", b"")}, {}, 400, ["empty"]),
    ("longer_than_the_model", {"file": ("long.wav", write_wav(_tone(7.0)))}, {}, 400,
     ["7.0 s", "longest input of this model"]),
    ("over_max_bytes", {"file": ("big.wav", write_wav(_tone(13.0)))}, {}, 413, ["--max_audio_bytes"]),
    ("missing_file", None, {"model": "asr"}, 400, ["file is missing"]),
    ("file_as_text_field", None, {"file": "abc"}, 400, ["uploaded file"]),
    ("format_json_lines", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"response_format": "json_lines"}, 400,
     ["json_lines", "verbose_json"]),
    ("language_fr", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"language": "fr"}, 400, ["'fr'", "en"]),
    ("temperature_0.7", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"temperature": "0.7"}, 400, ["temperature"]),
    ("prompt_field", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"prompt": "hello"}, 400,
     ["prompt is not supported"]),
    ("beam_99", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"beam": "99"}, 400, ["beam", "1 to 8"]),
    ("temperature_not_a_number", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"temperature": "warm"}, 400,
     ["'warm'", "not a number"]),
    ("stream_true", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"stream": "true"}, 400,
     ["stream is not supported"]),
    ("word_timestamps", {"file": ("s.wav", write_wav(_tone(0.5)))}, {"timestamp_granularities[]": "word"}, 400,
     ["timestamp_granularities[] is not supported"]),
    ("segment_timestamps", {"file": ("s.wav", write_wav(_tone(0.5)))},
     {"timestamp_granularities[]": "segment", "response_format": "verbose_json"}, 400, ["'segment'", "word"]),
]


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_upload_refusals_then_a_good_upload(tc, case, speech):
    _, files, fields, status, words = case
    # without files the form goes urlencoded, which the route reads too (and finds no file part in)
    r = tc.post("/v1/audio/transcriptions", files=files, data=fields) if files else \
        tc.post("/v1/audio/transcriptions", data=fields)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    good = tc.post("/v1/audio/transcriptions", files={"file": ("s.wav", encoded(*speech))})
    assert good.status_code == 200 and isinstance(good.json()["text"], str)


SPEECH_CASES = [
    ("unknown_voice", {"input": "hello", "voice": "alloy"}, ["'alloy'", "en"]),
    ("empty_input", {"input": "  ", "voice": "en"}, ["input is empty"]),
    ("over_long_input", {"input": "a" * 81, "voice": "en"}, ["81 characters", "80"]),
    ("unspeakable_characters", {"input": "caf\u00e9 \u00fcber", "voice": "en"}, ["cannot speak"]),
    ("opus_format", {"input": "hello", "voice": "en", "response_format": "opus"}, ["opus", "wav"]),
    ("speed_2", {"input": "hello", "voice": "en", "speed": 2.0}, ["speed=2", "1.0"]),
    ("unknown_field", {"input": "hello", "voice": "en", "instructions": "whisper"}, ["instructions"]),
    ("missing_voice", {"input": "hello"}, ["voice"]),
]


@pytest.mark.parametrize("case", SPEECH_CASES, ids=[c[0] for c in SPEECH_CASES])
def test_speech_refusals_then_a_good_request(tc, case):
    _, body, words = case
    r = tc.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    good = tc.post("/v1/audio/speech", json={"input": "hello", "voice": "en", "response_format": "wav"})
    assert good.status_code == 200 and good.headers["content-type"] == "audio/wav" and good.content[:4] == b"RIFF"


def test_routes_without_their_model_name_the_flag(model_dir):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2)
    with TestClient(app) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("s.wav", write_wav(_tone(0.5)))})
        assert r.status_code == 404 and "--asr DIR" in r.json()["error"]["message"]
        r = c.post("/v1/audio/speech", json={"input": "hello", "voice": "en"})
        assert r.status_code == 404 and "--tts DIR" in r.json()["error"]["message"]


def test_the_upload_route_has_its_own_body_limit(model_dir, asr):
    """--max_request_bytes bounds JSON bodies; an audio upload may be as large as --max_audio_bytes instead."""
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama", max_request_bytes=100_000),
                       max_num_seqs=2, asr=asr, audio_limits=AudioLimits(max_seconds=30.0, max_bytes=400_000))
    wav = write_wav(_tone(9.0))  # 288 KB: over the JSON limit, under the audio one
    with TestClient(app) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("s.wav", wav)})
        # past the body limit, so the decoder saw it: refused for its length (the model takes 6 s), not its size
        assert r.status_code == 400 and "longest input of this model" in r.json()["error"]["message"]
        r = c.post("/v1/audio/speech", content=b'{"input": "' + b"a" * 200_000 + b'", "voice": "en"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "100000 bytes" in r.json()["error"]["message"]
        r = c.post("/v1/audio/transcriptions", files={"file": ("s.wav", write_wav(_tone(16.0)))})  # 512 KB
        assert r.status_code == 413 and "465536 bytes" in r.json()["error"]["message"]  # 400_000 + 64 KiB framing


def test_guard_refuses_flagged_speech_input_and_speaks_the_next(model_dir, tts):
    app, _ = build_app(str(model_dir), ServerConfig(model_name="tiny-llama"), max_num_seqs=2, tts=tts,
                       guard=Guard(GuardConfig(moderator="keyword")))
    with TestClient(app) as c:
        body = {"model": "tts-1", "voice": "en", "response_format": "wav"}
        r = c.post("/v1/audio/speech", json={**body, "input": "brew the forbidden potion at midnight"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "content_policy_violation" and err["param"] == "input"
        ok = c.post("/v1/audio/speech", json={**body, "input": "hello there"})
        assert ok.status_code == 200 and ok.content[:4] == b"RIFF"
