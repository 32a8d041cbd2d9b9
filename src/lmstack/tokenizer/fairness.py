"""The fairness effect: how the training mix and the vocabulary size move the worst-case token premium.

A tokenizer trained on a corpus dominated by one language spends its merges on that language; the others
are cut into many small pieces and pay a large premium. Two levers:
- temperature sampling of the training mix: language l gets a share ∝ n_l^(1/T) (T=1: natural sizes,
  T→∞: uniform), the same trick multilingual LMs use for their data;
- a larger vocabulary, which leaves more merges for the smaller languages.
Both are measured as the worst premium over languages on held-out parallel text.

Usage:
    mix = temperature_mix({"eng": big_text, "fin": small_text}, temperature=5.0)
    results = fairness_experiment(train_by_lang, test_by_lang, [("T=1", 1.0, 2000), ("T=inf", inf, 2000)])
"""
from __future__ import annotations

import math

from lmstack.errors import LmstackError
from lmstack.tokenizer.train import train_tokenizer


def temperature_mix(texts: dict[str, str], temperature: float, total_chars: int | None = None) -> list[str]:
    """Resample per-language texts to shares ∝ size^(1/T), keeping the total size (repeat or truncate)."""
    if temperature <= 0:
        raise LmstackError(f"temperature={temperature} must be > 0 (math.inf for uniform)")
    sizes = {k: len(v) for k, v in texts.items() if v}
    if not sizes:
        raise LmstackError("temperature_mix got no non-empty texts")
    total = total_chars or sum(sizes.values())
    weights = {k: (1.0 if math.isinf(temperature) else n ** (1.0 / temperature)) for k, n in sizes.items()}
    norm = sum(weights.values())
    out = []
    for k, n in sizes.items():
        want = max(1, int(total * weights[k] / norm))
        reps, rest = divmod(want, n)
        text = texts[k]
        # Cut the remainder at a line break so no half words enter the counts.
        cut = text.rfind("\n", 0, rest)
        out.append((text + "\n") * reps + text[: cut if cut > 0 else rest])
    return out


def fairness_experiment(train: dict[str, str], test: dict[str, str], settings: list[tuple[str, float, int]],
                        reference: str = "eng", **train_kwargs) -> list[dict]:
    """For each (name, temperature, vocab_size): train a byte-level BPE on the mix, then report premiums of
    every language on `test` (parallel texts) relative to `reference`."""

    if reference not in test:
        raise LmstackError(f"the reference language {reference!r} has no test text")
    langs = sorted(test)
    results = []
    for name, temperature, vocab_size in settings:
        tok = train_tokenizer(texts=temperature_mix(train, temperature), type="bpe", vocab_size=vocab_size,
                              show_progress=False, **train_kwargs)
        counts = dict(zip(langs, map(len, tok.encode_batch([test[k] for k in langs]))))
        premium = {k: counts[k] / counts[reference] for k in langs}
        worst = max(premium, key=premium.get)
        results.append({"setting": name, "temperature": temperature, "vocab_size": vocab_size,
                        "worst_premium": premium[worst], "worst_language": worst,
                        "mean_premium": sum(premium.values()) / len(premium), "premium": premium})
    return results
