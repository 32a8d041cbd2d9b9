"""Word-level timestamps of the Whisper-style recogniser (cross-attention + DTW, asr_timing.py) against word times
spread over the speech span in proportion to character counts (row XII.7).

Model: runs/bench/asr_whisper (benchmarks/speech_asr.py, unchanged here). Utterances: the speech world cached at
runs/bench/speech_world/n3000_s0, each re-synthesised with espeak-ng's word events (espeak.synthesize_with_words,
the record's own voice / rate / pitch / pitch_range labels; the samples, clipped to 16-bit full scale as the WAV
is, must equal the stored WAV within 1e-3, and the stored WAV is what is decoded).
Reference times: a word starts at espeak-ng's first WORD event inside it and ends at the next word's start (the
clip's end for the last word), moved back over trailing silence (10 ms frames under 0.01 peak).

Scored utterances: those the model transcribes right (greedy; eval/speech_metrics.normalize of hypothesis ==
that of the reference: case and punctuation ignored) -- a wrong transcript has no word-to-word match.
- ours: DTW over the cross-attention of the chosen alignment heads; the heads and the median-filter width
  (1, 3 or 7) are chosen on the VAL split (asr_timing.choose_heads: heads ranked by their own error, the k best
  averaged), never on test. Also recorded: the untuned default (every head of the last decoder half, width 7).
- baseline: the words spread over the speech span (first to last 10 ms frame over 2 % of the clip's peak) in
  proportion to their characters (asr_timing.proportional_words).
Metrics on test: mean absolute error of word starts and of word ends (s), the share of words whose start AND end
are both within 0.2 s; stderr over words (binomial for the share), and the paired per-utterance difference
(ours - baseline of the utterance's mean absolute error) with its stderr over utterances.

Usage: OMP_NUM_THREADS=1 python benchmarks/asr_timestamps.py [--val_n 306] [--test_n 283]

Measured (2026-12-07, one thread under lock A, 41 s in all): val 306 utterances, 89 decoded right -> heads
(1, 1), (1, 3), (1, 0) (layer, head), median width 1 (val MAE 0.0895 s; width 3: 0.0902, width 7: 0.1017).
Test 283 utterances, 101 decoded right (438 words); every re-synthesis equal to the stored WAV (max abs diff
4.4e-5). DTW LOSES to the baseline here:
- word start MAE: DTW 0.0736 +- 0.0045 s, baseline 0.0485 +- 0.0024 s (ratio 0.659);
- word end MAE: DTW 0.0908 +- 0.0055 s, baseline 0.0477 +- 0.0022 s (ratio 0.525);
- words with start and end within 0.2 s: DTW 0.804 +- 0.019, baseline 0.982 +- 0.006;
- paired per-utterance MAE difference (DTW - baseline): +0.0449 +- 0.0081 s over 101 utterances;
- untuned default heads (all of block 1, width 7): start 0.0961, end 0.1138, within 0.760 -- the VAL choice of
  heads helps, but not enough. espeak-ng speaks at an even rate with almost no pauses inside a sentence, so
  characters-per-second is a near-perfect clock; the 2-block, 64-wide decoder's cross-attention is a coarser one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import result, write_result

from lmstack.eval.speech_metrics import normalize  # noqa: E402
from lmstack.multimodal.asr import SpeechRecognizer  # noqa: E402
from lmstack.multimodal.asr_timing import (alignment_matrix, choose_heads, default_heads,  # noqa: E402
                                           proportional_words, timing_errors, word_times)
from lmstack.multimodal.asr_train import load_split  # noqa: E402
from lmstack.multimodal.espeak import synthesize_with_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.2


def collect(asr: SpeechRecognizer, records: list[dict]) -> tuple[list[dict], dict]:
    """Re-synthesise each record with word times, transcribe it, keep the ones decoded right with their
    cross-attention. Returns (kept items, counts)."""
    kept, mismatch, max_diff = [], 0, 0.0
    for rec in records:
        samples, _, ref = synthesize_with_words(rec["text"], rec["voice"], rec["rate"], rec["pitch"],
                                                rec["pitch_range"])
        stored = rec["samples"]  # the WAV clips at full scale: compare the clipped re-synthesis
        clipped = np.clip(samples, -1.0, 32767 / 32768)
        diff = float(np.abs(clipped - stored).max()) if samples.size == stored.size else float("inf")
        max_diff = max(max_diff, diff)
        if diff > 1e-3:  # the re-synthesis must be the world's audio (up to the WAV's 16-bit rounding)
            mismatch += 1
            continue
        samples = stored  # decode the world's own audio; the word times are those of the same synthesis
        text = asr.transcribe(samples)
        if normalize(text) != normalize(rec["text"]) or len(text.split()) != len(ref):
            continue
        weights, frames = asr.cross_attention(samples, text)
        kept.append({"id": rec["id"], "text": text, "weights": weights, "frames": frames, "ref": ref,
                     "samples": samples})
    return kept, {"utterances": len(records), "decoded_right": len(kept), "resynthesis_mismatch": mismatch,
                  "resynthesis_max_abs_diff": max_diff}


def score(items: list[dict], predict) -> dict:
    starts, ends, per_utt = [], [], []
    for it in items:
        s, e = timing_errors(predict(it), it["ref"])
        starts.append(s)
        ends.append(e)
        per_utt.append(float(np.concatenate([s, e]).mean()))
    s, e = np.concatenate(starts), np.concatenate(ends)
    within = (s <= WITHIN) & (e <= WITHIN)
    n = s.size
    return {"start_mae": float(s.mean()), "start_stderr": float(s.std(ddof=1) / np.sqrt(n)),
            "end_mae": float(e.mean()), "end_stderr": float(e.std(ddof=1) / np.sqrt(n)),
            "within": float(within.mean()), "within_stderr": float(np.sqrt(within.mean() * (1 - within.mean()) / n)),
            "n_words": int(n), "per_utterance": per_utt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs/bench/asr_whisper"))
    ap.add_argument("--world", default=str(ROOT / "runs/bench/speech_world/n3000_s0"))
    ap.add_argument("--val_n", type=int, default=0, help="val utterances (0 = all)")
    ap.add_argument("--test_n", type=int, default=0, help="test utterances (0 = all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    asr = SpeechRecognizer.from_dir(args.model)
    cfg = asr.config
    val, val_counts = collect(asr, load_split(args.world, "val", args.val_n))
    t_val = time.perf_counter() - t0
    choices = {}
    for width in (1, 3, 7):
        heads, info = choose_heads([(it["text"], it["weights"], it["frames"], it["ref"]) for it in val],
                                   cfg.n_decoder_layers, cfg.n_heads, median_width=width)
        choices[width] = (info["error"], heads, info)
    width = min(choices, key=lambda w: choices[w][0])
    val_error, heads, info = choices[width]
    t_choose = time.perf_counter() - t0 - t_val
    test, test_counts = collect(asr, load_split(args.world, "test", args.test_n))

    def dtw_words(heads_, width_):
        return lambda it: word_times(it["text"], alignment_matrix(it["weights"], heads_, it["frames"],
                                                                  median_width=width_))
    ours = score(test, dtw_words(heads, width))
    untuned = score(test, dtw_words(default_heads(cfg.n_decoder_layers, cfg.n_heads), 7))
    base = score(test, lambda it: proportional_words(it["text"], it["samples"]))
    diff = np.array(ours["per_utterance"]) - np.array(base["per_utterance"])
    seconds = round(time.perf_counter() - t0, 1)

    config = {"model": "runs/bench/asr_whisper", "world": "runs/bench/speech_world/n3000_s0", "split": "test",
              "decoding": "greedy", "scored": "utterances decoded right (normalised text equal)",
              "n_utterances": len(test), "n_words": ours["n_words"], "test_counts": test_counts,
              "val_counts": val_counts, "alignment_heads": [list(h) for h in heads], "median_width": width,
              "val_error_by_width": {str(w): c[0] for w, c in choices.items()}, "val_head_errors": info["single"],
              "val_error_by_k": info["by_k"], "frame_seconds": 0.02, "within_s": WITHIN,
              "paired_mae_diff_ours_minus_baseline": round(float(diff.mean()), 4),
              "paired_mae_diff_stderr": round(float(diff.std(ddof=1) / np.sqrt(diff.size)), 4),
              "untuned_default_heads": {k: round(v, 4) for k, v in untuned.items() if k != "per_utterance"},
              "seconds": seconds}
    for key in ("start", "end"):
        config[f"{key}_stderr"] = round(ours[f"{key}_stderr"], 4)
        config[f"baseline_{key}_stderr"] = round(base[f"{key}_stderr"], 4)
    base_name = "words spread over the energy speech span by character count"
    records = [
        result("asr_timestamps_start_mae", "mean_abs_error_s", False, round(ours["start_mae"], 4), base_name,
               round(base["start_mae"], 4), **config),
        result("asr_timestamps_end_mae", "mean_abs_error_s", False, round(ours["end_mae"], 4), base_name,
               round(base["end_mae"], 4), **config),
        result("asr_timestamps_within_0.2s", "share_of_words", True, round(ours["within"], 4), base_name,
               round(base["within"], 4), ours_stderr=round(ours["within_stderr"], 4),
               baseline_stderr=round(base["within_stderr"], 4), n_words=ours["n_words"],
               n_utterances=len(test)),
    ]
    write_result("asr_timestamps", records)
    print(f"val: {val_counts}; chose heads {heads} width {width} (val error {val_error:.4f}) in {t_choose:.1f} s")
    print(f"test: {test_counts}; ours start {ours['start_mae']:.4f} end {ours['end_mae']:.4f} within "
          f"{ours['within']:.3f}; untuned start {untuned['start_mae']:.4f} end {untuned['end_mae']:.4f} within "
          f"{untuned['within']:.3f}; baseline start {base['start_mae']:.4f} end {base['end_mae']:.4f} within "
          f"{base['within']:.3f}; paired diff {diff.mean():.4f} +- {diff.std(ddof=1) / np.sqrt(diff.size):.4f}; "
          f"{seconds} s")


if __name__ == "__main__":
    main()
