"""Tokenizer metrics: compression (bytes per token) and per-language fertility / premium on the UDHR.

The Universal Declaration of Human Rights exists in hundreds of languages with the same content, so token
counts compare directly. Fertility here is tokens per character; the premium of a language is its token
count divided by English's for the same text (Petrov et al. 2023): a premium of 3 means that language pays
three times as many tokens (context, compute, money) to say the same thing.

Usage:
    bytes_per_token(tok, texts)                                 # {"bytes":.., "tokens":.., "bytes_per_token":..}
    rows = load_udhr("../shared/data/udhr")                     # [{"code", "name", "text"}, ...]
    table = fertility(tok, rows)                                # sorted, worst premium first
    write_fertility(table, "out/")                              # fertility.md + fertility.png
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError


def bytes_per_token(tok, texts: list[str]) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(1, n_tokens)}


def _udhr_text(row: dict, articles: range | None) -> tuple[str, int]:
    # Articles only: titles and preambles are missing or abridged in some translations, articles are parallel.
    parts = []
    for a in row.get("articles", []):
        try:
            number = int(a["number"])
        except (KeyError, ValueError):
            continue
        if articles is None or number in articles:
            parts.append(a["text"])
    return "\n".join(parts), len(parts)


def load_udhr(path: str | Path, articles: range | None = None, complete: bool = True) -> list[dict]:
    """UDHR rows {code, name, text, articles} from the udhr folder or its udhr_full.jsonl(.gz). `articles`
    restricts the text to those article numbers (e.g. range(21, 31) for a held-out part); None = all 30.
    `complete` keeps only translations that have every requested article, so texts are parallel."""
    p = Path(path)
    if p.is_dir():
        p = p / "udhr_full.jsonl.gz"
    if not p.is_file():
        raise LmstackError(f"UDHR data not found at {path} (expected udhr_full.jsonl.gz)")
    opener = gzip.open if p.suffix == ".gz" else open
    wanted = len(articles) if articles is not None else 30
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for k, line in enumerate(f):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmstackError(f"{p} line {k + 1} is not JSON: {e.msg}") from None
            text, n = _udhr_text(r, articles)
            if text.strip() and (n >= wanted or not complete):
                rows.append({"code": r["code"], "name": r.get("name", r["code"]), "text": text, "articles": n})
    return rows


def fertility(tok, rows: list[dict], reference: str = "eng") -> list[dict]:
    """Per language: chars, tokens, tokens per char, premium vs `reference`. Sorted by premium, worst first."""
    ref = next((r for r in rows if r["code"] == reference), None)
    if ref is None:
        raise LmstackError(f"the reference language {reference!r} is not among the UDHR rows")
    counts = [len(ids) for ids in tok.encode_batch([r["text"] for r in rows])]
    ref_tokens = counts[rows.index(ref)]
    table = [{"code": r["code"], "name": r["name"], "chars": len(r["text"]), "tokens": n,
              "tokens_per_char": n / max(1, len(r["text"])), "premium": n / max(1, ref_tokens)}
             for r, n in zip(rows, counts)]
    return sorted(table, key=lambda t: -t["premium"])


def premium_summary(table: list[dict]) -> dict:
    premiums = sorted(t["premium"] for t in table)
    return {"languages": len(table), "worst_premium": premiums[-1], "worst_language": table[0]["code"],
            "median_premium": premiums[len(premiums) // 2], "best_premium": premiums[0]}


def write_fertility(table: list[dict], out_dir: str | Path, top: int = 25, title: str = "") -> dict[str, Path]:
    """Write fertility.md (the full sorted table) and fertility.png (the `top` worst and best premiums)."""
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    lines = ["| rank | code | language | chars | tokens | tokens/char | premium vs eng |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k + 1} | {t['code']} | {t['name']} | {t['chars']} | {t['tokens']} | {t['tokens_per_char']:.3f} "
              f"| {t['premium']:.2f} |" for k, t in enumerate(table)]
    atomic_write_text(d / "fertility.md", "\n".join(lines) + "\n")
    shown = table if len(table) <= 2 * top else table[:top] + table[-top:]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(shown)), 5))
    colors = ["tab:red" if t["premium"] > 2 else "tab:orange" if t["premium"] > 1.2 else "tab:green" for t in shown]
    ax.bar(range(len(shown)), [t["premium"] for t in shown], color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([t["code"] for t in shown], rotation=90, fontsize=7)
    ax.set_ylabel("token premium vs English")
    ax.set_title(title or f"UDHR token premium ({len(table)} languages; {min(top, len(table))} worst and best shown)")
    fig.tight_layout()
    png = d / "fertility.png"
    tmp = d / ".fertility.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(png)
    return {"table": d / "fertility.md", "chart": png}
