"""Benchmark: the fairness effect of the training mix and of the vocabulary size on the worst token premium.

An English-dominated corpus (Tiny Shakespeare, 1.1 MB) plus UDHR articles 1-20 of 19 other languages
(~5-10 KB each: 8 scripts). Byte-level BPE per setting; the premium of each language is its token count on
UDHR articles 21-30 divided by English's on the same articles (parallel text). Temperature sampling gives
language l a share ∝ size^(1/T), and a bigger vocabulary leaves merges for the small languages.
Baseline: natural mix (temperature 1) at 2048 tokens.

Run:  python benchmarks/tokenizer_fairness.py        (seconds)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAME = "tokenizer_fairness"


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: shared data not found at {DATA}")
        return
    from lmstack.tokenizer.commands import FAIRNESS_LANGS
    from lmstack.tokenizer.fairness import fairness_experiment
    from lmstack.tokenizer.metrics import load_udhr

    train = {r["code"]: r["text"] for r in load_udhr(DATA / "udhr", range(1, 21)) if r["code"] in FAIRNESS_LANGS}
    test = {r["code"]: r["text"] for r in load_udhr(DATA / "udhr", range(21, 31)) if r["code"] in FAIRNESS_LANGS}
    train["eng"] = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8") + "\n" + train["eng"]
    # Baseline: natural mix at 2048 tokens. Then the two levers separately, and both together.
    settings = [("natural mix (T=1), vocab 2048", 1.0, 2048),
                ("natural mix, vocab 4096", 1.0, 4096), ("natural mix, vocab 8192", 1.0, 8192),
                ("T=3, vocab 2048", 3.0, 2048), ("T=inf (uniform), vocab 2048", math.inf, 2048),
                ("T=inf (uniform), vocab 8192", math.inf, 8192)]
    runs = fairness_experiment(train, test, settings)
    base = runs[0]
    cfg = {"languages": sorted(test), "train": "Shakespeare (English) + UDHR articles 1-20",
           "eval": "UDHR articles 21-30", "baseline_worst_language": base["worst_language"]}
    results = []
    for r in runs[1:]:
        results.append(result(NAME, f"worst_premium[{r['setting']}]", False, round(r["worst_premium"], 3),
                              f"natural mix (T=1), vocab {base['vocab_size']}", round(base["worst_premium"], 3),
                              worst_language=r["worst_language"], mean_premium=round(r["mean_premium"], 3),
                              baseline_mean_premium=round(base["mean_premium"], 3), vocab_size=r["vocab_size"],
                              temperature=str(r["temperature"]), **cfg))
    for r in runs:
        print(f"{r['setting']:<30} worst {r['worst_premium']:.2f} ({r['worst_language']}) "
              f"mean {r['mean_premium']:.2f}")
    write_result(NAME, results)


if __name__ == "__main__":
    main()
