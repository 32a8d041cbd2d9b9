"""The VALL-E-style TTS (multimodal/tts.py): the served SpeechSynthesizer API, its refusals, and that the AR and
NAR losses learn."""
import json

import numpy as np
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.tts import CodecLM, SpeechSynthesizer, TTSConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth():
    return SpeechSynthesizer.random(tiny=True, seed=0)


def test_speak_returns_16k_float_audio_and_is_seeded(synth):
    a, rate = synth.speak("4217 Ada.", seed=3)
    assert rate == 16000 and a.dtype == np.float32 and a.ndim == 1
    assert a.size % synth.codec.config.hop == 0 and a.size >= synth.config.min_frames * synth.codec.config.hop
    assert np.abs(a).max() <= 1.0
    b, _ = synth.speak("4217 Ada.", seed=3)
    assert np.array_equal(a, b)
    assert synth.voices == ["en"] and synth.max_chars == 80
    assert synth.speak("4217 Ada.", voice="en", seed=3)[0].size == a.size


def test_save_and_from_dir_round_trip(synth, tmp_path):
    synth.save(tmp_path / "tts")
    names = {p.name for p in (tmp_path / "tts").iterdir()}
    assert {"config.json", "codec.safetensors", "tts.safetensors", "tokenizer.json"} <= names
    again = SpeechSynthesizer.from_dir(tmp_path / "tts")
    assert np.array_equal(again.speak("hello", seed=1)[0], synth.speak("hello", seed=1)[0])


def test_from_dir_names_what_is_missing(synth, tmp_path):
    with pytest.raises(LmstackError, match="not a directory"):
        SpeechSynthesizer.from_dir(tmp_path / "nothing")
    synth.save(tmp_path / "m")
    (tmp_path / "m" / "tts.safetensors").unlink()
    with pytest.raises(LmstackError, match="missing tts.safetensors"):
        SpeechSynthesizer.from_dir(tmp_path / "m")
    synth.save(tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(LmstackError, match="not an lmstack TTS config"):
        SpeechSynthesizer.from_dir(tmp_path / "m2")


@pytest.mark.parametrize("text, message", [("", "empty"), ("   ", "empty"), ("a" * 81, "81 characters"),
                                           ("héllo", "'é'"), ("price: 5€", "':€'")])
def test_bad_text_is_refused_by_name(synth, text, message):
    with pytest.raises(LmstackError, match=message):
        synth.speak(text)


def test_bad_voice_and_sampling_are_refused(synth):
    with pytest.raises(LmstackError, match="unknown voice 'fr'"):
        synth.speak("hi", voice="fr")
    with pytest.raises(LmstackError, match="temperature"):
        synth.speak("hi", temperature=-1)


def test_max_frames_guards_the_length():
    torch.manual_seed(0)
    lm = CodecLM(TTSConfig(d_model=16, n_layers=1, nar_layers=1, n_heads=2, max_frames=12, min_frames=12), 10, 2, 8)
    codes = lm.generate([1, 2, 3], temperature=1.0, top_k=0, seed=0)
    assert codes.shape == (2, 12)  # <eos> is banned until min_frames, and max_frames stops it there
    assert int(codes.min()) >= 0 and int(codes.max()) < 8


def test_ar_and_nar_losses_fall_on_a_tiny_set():
    torch.manual_seed(0)
    lm = CodecLM(TTSConfig(d_model=32, n_layers=1, nar_layers=1, n_heads=2, max_frames=20), 6, 3, 8)
    texts = [[1, 2], [3, 4, 5], [0]]
    codes = [torch.randint(0, 8, (3, n)) for n in (6, 9, 4)]
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = lm.ar_loss(texts, codes) + lm.nar_loss(texts, codes, gen)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first  # memorises the three utterances (AR codes and <eos>, NAR codebooks)
    # after fitting, greedy AR decoding reproduces an utterance's first codebook and its length
    out = lm.generate(texts[1], temperature=0.0, top_k=0, seed=0)
    assert out.shape == codes[1].shape and torch.equal(out[0], codes[1][0])


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    espeak = pytest.importorskip("lmstack.multimodal.espeak")
    if not espeak.available():
        pytest.skip("espeak-ng is not installed (pip install espeakng-loader)")
    from lmstack.multimodal.speech_world import write_speech_world

    out = tmp_path_factory.mktemp("speech")
    write_speech_world(out, 10, seed=0)
    return out


def test_cli_train_codec_train_tts_and_speak(speech_dir, tmp_path):
    from lmstack.cli import main
    from lmstack.multimodal.audio import read_wav

    tiny_codec = ["--codec.channels", "4", "--codec.latent_dim", "8", "--codec.n_q", "2", "--codec.codebook_size",
                  "16"]
    assert main(["mm", "train-codec", "--data", str(speech_dir), "--out", str(tmp_path / "codec"), "--steps", "2",
                 "--eval_utterances", "1", *tiny_codec]) == 0
    assert (tmp_path / "codec" / "codec.safetensors").is_file()
    assert main(["mm", "train-tts", "--data", str(speech_dir), "--codec", str(tmp_path / "codec"), "--out",
                 str(tmp_path / "tts"), "--voice", "", "--prosody", "", "--steps", "2", "--batch_size", "2",
                 "--tts.d_model", "16", "--tts.n_layers", "1", "--tts.nar_layers", "1", "--tts.n_heads", "2"]) == 0
    synth = SpeechSynthesizer.from_dir(tmp_path / "tts")
    assert synth.voices == ["any"] and synth.codec.config.n_q == 2
    text = json.loads((speech_dir / "train.jsonl").read_text().splitlines()[0])["text"][:20]
    assert main(["mm", "speak", text, "--model", str(tmp_path / "tts"), "--out", str(tmp_path / "x.wav")]) == 0
    samples, rate = read_wav((tmp_path / "x.wav").read_bytes())
    assert rate == 16000 and samples.size > 0


def test_cli_refuses_missing_data_and_model(tmp_path):
    from lmstack.cli import main

    assert main(["mm", "train-codec", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) != 0
    assert main(["mm", "speak", "hi", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.wav")]) != 0
    assert not (tmp_path / "x.wav").exists()


def test_front_end_writes_numbers_as_words_before_tokenising(synth):
    assert synth.config.normalize
    assert synth.text_ids(" 12 ") == synth.tokenizer.encode("twelve")
    raw = SpeechSynthesizer(synth.codec, synth.lm, synth.tokenizer, TTSConfig(**{**synth.config.__dict__,
                                                                                 "normalize": False}))
    assert raw.text_ids("12") == synth.tokenizer.encode("12")
    short = SpeechSynthesizer(synth.codec, synth.lm, synth.tokenizer, TTSConfig(**{**synth.config.__dict__,
                                                                                   "max_chars": 10}))
    with pytest.raises(LmstackError, match="39 characters long once its numbers are written as words"):
        short.speak("4217")  # 4 characters typed, 39 to say: the model's length limit is on what it reads


def test_config_saved_before_the_front_end_loads_with_it_off(synth, tmp_path):
    synth.save(tmp_path / "new")
    assert SpeechSynthesizer.from_dir(tmp_path / "new").config.normalize
    synth.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["tts"]["normalize"], meta["tts"]["dropout"]  # the fields an older lmstack did not write
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = SpeechSynthesizer.from_dir(tmp_path / "old")
    assert not old.config.normalize and old.config.dropout == 0.0
    assert old.text_ids("12") == old.tokenizer.encode("12")  # a digits-trained model still reads digits


def test_dropout_acts_in_training_only():
    with pytest.raises(ConfigError, match="dropout"):
        TTSConfig(dropout=1.0)
    torch.manual_seed(0)
    lm = CodecLM(TTSConfig(d_model=16, n_layers=1, nar_layers=1, n_heads=2, max_frames=20, dropout=0.5), 6, 2, 8)
    texts, codes = [[1, 2]], [torch.randint(0, 8, (2, 6))]
    lm.train()
    with torch.no_grad():
        assert float(lm.ar_loss(texts, codes)) != float(lm.ar_loss(texts, codes))
    lm.eval()
    with torch.no_grad():
        assert float(lm.ar_loss(texts, codes)) == float(lm.ar_loss(texts, codes))
