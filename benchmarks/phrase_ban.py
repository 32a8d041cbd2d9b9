"""Hard phrase bans (lmstack.safety.phrase_ban) vs token-id bad_words, on the speedrun's SFT chat model.

Three figures, one run, one process:
1. samples free of every banned phrase (higher is better): our text-level bans vs `bad_words` (the same
   phrases banned as token ids, vLLM's semantics, in four casings) at temperature 1.0; the phrases are the word
   pairs the model itself produces most without bans, so the unbanned rate shows what is at stake. n samples
   each, stderr.
2. decode tokens/s with the bans vs without (the overhead; the same engine settings and prompts).
3. building one automaton state's vocabulary mask: the vectorised walk vs a plain Python walk of every token's
   bytes through the same automaton (the per-state cost a decode step pays at most once).

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/phrase_ban.py [--model DIR] [--world DIR] [--n 300]
"""
from __future__ import annotations

import argparse
import collections
import math
import time
from pathlib import Path

import torch

from _common import result, write_result

import lmstack
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.safety.phrase_ban import TokenTable, find_phrases, normalize, token_table
from lmstack.world import World

RUN = Path("/tmp/sr9/runs/20261207-050757")


def prompts_for(tok, world: World, n: int) -> list[list[int]]:
    people = [p.name for split in ("train", "test") for p in world.people_in(split)]
    asks = ["Tell me about {}.", "Who is {}?", "Write a short story about {}."]
    out = []
    for i in range(n):
        msg = asks[i % len(asks)].format(people[i % len(people)])
        out.append(tok.render_messages([{"role": "user", "content": msg}], True).ids)
    return out


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, float]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    start = time.perf_counter()
    outs = engine.run_to_completion()
    secs = time.perf_counter() - start
    return [o.outputs[0] for o in sorted(outs, key=lambda o: int(o.request_id[1:]))], secs


def frequent_phrases(texts: list[str], k: int) -> list[str]:
    """The k word pairs the model writes most (each at most once per sample): phrases it would produce."""
    counts = collections.Counter()
    for t in texts:
        words = [w.strip(".,!?;:\"'()") for w in normalize(t).split(" ")]
        counts.update({f"{a} {b}" for a, b in zip(words, words[1:]) if len(a) > 2 and len(b) > 2
                       and a.isalpha() and b.isalpha()})
    return [p for p, _ in counts.most_common(k)]


def rate(texts: list[str], phrases: list[str]) -> tuple[float, float]:
    """Fraction of texts free of every phrase, and its standard error."""
    ok = [not find_phrases(t, phrases) for t in texts]
    p = sum(ok) / len(ok)
    return p, math.sqrt(p * (1 - p) / len(ok))


def python_row(automaton, table, q: int) -> list[bool]:
    """The baseline: every token's bytes through the automaton one byte at a time, in Python."""
    return [not automaton.walk_text(b, q)[1] for b in table.token_bytes]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(RUN / "sft/run/model"))
    ap.add_argument("--world", default=str(RUN / "world"))
    ap.add_argument("--n", type=int, default=300, help="samples per arm")
    ap.add_argument("--max_tokens", type=int, default=48)
    ap.add_argument("--phrases", type=int, default=8)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5])
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = lmstack.load_tokenizer(args.model)
    world = World.from_manifest(args.world) if Path(args.world).exists() else World(seed=0, size="small")
    prompts = prompts_for(tok, world, args.n)
    kw = dict(max_num_seqs=32, seed=0)
    results = []
    for temperature in args.temperatures:
        params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True)
        free, _ = generate(LLMEngine(args.model, **kw), prompts, params)
        phrases = frequent_phrases([c.text for c in free], args.phrases)
        free_rate, free_err = rate([c.text for c in free], phrases)
        # the same prompts, seed and phrases, banned as text (ours) or as token ids (bad_words); the baseline
        # gets every casing a reply is likely to use, so what it misses is other token boundaries or whitespace
        ours, _ = generate(LLMEngine(args.model, banned_phrases=phrases, **kw), prompts, params)
        cased = list(dict.fromkeys(v for p in phrases for v in (p, p.capitalize(), p.title(), p.upper())))
        base, _ = generate(LLMEngine(args.model, **kw), prompts, params.clone(bad_words=cased))
        ours_rate, ours_err = rate([c.text for c in ours], phrases)
        base_rate, base_err = rate([c.text for c in base], phrases)
        cfg = dict(model=args.model, n=args.n, temperature=temperature, max_tokens=args.max_tokens,
                   phrases=phrases, vocab=tok.vocab_size, device="cpu", threads=1)
        results.append(result("phrase_ban", "fraction_of_samples_free_of_banned_phrases", True, ours_rate,
                              "token-id bad_words (vLLM semantics)", base_rate, goal=1.0, ours_stderr=ours_err,
                              baseline_stderr=base_err, unbanned=free_rate, unbanned_stderr=free_err, **cfg))
        if temperature == args.temperatures[0]:
            first_phrases, first_cfg = phrases, cfg
    phrases, cfg = first_phrases, first_cfg  # the speed and mask figures use the first temperature's phrases

    # decode speed, with bans vs without: one engine per arm (the same settings and prompts), a first round (which
    # for the bans also builds the tokenizer's byte table and the automaton's state rows), then 5 alternating
    # rounds of one full batch each; the best round per arm is the steady state a server sees
    params = SamplingParams(temperature=cfg["temperature"], max_tokens=args.max_tokens, ignore_eos=True)
    speed = {"with": [], "without": []}
    batch = prompts[:kw["max_num_seqs"]]
    tokens = len(batch) * args.max_tokens
    engines = {"without": LLMEngine(args.model, **kw), "with": LLMEngine(args.model, banned_phrases=phrases, **kw)}
    first = {arm: tokens / generate(e, batch, params)[1] for arm, e in engines.items()}
    for _ in range(5):
        for arm, e in engines.items():
            speed[arm].append(tokens / generate(e, batch, params)[1])
    with_tps, without_tps = max(speed["with"]), max(speed["without"])
    results.append(result("phrase_ban_decode_overhead", "decode_tokens_per_s", True, with_tps,
                          "the same engine without bans", without_tps, goal=0.9, rounds=speed, first_round=first,
                          batch=len(batch), **cfg))

    # one state's mask: vectorised over the vocabulary vs a Python walk per token, on the model's vocabulary and
    # on a 32,768-token stand-in (pairs of its tokens, so token lengths and bytes stay realistic)
    real = token_table(tok, tok.vocab_size)
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, tok.vocab_size, (32768, 2), generator=g).tolist()
    big = TokenTable([real.token_bytes[a] + real.token_bytes[b] for a, b in pairs])
    for table, label in ((real, "model vocabulary"), (big, "32k stand-in")):
        automaton = table.automaton(phrases)
        q = automaton.walk_text(phrases[0][:-1].encode())[0]  # a state one byte short of a phrase
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            vec = automaton._build_rows(q)[0]
        vec_s = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        slow = python_row(automaton, table, q)
        py_s = time.perf_counter() - start
        assert vec.tolist() == slow, "the vectorised mask differs from the Python walk"
        results.append(result("phrase_ban_state_mask", "seconds_per_state_mask", False, vec_s,
                              "python walk of every token", py_s, goal=2.0, table=label, table_vocab=table.vocab,
                              banned_in_state=int((~vec).sum()), **{**cfg, "vocab": table.vocab}))
    for r in results:  # a baseline of 0 has no finite ratio (JSON has no inf): bound it by the resolution, 1/n
        if not math.isfinite(r["ratio"]):
            r["ratio"] = round(r["ours"] / (1 / args.n), 4)
            r["config"]["ratio_note"] = "baseline was 0; ratio uses 1/n in its place (a lower bound)"
    write_result("phrase_ban", results)


if __name__ == "__main__":
    main()
