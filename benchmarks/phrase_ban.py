"""Hard phrase bans (lmstack.safety.phrase_ban) vs token-id bad_words, in one run, one process.

1. samples free of every banned phrase (higher is better), on the speedrun's SFT chat model at temperature
   1.0: our text-level bans vs `bad_words` (the same phrases banned as token ids, vLLM's semantics), once with
   the phrases as given and once with each phrase in four casings (as given, Capitalized, Title, UPPER). The
   phrases are the word pairs the model itself writes most without bans, so the unbanned rate shows what is at
   stake. n samples per arm, with stderr.
2. the same on phrases that cross word boundaries inside the text ("e wo" of "the word"), where a phrase's own
   tokenization is not how the model spells it: a tiny llama trained here for a few seconds on word salad,
   1,000 samples per arm at temperature 1.5 (the issue's test setting).
3. decode tokens/s with the bans vs without (the overhead; the same engine settings and prompts).
4. building one automaton state's vocabulary mask: the vectorised walk vs a plain Python walk of every token's
   bytes through the same automaton (the per-state cost a decode step pays at most once).

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/phrase_ban.py [--model DIR] [--world DIR] [--n 300]
"""
from __future__ import annotations

import argparse
import collections
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

import lmstack
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.model.presets import preset
from lmstack.safety.phrase_ban import TokenTable, find_phrases, normalize, token_table
from lmstack.tokenizer import train_tokenizer
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


WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in old trees near green hills "
         "under blue sky where people walk each day with friends who talk about time work life").split()


def word_salad_model():
    """(tokenizer, model): a BPE tokenizer and a tiny llama trained for 150 steps on random word sequences."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "." for _ in range(400)]
    tok = train_tokenizer(texts=lines, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, d_model=32, n_layers=1, n_heads=2)
    model = lmstack.Transformer(cfg)
    ids = torch.tensor([t for line in lines for t in tok.encode(" " + line)], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g).tolist()
        batch = torch.stack([ids[i:i + 33] for i in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok, model.eval()


def cross_boundary_phrases(texts: list[str], k: int) -> list[str]:
    """The k four-character strings with a space inside that the samples hold most: they span two tokens."""
    counts = collections.Counter()
    for t in texts:
        t = normalize(t)
        counts.update({t[i:i + 4] for i in range(len(t) - 3)
                       if t[i + 1] == " " and t[i:i + 4].replace(" ", "").isalpha()})
    return [p for p, _ in counts.most_common(k)]


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
    ap.add_argument("--small_n", type=int, default=1000, help="samples per arm on the word-salad model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = lmstack.load_tokenizer(args.model)
    world = World.from_manifest(args.world) if Path(args.world).exists() else World(seed=0, size="small")
    prompts = prompts_for(tok, world, args.n)
    kw = dict(max_num_seqs=32, seed=0)
    results = []
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True)
    free, _ = generate(LLMEngine(args.model, **kw), prompts, params)
    phrases = frequent_phrases([c.text for c in free], args.phrases)
    free_rate, free_err = rate([c.text for c in free], phrases)
    # the same prompts, seed and phrases, banned as text (ours) or as token ids (bad_words)
    ours, _ = generate(LLMEngine(args.model, banned_phrases=phrases, **kw), prompts, params)
    ours_rate, ours_err = rate([c.text for c in ours], phrases)
    cfg = dict(model=args.model, n=args.n, temperature=1.0, max_tokens=args.max_tokens, phrases=phrases,
               vocab=tok.vocab_size, device="cpu", threads=1)
    cased = list(dict.fromkeys(v for p in phrases for v in (p, p.capitalize(), p.title(), p.upper())))
    for name, words, label in (("phrase_ban", phrases, "token-id bad_words (vLLM semantics), phrases as given"),
                               ("phrase_ban_vs_cased_bad_words", cased,
                                "token-id bad_words, each phrase in 4 casings")):
        base, _ = generate(LLMEngine(args.model, **kw), prompts, params.clone(bad_words=words))
        base_rate, base_err = rate([c.text for c in base], phrases)
        results.append(result(name, "fraction_of_samples_free_of_banned_phrases", True, ours_rate, label,
                              base_rate, goal=1.0, ours_stderr=ours_err, baseline_stderr=base_err,
                              unbanned=free_rate, unbanned_stderr=free_err, **cfg))

    # phrases across word boundaries on the word-salad model, 1,000 samples per arm at temperature 1.5
    small_tok, small = word_salad_model()
    hot = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    small_kw = dict(tokenizer=small_tok, max_num_seqs=128, seed=0)
    seed_prompts = [small_tok.encode("the")] * args.small_n
    free, _ = generate(LLMEngine(small, **small_kw), seed_prompts, hot)
    cross = cross_boundary_phrases([c.text for c in free], args.phrases)
    free_rate, free_err = rate([c.text for c in free], cross)
    ours, _ = generate(LLMEngine(small, banned_phrases=cross, **small_kw), seed_prompts, hot)
    base, _ = generate(LLMEngine(small, **small_kw), seed_prompts, hot.clone(bad_words=cross))
    ours_rate, ours_err = rate([c.text for c in ours], cross)
    base_rate, base_err = rate([c.text for c in base], cross)
    results.append(result("phrase_ban_cross_boundary", "fraction_of_samples_free_of_banned_phrases", True, ours_rate,
                          "token-id bad_words (vLLM semantics)", base_rate, goal=1.0, ours_stderr=ours_err,
                          baseline_stderr=base_err, unbanned=free_rate, unbanned_stderr=free_err,
                          model="tiny llama (d=32, 1 layer) trained 150 steps on word salad", n=args.small_n,
                          temperature=1.5, max_tokens=16, phrases=cross, vocab=small_tok.vocab_size, device="cpu",
                          threads=1))

    # decode speed, with bans vs without: one engine per arm (the same settings and prompts), a first round (which
    # for the bans also builds the tokenizer's byte table and the automaton's state rows), then 7 alternating
    # rounds of one full batch each; the best round per arm is the steady state a server sees
    speed = {"with": [], "without": []}
    batch = prompts[:kw["max_num_seqs"]]
    tokens = len(batch) * args.max_tokens
    engines = {"without": LLMEngine(args.model, **kw), "with": LLMEngine(args.model, banned_phrases=phrases, **kw)}
    first = {arm: tokens / generate(e, batch, params)[1] for arm, e in engines.items()}
    for _ in range(7):
        for arm, e in engines.items():
            speed[arm].append(tokens / generate(e, batch, params)[1])
    with_tps, without_tps = max(speed["with"]), max(speed["without"])
    results.append(result("phrase_ban_decode_overhead", "decode_tokens_per_s", True, with_tps,
                          "the same engine without bans", without_tps, goal=0.9, rounds=speed, first_round=first,
                          median_ratio=round(statistics.median(speed["with"]) / statistics.median(speed["without"]), 4),
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
            r["ratio"] = round(r["ours"] * r["config"]["n"], 4)
            r["config"]["ratio_note"] = "baseline was 0; ratio uses 1/n in its place (a lower bound)"
    write_result("phrase_ban", results)


if __name__ == "__main__":
    main()
