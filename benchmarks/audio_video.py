"""Issue 25's measurements in one command: ASR, codec + TTS, emotion proxy, video, diffusion, navigation.

Each technique keeps its own script and results JSON (one home per idea); this driver runs them in the order
their dependencies need -- speech_tts's intelligibility stage transcribes with the model speech_asr.py saves to
runs/bench/asr_whisper -- with the flags that produced the committed results, one thread each, and prints each
JSON's records. It writes no JSON of its own: the docs cite the seven files below.

    script              results JSON                      CPU minutes at one thread (as measured)
    speech_asr.py       results/speech_asr.json           ~25 (Whisper-style + CTC, plain and augmented)
    asr_timestamps.py   results/asr_timestamps.json       ~1 (word times of speech_asr's saved model)
    speech_tts.py       results/speech_tts.json           ~13 (codec, TTS, then intelligibility), then ~11 per
                                                          text front-end arm (4 arms)
    speech_emotion.py   results/speech_emotion.json       ~8
    video_language.py   results/video_language.json       ~10 (with --divided)
    diffusion.py        results/diffusion.json            ~13 (DiT), ~10 (--arm unet), ~25 each (--arm unet2, its
                                                          ablation on the 300-step CLIP, and --arm dit2)
    navigation.py       results/navigation.json           ~11

Usage:
    python benchmarks/audio_video.py                               # all of them, in order
    python benchmarks/audio_video.py --only speech_asr,speech_tts  # a subset, still in dependency order
    python benchmarks/audio_video.py --smoke                       # each at tiny sizes; writes no results
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, extra flags that reproduce the committed JSON); order = dependency order
PARTS = [
    ("speech_asr", []),
    ("asr_timestamps", []),
    ("speech_tts", ["--stage", "all"]),
    *(("speech_tts", ["--stage", "arm", "--arm", arm])  # the text front-end arms, on the codec and ASR above
      for arm in ("digits", "normalized", "normalized_dropout", "normalized_dropout_1100")),
    ("speech_emotion", []),
    ("video_language", ["--divided"]),
    ("diffusion", []),
    ("diffusion", ["--arm", "unet"]),
    ("diffusion", ["--arm", "unet2"]),
    ("diffusion", ["--arm", "unet2", "--unet2_clip_steps", "300"]),  # the ablation: unet2 on the DiT's CLIP
    ("diffusion", ["--arm", "dit2"]),  # the fair fight: the DiT on unet2's CLIP and CPU budget
    ("navigation", []),
]
NO_SMOKE = {"asr_timestamps": "it times the words of the ASR that a full speech_asr.py run saves"}


def headline(name: str) -> list[str]:
    """One line per record of results/<name>.json: metric, ours, baseline, ratio."""
    path = HERE / "results" / f"{name}.json"
    if not path.is_file():
        return [f"  (no {path.name})"]
    rows = json.loads(path.read_text())
    out = []
    for r in rows if isinstance(rows, list) else [rows]:
        base = r.get("baseline") or {}
        label = r.get("benchmark") if r.get("benchmark") != name else r.get("metric")
        out.append(f"  {label}: {r.get('metric')} ours {r.get('ours')} vs {base.get('name')} {base.get('value')} "
                   f"(ratio {r.get('ratio')})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated script names (without .py)")
    ap.add_argument("--smoke", action="store_true", help="pass --smoke to every script: tiny sizes, no results")
    args = ap.parse_args()
    names = [n for n, _ in PARTS]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"--only names unknown scripts {unknown}; choose from {names}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the budgets above were measured on one thread
    failed = []
    for name, flags in PARTS:
        if name not in wanted:
            continue
        if args.smoke and name in NO_SMOKE:
            print(f"== {name}: skipped in --smoke ({NO_SMOKE[name]})", flush=True)
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *flags, *(["--smoke"] if args.smoke else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        print(f"== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
        elif not args.smoke:
            print("\n".join(headline(name)), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
