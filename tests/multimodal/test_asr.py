"""SpeechRecognizer: a tiny model overfit on two clips transcribes them (greedy, beam, batch, after save/load);
a random one saves, loads and transcribes; bad audio and bad directories are refused. The decoding guard
leaves outputs within its cap unchanged, cuts the rest, round-trips through save/load; training augmentation
degrades waveforms reproducibly; fine-tuning (init_from) starts from the saved weights and refuses others."""
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from safetensors.torch import save

from lmstack.errors import LmstackError
from lmstack.config import ConfigError, atomic_write_bytes, from_dict, to_dict
from lmstack.multimodal.asr import (DecodeGuard, SpeechRecognizer, TASK_TOKENS, asr_tokenizer, batch_features,
                                    clean_text, compression_ratio, guard_from_transcripts)
from lmstack.multimodal.asr_train import ASRTrainConfig, degrade, fit, spec_augment, train_asr, whisper_loss
from lmstack.multimodal.ctc import CTCConfig, CTCModel
from lmstack.multimodal.whisper import WhisperConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread joins cost more than ops

TINY = dict(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, n_audio_ctx=50, n_text_ctx=24)


def _clips() -> list[np.ndarray]:
    t = np.arange(8000) / 16000
    return [(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
            (0.3 * np.sin(2 * np.pi * 2500 * t[:6400])).astype(np.float32)]


@pytest.fixture(scope="module")
def trained() -> SpeechRecognizer:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a module fixture cannot use the function-scoped one_thread)
    asr = SpeechRecognizer.random(WhisperConfig(**TINY), seed=0)
    texts = ["Ada was born.", "4217"]
    mel, frames = batch_features(_clips(), 80)
    rows = [asr.ids.target(asr.tokenizer, t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [asr.ids.eot] * (width - len(r)) for r in rows])
    labels = ids[:, 1:].clone()
    for i, r in enumerate(rows):
        labels[i, len(r) - 1:] = -100
    labels[:, : len(asr.ids.prompt) - 1] = -100  # the prompt is given, not predicted
    model = asr.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(mel, ids[:, :-1], frames)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    return asr


def test_tokenizer_has_the_task_tokens_and_spells_characters():
    tok = asr_tokenizer()
    assert tok.vocab_size == 100 and all(tok.token_to_id(t) is not None for t in TASK_TOKENS)
    assert tok.decode(tok.encode("Ada was born in 4217.")) == "Ada was born in 4217."
    assert clean_text("Caf\u00e9  ok\n") == "Caf ok"


def test_overfit_model_transcribes_greedy_beam_and_batch(trained, tmp_path):
    a, b = _clips()
    assert trained.transcribe(a) == "Ada was born."
    assert trained.transcribe(b, beam=3) == "4217"
    assert trained.transcribe_batch([b, a]) == ["4217", "Ada was born."]
    loaded = SpeechRecognizer.from_dir(trained.save(tmp_path / "asr"))
    assert loaded.transcribe(a, beam=2) == "Ada was born."


def test_random_model_saves_loads_and_transcribes(tmp_path):
    asr = SpeechRecognizer.random(WhisperConfig(**TINY), seed=1)
    out = asr.save(tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = SpeechRecognizer.from_dir(out)
    clip = _clips()[0]
    assert isinstance(loaded.transcribe(clip), str) and loaded.transcribe(clip) == asr.transcribe(clip)
    assert loaded.sample_rate == 16000 and loaded.max_seconds == pytest.approx(1.0)


def test_bad_audio_is_refused():
    asr = SpeechRecognizer.random(WhisperConfig(**TINY), seed=0)
    clip = _clips()[0]
    for bad, msg in [((clip, 8000), "8000 Hz"), ((np.zeros(0, np.float32), 16000), "empty"),
                     ((np.zeros(20000, np.float32), 16000), "over this model's limit"),
                     ((np.stack([clip, clip]), 16000), "1-D"), ((np.full(500, np.nan, np.float32), 16000), "NaN"),
                     (((clip * 1000).astype(np.int16), 16000), "float")]:
        with pytest.raises(LmstackError, match=msg):
            asr.transcribe(bad[0], sample_rate=bad[1])
    with pytest.raises(LmstackError, match="beam"):
        asr.transcribe(clip, beam=0)


def test_a_directory_that_is_not_an_asr_model_is_refused(tmp_path):
    with pytest.raises(LmstackError, match="no such directory"):
        SpeechRecognizer.from_dir(tmp_path / "nothing")
    asr = SpeechRecognizer.random(WhisperConfig(**TINY), seed=0)
    out = asr.save(tmp_path / "m")
    (out / "model.safetensors").unlink()
    with pytest.raises(LmstackError, match="model.safetensors is missing"):
        SpeechRecognizer.from_dir(out)
    other = tmp_path / "llm"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LmstackError, match="another model"):
        asr.save(other)
    for name in ("model.safetensors", "tokenizer.json"):
        (other / name).write_text("x")
    with pytest.raises(LmstackError, match="not an ASR config"):
        SpeechRecognizer.from_dir(other)


def test_train_asr_and_transcribe_from_the_cli(tmp_path, capsys):
    from lmstack import cli  # lazy: the CLI module is only needed by this test
    from lmstack.multimodal.speech_world import write_speech_world  # lazy: espeak-ng synthesis, this test only

    write_speech_world(tmp_path / "speech", 12, seed=0)
    out = tmp_path / "asr"
    cli.main(["mm", "train-asr", "--data", str(tmp_path / "speech"), "--out", str(out), "--steps", "2",
              "--batch_size", "4", "--d_model", "32", "--n_heads", "2", "--n_encoder_layers", "1",
              "--n_decoder_layers", "1", "--n_text_ctx", "64", "--val_n", "2", "--progress", "false",
              "--augment", "0.5"])
    assert "val greedy WER" in capsys.readouterr().out
    summary = json.loads((out / "asr_train.json").read_text())["summary"]
    assert summary["steps"] == 2 and summary["val"]["wer"]["utterances"] <= 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2
    guard = json.loads((out / "config.json").read_text())["guard"]  # from the training transcripts
    assert 5 < guard["tokens_per_second"] < 100 and guard["max_compression_ratio"] == 2.4
    wav = sorted((tmp_path / "speech" / "audio" / "train").glob("*.wav"))[0]
    assert cli.main(["mm", "transcribe", str(wav), "--model", str(out), "--beam", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_train_asr_without_data_names_synth_speech(tmp_path):
    with pytest.raises(LmstackError, match="synth-speech"):
        train_asr(ASRTrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    with pytest.raises(LmstackError, match="synth-speech"):
        train_asr(ASRTrainConfig(out=str(tmp_path / "o")))


def test_spec_augment_masks_bands_and_spans_only():
    mel = torch.randn(80, 200)
    cfg = ASRTrainConfig(freq_masks=2, freq_mask_width=10, time_masks=2, time_mask_frac=0.05)
    out = spec_augment(mel, cfg, random.Random(3))
    changed = out != mel
    rows, cols = changed.all(dim=1), changed.all(dim=0)
    assert changed.any() and out.shape == mel.shape
    assert int(rows.sum()) <= 20 and int(cols.sum()) <= 20  # 2 bands of <= 10 channels, 2 spans of <= 10 frames
    assert bool((changed <= (rows[:, None] | cols[None, :])).all())  # nothing changed outside a band or span


def test_guard_keeps_outputs_within_the_cap_and_cuts_the_rest(trained):
    clips = _clips()
    plain = trained.transcribe_batch(clips, guard=False)
    try:
        # 0.5 s and 0.4 s clips: a generous rate caps at 40 and 34 tokens, above both transcripts
        trained.guard = DecodeGuard(tokens_per_second=60.0, max_compression_ratio=2.4)
        assert trained.transcribe_batch(clips) == plain == ["Ada was born.", "4217"]
        assert trained.transcribe(clips[0], beam=2) == "Ada was born."
        trained.guard = DecodeGuard(tokens_per_second=8.0, extra_tokens=1)  # caps: ceil(4) + 1 = 5, ceil(3.2) + 1 = 5
        assert trained.transcribe_batch(clips) == ["Ada w", "4217"]  # only the transcript over its cap is cut
        assert trained.transcribe_batch(clips, guard=False) == plain
    finally:
        trained.guard = DecodeGuard()


def test_compression_ratio_fallback_keeps_the_less_repetitive_transcript(trained):
    clips = _clips()
    greedy = trained.transcribe_batch(clips, guard=False)
    beams = [trained.transcribe(c, beam=4, guard=False) for c in clips]
    try:
        trained.guard = DecodeGuard(max_compression_ratio=1e-6, fallback_beam=4)  # every transcript re-decoded
        want = [b if compression_ratio(b) < compression_ratio(g) else g for g, b in zip(greedy, beams)]
        assert trained.transcribe_batch(clips) == want
    finally:
        trained.guard = DecodeGuard()


def test_compression_ratio_flags_loops_and_guard_rate_is_a_quantile():
    assert compression_ratio("at University of " * 6) > 2.4
    assert compression_ratio("Rowan Iveswick studied at University of Slatemoor.") < 1.2
    assert compression_ratio("") == 0.0
    g = guard_from_transcripts(["abcd", "abcdefgh"], [1.0, 1.0], quantile=1.0, margin=1.5)
    assert g.tokens_per_second == pytest.approx(12.0) and g.cap(16000, 90) == 12 + 4 and g.cap(16000, 10) == 10
    with pytest.raises(LmstackError, match="one duration per transcript"):
        guard_from_transcripts(["a"], [1.0, 2.0])
    with pytest.raises(LmstackError, match="positive"):
        guard_from_transcripts(["a"], [0.0])
    with pytest.raises(ConfigError, match="tokens_per_second"):
        DecodeGuard(tokens_per_second=-1.0)
    with pytest.raises(ConfigError, match="fallback_beam"):
        DecodeGuard(fallback_beam=0)


def test_guard_round_trips_and_a_model_saved_without_one_loads_unguarded(tmp_path):
    asr = SpeechRecognizer.random(WhisperConfig(**TINY), seed=0)
    asr.guard = DecodeGuard(tokens_per_second=21.5, max_compression_ratio=2.4)
    out = asr.save(tmp_path / "m")
    assert SpeechRecognizer.from_dir(out).guard == asr.guard
    config = json.loads((out / "config.json").read_text())
    del config["guard"]
    (out / "config.json").write_text(json.dumps(config))
    assert SpeechRecognizer.from_dir(out).guard == DecodeGuard()
    config["guard"] = {"tokens_per_second": 1.0, "bogus": 1}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="bogus"):
        SpeechRecognizer.from_dir(out)


def test_degrade_adds_noise_or_reverb_reproducibly_and_keeps_the_length():
    t = np.arange(16000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    cfg = ASRTrainConfig(augment=1.0, snr_db_low=10.0, snr_db_high=10.0)
    outs = [degrade(clip, cfg, np.random.default_rng(s)) for s in range(6)]
    assert all(o.shape == clip.shape and o.dtype == np.float32 and not np.allclose(o, clip) for o in outs)
    again = degrade(clip, cfg, np.random.default_rng(0))
    assert np.array_equal(again, outs[0])
    with pytest.raises(ConfigError, match="rt60_high"):
        ASRTrainConfig(rt60_low=0.5, rt60_high=0.3)
    with pytest.raises(ConfigError, match="augment"):
        ASRTrainConfig(augment=1.5)


def test_fit_with_augmentation_needs_the_waveforms():
    clips = _clips()
    mels, _ = batch_features(clips, 80)
    model = SpeechRecognizer.random(WhisperConfig(**TINY), seed=0)
    cfg = ASRTrainConfig(steps=1, batch_size=2, augment=0.5, progress=False)
    with pytest.raises(LmstackError, match="needs samples"):
        fit(model.model, lambda m, f, t: m.sum(), [mels[0]], ["a"], cfg)


def test_fine_tuning_starts_from_the_given_weights_and_the_config_round_trips(trained, tmp_path):
    trained.save(tmp_path / "clean")
    clip = _clips()[0]
    mels, frames = batch_features([clip, clip], 80)
    mel_list = [mels[0, :, : int(frames[0])].clone(), mels[1, :, : int(frames[1])].clone()]
    texts = ["Ada was born.", "Ada was born."]  # identical pair: every batch the loop can draw has this loss
    loaded = SpeechRecognizer.from_dir(tmp_path / "clean")
    with torch.no_grad():
        want = float(whisper_loss(loaded)(mels[:1, :, : int(frames[0])], frames[:1], texts[:1]))
    fresh = SpeechRecognizer.random(WhisperConfig(**TINY), seed=1)
    cfg = ASRTrainConfig(steps=2, batch_size=2, lr=1e-4, warmup=1, spec_augment=False, log_every=1,
                         progress=False, init_from=str(tmp_path / "clean"))
    rows = fit(fresh.model, whisper_loss(fresh), mel_list, texts, cfg)
    other = SpeechRecognizer.random(WhisperConfig(**TINY), seed=1)
    scratch = fit(other.model, whisper_loss(other), mel_list, texts, replace(cfg, init_from=""))
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert want < 0.5 < scratch[0]["loss"]  # the trained weights fit this clip; a fresh model does not
    assert from_dict(ASRTrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(LmstackError, match="another model"):  # a CTC model's weights are refused by name
        torch.manual_seed(0)
        ctc = CTCModel(CTCConfig(n_audio_ctx=50, d_model=32, n_heads=2, n_encoder_layers=1))
        (tmp_path / "ctc").mkdir()
        atomic_write_bytes(tmp_path / "ctc" / "model.safetensors", save({k: v.contiguous() for k, v in
                                                                        ctc.state_dict().items()}))
        fit(fresh.model, whisper_loss(fresh), mel_list, texts, replace(cfg, init_from=str(tmp_path / "ctc")))
    with pytest.raises(LmstackError, match="not a model directory"):
        fit(fresh.model, whisper_loss(fresh), mel_list, texts, replace(cfg, init_from=str(tmp_path / "none")))
