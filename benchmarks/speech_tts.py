"""Neural codec + VALL-E-style TTS on the speech world (issue 25 §2 TTS, row XII.8), at CPU scale.

Data (restricted so 15 CPU minutes can learn something; said in the JSON config): the speech world's NUMBER
utterances ("4217", spoken as words by espeak-ng), all re-synthesised in ONE voice ("en") with the NEUTRAL
prosody bundle, split as the world splits them (train / val / test). Cached under runs/bench/tts/.

Stage `train` (CPU budget <= 15 min at 1 thread):
- the codec (codec.py: conv encoder/decoder, 4 x 256 residual VQ at 50 frames/s = 1600 bits/s arithmetic, no GAN)
  trained on the train audio; measured on held-out test audio by mel distance (audio.log_mel) and SNR against
  (a) mu-law + downsampling at the same 1600 bits/s (the best of three rate/bit splits, chosen on val), and
  (b) the same codec with its first codebook only (400 bits/s): the residual codebooks' gain;
- the TTS (tts.py: AR over codebook 1 + NAR over codebooks 2..4, characters in) trained on the train codes;
- WAVs into benchmarks/results/tts_samples/: espeak reference, codec resynthesis, TTS output of one test text.
Stage `intelligibility` (after the ASR helper's benchmarks/speech_asr.py saved runs/bench/asr_whisper): our ASR's
WER and CER on the same held-out texts as (a) espeak-ng reference audio, (b) codec-resynthesised audio, (c) our
TTS's audio; n words, n utterances, bootstrap stderr. It reloads the saved codec and TTS.

Usage:
    flock /tmp/lmstack-bench-B.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speech_tts.py --stage train
    flock /tmp/lmstack-bench-B.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speech_tts.py \
        --stage intelligibility
    .venv/bin/python benchmarks/speech_tts.py --stage report           # the JSON again from runs/bench/tts
    .venv/bin/python benchmarks/speech_tts.py --stage all --smoke      # seconds: tiny sizes, no results written
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, result, write_result

from lmstack.config import atomic_write_bytes, atomic_write_text, to_dict
from lmstack.multimodal.audio import SAMPLE_RATE, write_wav
from lmstack.multimodal.codec import Codec, CodecConfig, load_codec, mel_distance, mulaw_roundtrip, snr_db
from lmstack.multimodal.espeak import synthesize
from lmstack.multimodal.speech_world import PROSODY, build_speech_world
from lmstack.multimodal.tts import SpeechSynthesizer, TTSConfig
from lmstack.multimodal.tts_train import char_tokenizer, codec_scores, mean_stderr, train_codec_on, train_tts_on

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "bench" / "tts"
ASR_DIR = ROOT / "runs" / "bench" / "asr_whisper"
SAMPLES = RESULTS / "tts_samples"
NAME = "speech_tts"
VOICE = "en"
MULAW_SETTINGS = ((4, 400), (2, 800), (8, 200))  # (bits, Hz): each 1600 bits/s

FULL = {"world": 6000, "codec_steps": 1200, "tts_steps": 700, "test": 60, "val": 20, "batch": 16}
SMOKE = {"world": 300, "codec_steps": 3, "tts_steps": 3, "test": 3, "val": 2, "batch": 2}


def load_data(n_world: int, seed: int = 0) -> dict[str, list[dict]]:
    """The number utterances of a speech world, re-synthesised in one voice with neutral prosody; cached."""
    cache = RUN / f"numbers_{n_world}_{seed}"
    if (cache / "index.json").is_file():
        index = json.loads((cache / "index.json").read_text())
        audio = np.load(cache / "audio.npz")
        return {s: [{**r, "samples": audio[r["id"]]} for r in recs] for s, recs in index.items()}
    rate, pitch, prange = PROSODY["neutral"]
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for rec in build_speech_world(n_world, seed):
        if rec["kind"] != "number":
            continue
        samples, sr = synthesize(rec["text"], VOICE, rate, pitch, prange)
        assert sr == SAMPLE_RATE
        out[rec["split"]].append({"id": rec["id"], "text": rec["text"], "samples": samples})
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "audio.tmp.npz"
    np.savez(tmp, **{r["id"]: r["samples"] for recs in out.values() for r in recs})
    atomic_write_bytes(cache / "audio.npz", tmp.read_bytes())
    tmp.unlink()
    index = {s: [{"id": r["id"], "text": r["text"]} for r in recs] for s, recs in out.items()}
    atomic_write_text(cache / "index.json", json.dumps(index))
    return out


def mulaw_best(val: list[np.ndarray]) -> tuple[int, int]:
    """The (bits, Hz) split of 1600 bits/s with the lowest mel distance on val (never on test)."""
    return min(MULAW_SETTINGS, key=lambda s: np.mean([mel_distance(x, mulaw_roundtrip(x, s[1], s[0])) for x in val]))


def stage_train(sizes: dict, smoke: bool) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    data = load_data(sizes["world"])
    t_data = time.perf_counter() - t0
    train_w = [r["samples"] for r in data["train"]]
    val_w = [r["samples"] for r in data["val"]][: sizes["val"]]
    test = data["test"][: sizes["test"]]
    test_w = [r["samples"] for r in test]
    torch.manual_seed(0)
    codec_cfg = CodecConfig(channels=4, latent_dim=16) if smoke else CodecConfig()
    codec = Codec(codec_cfg)
    t1 = time.perf_counter()
    codec_log = train_codec_on(codec, train_w, sizes["codec_steps"], batch_size=8, crop_seconds=0.5, lr=2e-3, seed=0,
                               progress=not smoke)
    t_codec = time.perf_counter() - t1
    full, one = codec_scores(codec, test_w), codec_scores(codec, test_w, n_q=1)
    bits, hz = mulaw_best(val_w)
    mulaw = {"mel_distance": mean_stderr([mel_distance(x, mulaw_roundtrip(x, hz, bits)) for x in test_w]),
             "snr_db": mean_stderr([snr_db(x, mulaw_roundtrip(x, hz, bits)) for x in test_w])}
    tel = {"mel_distance": mean_stderr([mel_distance(x, mulaw_roundtrip(x, 8000, 8)) for x in test_w])}

    tts_cfg = (TTSConfig(d_model=16, n_layers=1, nar_layers=1, n_heads=2, max_frames=200, voices=[VOICE]) if smoke
               else TTSConfig(d_model=128, n_layers=4, nar_layers=3, n_heads=4, max_chars=8, max_frames=200,
                              voices=[VOICE]))
    tok = char_tokenizer([r["text"] for r in data["train"]])
    synth = SpeechSynthesizer.build(codec, tok, tts_cfg, seed=0)
    t2 = time.perf_counter()
    keep = [r for r in data["train"] if r["samples"].size <= tts_cfg.max_frames * codec_cfg.hop]
    codes = [codec.encode(r["samples"]) for r in keep]
    t_encode = time.perf_counter() - t2
    t3 = time.perf_counter()
    tts_log = train_tts_on(synth.lm, [tok.encode(r["text"]) for r in keep], codes, sizes["tts_steps"],
                           batch_size=sizes["batch"], lr=2e-3, seed=0, progress=not smoke)
    t_tts = time.perf_counter() - t3
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    summary = {"codec": {"ours_nq_all": full, "ours_nq_1": one, "mulaw_1600": {**mulaw, "bits": bits, "hz": hz},
                         "mulaw_8k_8bit_64kbps": tel, "log": codec_log, "bitrate_bps": codec_cfg.bitrate,
                         "bitrate_nq1_bps": codec_cfg.bitrate_at(1), "parameters": sum(p.numel() for p in
                                                                                        codec.parameters())},
               "tts": {"log": tts_log, "train_utterances": len(keep),
                       "parameters": sum(p.numel() for p in synth.lm.parameters())},
               "seconds": {"data": round(t_data, 1), "codec": round(t_codec, 1), "encode": round(t_encode, 1),
                           "tts": round(t_tts, 1), "wall_train_stage": round(wall, 1),
                           "cpu_train_stage": round(cpu, 1)},
               "sizes": sizes, "codec_config": to_dict(codec_cfg), "tts_config": to_dict(tts_cfg),
               "counts": {s: len(v) for s, v in data.items()}}
    print(json.dumps({k: summary[k] for k in ("seconds", "counts")}))
    print(f"codec test mel {full['mel_distance']['value']:.3f} (n_q=1 {one['mel_distance']['value']:.3f}, mu-law "
          f"{mulaw['mel_distance']['value']:.3f}); SNR {full['snr_db']['value']:.2f} dB (mu-law "
          f"{mulaw['snr_db']['value']:.2f}); TTS final AR {tts_log[-1]['ar']:.3f} NAR {tts_log[-1]['nar']:.3f}")
    if smoke:
        return summary
    codec.save(RUN / "codec")
    synth.save(RUN / "model")
    SAMPLES.mkdir(parents=True, exist_ok=True)
    ref = test[0]
    wavs = {"reference_espeak": ref["samples"], "codec_resynthesis": codec.resynthesize(ref["samples"]),
            "codec_resynthesis_nq1": codec.resynthesize(ref["samples"], n_q=1),
            "tts": synth.speak(ref["text"], seed=0)[0]}
    summary["samples"] = {"text": ref["text"], "files": {}}
    for name, audio in wavs.items():
        path = SAMPLES / f"{name}.wav"
        atomic_write_bytes(path, write_wav(audio, SAMPLE_RATE))
        summary["samples"]["files"][name] = str(path.relative_to(ROOT))
    atomic_write_text(RUN / "train_summary.json", json.dumps(summary, indent=1))
    return summary


def stage_intelligibility(sizes: dict, smoke: bool) -> dict:
    # lazy: the ASR helper's module; only this stage needs it, and it may land after the train stage ran
    from lmstack.eval.speech_metrics import bootstrap_stderr, cer, wer
    from lmstack.multimodal.asr import SpeechRecognizer  # lazy: as above

    if smoke:
        asr = SpeechRecognizer.random(seed=0)
        codec, synth = Codec(CodecConfig(channels=4, latent_dim=16)), SpeechSynthesizer.random(tiny=True, seed=0)
    else:
        if not (ASR_DIR / "config.json").is_file():
            sys.exit(f"speech_tts: no ASR model at {ASR_DIR}; run benchmarks/speech_asr.py first (it saves the "
                     "Whisper-style model there), then rerun --stage intelligibility")
        asr, codec, synth = SpeechRecognizer.from_dir(ASR_DIR), load_codec(RUN / "codec"), \
            SpeechSynthesizer.from_dir(RUN / "model")
    test = load_data(sizes["world"])["test"][: sizes["test"]]
    refs = [r["text"] for r in test]
    t0 = time.perf_counter()
    audio = {"espeak_reference": [r["samples"] for r in test],
             "codec_resynthesis": [codec.resynthesize(r["samples"]) for r in test],
             "tts": [synth.speak(r["text"], seed=i)[0] for i, r in enumerate(test)]}
    t_speak = time.perf_counter() - t0
    out = {}
    for name, clips in audio.items():
        hyps = [asr.transcribe(c) for c in clips]
        w, c = wer(refs, hyps), cer(refs, hyps)
        out[name] = {"wer": w["wer"], "wer_stderr": bootstrap_stderr(refs, hyps, "wer"), "words": w["words"],
                     "utterances": w["utterances"], "cer": c["cer"], "cer_stderr": bootstrap_stderr(refs, hyps, "cer"),
                     "chars": c["chars"], "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}
        print(f"{name}: WER {w['wer']:.3f} ± {out[name]['wer_stderr']:.3f} ({w['words']} words), CER {c['cer']:.3f}")
    tts_sec = sum(a.size for a in audio["tts"]) / SAMPLE_RATE
    out["tts_seconds_per_audio_second"] = round(t_speak / max(tts_sec, 1e-9), 3)
    out["asr"] = str(ASR_DIR.relative_to(ROOT))
    if not smoke:
        atomic_write_text(RUN / "intelligibility.json", json.dumps(out, indent=1))
    return out


def build_results(train: dict, intel: dict | None) -> list[dict]:
    c = train["codec"]
    cfg = {"data": "speech-world number utterances re-synthesised in one voice (en), neutral prosody; "
                   f"{train['counts']} (train/val/test)", "sizes": train["sizes"], "codec": train["codec_config"],
           "tts": train["tts_config"], "seconds": train["seconds"], "gan": "none (L1 + multi-resolution STFT only)",
           "bitrate": "arithmetic: frames/s x n_q x log2 K, no entropy coding", "threads": 1, "seeds": 0}
    n = c["ours_nq_all"]["mel_distance"]["n"]
    mul = c["mulaw_1600"]
    out = [
        result("speech_codec", "mel_distance", False, c["ours_nq_all"]["mel_distance"]["value"],
               f"mu-law {mul['bits']}-bit at {mul['hz']} Hz (1600 bits/s, best of 3 splits on val)",
               mul["mel_distance"]["value"], goal=1.0, n=n, ours_detail=c["ours_nq_all"], baseline_detail=mul,
               bitrate_bps=c["bitrate_bps"], **cfg),
        result("speech_codec_rvq_gain", "mel_distance", False, c["ours_nq_all"]["mel_distance"]["value"],
               f"the same codec, first codebook only ({c['bitrate_nq1_bps']:.0f} bits/s)",
               c["ours_nq_1"]["mel_distance"]["value"], goal=1.0, n=n, nq_1=c["ours_nq_1"], nq_all=c["ours_nq_all"],
               reference_mulaw_8khz_8bit_64kbps=c["mulaw_8k_8bit_64kbps"], bitrate_bps=c["bitrate_bps"]),
    ]
    snr_ours, snr_base = c["ours_nq_all"]["snr_db"]["value"], mul["snr_db"]["value"]
    snr = result("speech_codec_snr", "snr_db", True, snr_ours, f"mu-law {mul['bits']}-bit at {mul['hz']} Hz",
                 snr_base, goal=None, n=n, difference_db=snr_ours - snr_base,
                 note="ratio = ours / baseline as LINEAR power SNRs, 10^(difference_db / 10) (dB can be <= 0)")
    snr["ratio"] = round(10 ** ((snr_ours - snr_base) / 10), 4)
    out.append(snr)
    if intel:
        tts, ref = intel["tts"], intel["espeak_reference"]
        out.append(result("tts_intelligibility", "wer", False, tts["wer"], "espeak-ng reference audio (same texts)",
                          ref["wer"], goal=None, n_words=tts["words"], n_utterances=tts["utterances"],
                          stderr=tts["wer_stderr"], baseline_stderr=ref["wer_stderr"],
                          codec_resynthesis=intel["codec_resynthesis"], tts=tts, espeak_reference=ref,
                          asr=intel["asr"], tts_seconds_per_audio_second=intel["tts_seconds_per_audio_second"],
                          note="ratio = reference WER / TTS WER: 1.0 would be as intelligible as espeak-ng"))
        # each transcript is one number = one word, so WER is exact-match; CER shows partial intelligibility
        out.append(result("tts_intelligibility_cer", "cer", False, tts["cer"], "espeak-ng reference audio (same "
                          "texts)", ref["cer"], goal=None, n_chars=tts["chars"], n_utterances=tts["utterances"],
                          stderr=tts["cer_stderr"], baseline_stderr=ref["cer_stderr"],
                          codec_resynthesis_cer=intel["codec_resynthesis"]["cer"], asr=intel["asr"]))
    for r in out:
        r["samples"] = train.get("samples")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("train", "intelligibility", "all", "report"), default="all",
                    help="report: rebuild the results JSON from the saved stage outputs (no training, no ASR)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, writes nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = SMOKE if args.smoke else FULL
    if args.stage in ("train", "all"):
        train = stage_train(sizes, args.smoke)
    else:
        train = json.loads((RUN / "train_summary.json").read_text())
    intel = None
    if args.stage in ("intelligibility", "all"):
        intel = stage_intelligibility(sizes, args.smoke)
    elif (RUN / "intelligibility.json").is_file() and not args.smoke:
        intel = json.loads((RUN / "intelligibility.json").read_text())
    results = build_results(train, intel)
    if args.smoke:
        print(json.dumps(results, indent=1)[:3000])
        return
    write_result(NAME, results)


if __name__ == "__main__":
    main()
