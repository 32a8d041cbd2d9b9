"""Context compression into soft tokens: AutoCompressor summary vectors (model/memory/summary.py) on passkey
retrieval, against full context, no context, and LLMLingua-style prompt compression (infer/prompt_compression.py).

The world's passkey documents (world/passkey.py, repeated-line filler) are cut to a prefix of exactly P tokens
with the needle "The pass key is 48213. Remember it. ..." at a random depth; the suffix " What is the pass key?
48213." must reproduce the key. Every arm trains the same tiny model from the same init for the same steps on
the same batches (loss on every token it sees, the 5 key digits weighted 10x):
- full context: [prefix, suffix] in one window (the upper bound: the suffix attends to all P prefix tokens);
- no prefix: the suffix alone (the lower bound: the key's digits are guessed, 0.1 each);
- summary k: the prefix is one segment followed by k summary tokens; the suffix sees only the k summary vectors;
- prompt compression: the full-context model reads its prefix pruned by self-information (the same model as
  the scorer) to about k tokens, then the suffix. No training of its own: what LLMLingua does to a given model.
- chained (--chain 3, the "handle books" claim): the prefix is 3 segments of 32 tokens, the needle in the
  first, filler in the others; summaries pass segment to segment (accumulated: the suffix sees 3k vectors;
  recursive: only the last k, which must carry the key through two more compressions), backprop through the
  whole chain. Its own step budget (--chain-steps), the same for its full / no-prefix / summary arms.
Metric: key accuracy (all 5 digits right under greedy decoding = every teacher-forced argmax right), n = eval
rows, stderr = sqrt(p(1-p)/n); digit accuracy beside it. "attended" is the number of positions the suffix
attends to besides itself. Prefill seconds: one suffix forward at batch 1 given the context (soft vectors, or
the raw prefix), median of repeats; the summary arm's one-off compression of the prefix is timed apart.

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/context_compression.py     # ~12 min on 2 lightly shared cores
    python benchmarks/context_compression.py --steps 60 --chain-steps 60 --n 64   # a quick look
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from _common import result, timeit, write_result

from lmstack.infer.prompt_compression import compress_ids
from lmstack.model import ModelConfig, Transformer
from lmstack.model.memory.summary import AutoCompressor
from lmstack.tokenizer import train_tokenizer
from lmstack.world.passkey import REPEAT_FILLER, make_passkey_document

SUFFIX = " What is the pass key? {key}."
WEIGHT = 10.0  # the key digits: 5 of ~80 tokens, and the only ones that need the prefix


class Task:
    """Passkey rows of fixed shape: prefix (chain * P tokens, needle in the first P), suffix (S tokens)."""

    def __init__(self, p: int, chain: int):
        probe = [make_passkey_document(random.Random(i), 60, "words", 0.5, "repeat")["text"] for i in range(50)]
        probe += [SUFFIX.format(key=random.Random(i).randint(10000, 99999)) for i in range(50)]
        self.tok = train_tokenizer(texts=probe, type="bpe", vocab_size=512, split_digits=True,
                                   special_tokens="chat", show_progress=False)
        self.filler = self.tok.encode(" " + " ".join(REPEAT_FILLER * 40))
        self.p, self.chain = p, chain
        self.s = len(self.tok.encode(SUFFIX.format(key=12345)))

    def row(self, rng: random.Random) -> tuple[list[int], list[int], str]:
        key = rng.randint(10000, 99999)
        words = self.p
        while True:  # the longest document (in words) whose tokens fit in P
            doc = make_passkey_document(rng, words, "words", rng.random(), "repeat", key=key)
            ids = self.tok.encode(doc["text"])
            if len(ids) <= self.p:
                break
            if words == 13:  # the needle alone is 12 words
                raise SystemExit(f"a prefix of {self.p} tokens cannot hold the needle; use a larger --p")
            words = max(13, words * self.p // len(ids) - 1)
        start = rng.randrange(len(self.filler) - self.p * self.chain)
        pad = self.filler[start:start + self.p - len(ids)]  # filler in front: the needle's depth varies more
        prefix = pad + ids
        for c in range(1, self.chain):  # later segments: filler only, so the fact lives in segment 1 alone
            prefix += self.filler[start + c * self.p:start + (c + 1) * self.p]
        suffix = self.tok.encode(SUFFIX.format(key=key))
        assert len(suffix) == self.s, "the suffix must tokenize to a fixed length"
        return prefix, suffix, str(key)

    def batch(self, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(rng) for _ in range(n)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (per * weights.flatten()).sum() / weights.sum()


def suffix_weights(s: int, batch: int) -> torch.Tensor:
    """Weights of the suffix's next-token targets (positions 0..s-2): the 5 key digits (before '.') x10."""
    w = torch.ones(batch, s - 1)
    w[:, s - 7:s - 2] = WEIGHT  # targets s-7..s-3 are the digits: the last target is '.'
    return w


def arm_logits(arm: str, model, comp, prefix, suffix, seg: int):
    """(logits over the suffix's own positions, all the arm's logits, all its targets) for one batch."""
    if arm == "full":
        ids = torch.cat([prefix, suffix], 1)
        logits = model(ids[:, :-1])
        return logits[:, -(suffix.shape[1] - 1):], logits, ids[:, 1:]
    if arm == "none":
        logits = model(suffix[:, :-1])
        return logits, logits, suffix[:, 1:]
    ids = torch.cat([prefix, suffix], 1)
    logits, _, _ = comp(ids[:, :-1], seg_len=seg)
    return logits[:, -(suffix.shape[1] - 1):], logits, ids[:, 1:]


def train_arm(arm: str, task: Task, cfg: ModelConfig, k: int, steps: int, batch: int, accumulate: bool = True):
    torch.manual_seed(0)
    model = Transformer(cfg)
    # bptt over every segment: the suffix's loss must reach the first segment, where the needle is
    comp = AutoCompressor(model, k=k, accumulate=accumulate, bptt=task.chain + 1) if arm == "summary" else None
    params = list((comp or model).parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(1)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        prefix, suffix = task.batch(rng, batch)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        _, logits, targets = arm_logits(arm, model, comp, prefix, suffix, task.p)
        w = torch.ones_like(targets, dtype=torch.float)
        w[:, -(task.s - 1):] = suffix_weights(task.s, batch)
        loss = weighted_loss(logits, targets, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    log = {"steps": steps, "first_loss": round(losses[0], 3), "final_loss": round(sum(tail) / len(tail), 3),
           "seconds": round(time.perf_counter() - start, 1)}
    return model, comp, log


def key_accuracy(suffix_logits: torch.Tensor, suffix: torch.Tensor) -> tuple[float, float]:
    """(key exact-match, digit accuracy) from the suffix logits at the digits' positions."""
    s = suffix.shape[1]
    pred = suffix_logits[:, s - 7:s - 2].argmax(-1)
    gold = suffix[:, s - 6:s - 1]
    right = pred == gold
    return float(right.all(-1).float().mean()), float(right.float().mean())


def binom_stderr(acc: float, n: int) -> float:
    """sqrt(p(1-p)/n); for digit accuracy the 5 digits of a row are not independent, so it is a lower bound."""
    return round(math.sqrt(acc * (1 - acc) / n), 4)


def stats(acc: float, n: int) -> dict:
    return {"acc": round(acc, 4), "n": n, "stderr": binom_stderr(acc, n)}


@torch.no_grad()
def evaluate(arm: str, task: Task, model, comp, n: int) -> dict:
    prefix, suffix = task.batch(random.Random(2), n)
    logits, _, _ = arm_logits(arm, model, comp, prefix, suffix, task.p)
    key, digit = key_accuracy(logits, suffix)
    return {**stats(key, n), "digit_acc": round(digit, 4), "digit_n": 5 * n}


@torch.no_grad()
def evaluate_lingua(task: Task, model, n: int, rate: float) -> dict:
    """The full-context model on prefixes pruned by its own self-information to about rate * P tokens."""
    prefix, suffix = task.batch(random.Random(2), n)
    keys = digits = kept_total = 0
    example = ""
    for i in range(n):
        kept, _ = compress_ids(model, task.tok, prefix[i].tolist(), rate=rate)
        example = example or task.tok.decode(kept)
        kept_total += len(kept)
        ids = torch.tensor([kept + suffix[i].tolist()])
        logits = model(ids[:, :-1])[:, -(task.s - 1):]
        key, digit = key_accuracy(logits, suffix[i:i + 1])
        keys, digits = keys + key, digits + digit
    return {**stats(keys / n, n), "digit_acc": round(digits / n, 4), "digit_n": 5 * n,
            "attended": round(kept_total / n, 1), "example_kept": example}


@torch.no_grad()
def prefill_seconds(arm: str, task: Task, model, comp) -> dict:
    prefix, suffix = task.batch(random.Random(3), 1)
    if arm == "summary":
        soft = comp.compress(prefix, task.p)
        return {"prefill_s": timeit(lambda: comp.segment(suffix, soft), repeat=20),
                "compress_s": timeit(lambda: comp.compress(prefix, task.p), repeat=10)}
    ids = torch.cat([prefix, suffix], 1) if arm == "full" else suffix
    return {"prefill_s": timeit(lambda: model(ids), repeat=20)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=48, help="prefix tokens (one segment)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of every arm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=256, help="eval rows")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ks", default="4,16", help="summary tokens per segment (one arm each)")
    ap.add_argument("--chain", type=int, default=3, help="segments in the chained case (1 = skip it)")
    ap.add_argument("--chain-p", type=int, default=32, help="tokens per segment in the chained case")
    ap.add_argument("--chain-k", type=int, default=16)
    ap.add_argument("--chain-batch", type=int, default=16)
    ap.add_argument("--chain-steps", type=int, default=1500, help="training steps of every arm, chained case")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only contends on busy cores
    t0 = time.perf_counter()
    out = []
    cases = [(1, args.p, [int(k) for k in args.ks.split(",")], args.batch, args.steps)]
    if args.chain > 1:
        cases.append((args.chain, args.chain_p, [args.chain_k], args.chain_batch, args.chain_steps))
    for chain, p, ks, batch, steps in cases:
        task = Task(p, chain)
        cfg = ModelConfig(vocab_size=task.tok.vocab_size, d_model=64, n_layers=args.layers, n_heads=4,
                          max_seq_len=chain * p + task.s + chain * max(ks), mlp="swiglu", norm="rmsnorm",
                          position="rope")
        common = dict(prefix_tokens=chain * p, segments=chain, suffix_tokens=task.s, steps=steps,
                      batch=batch, model=f"d64 L{args.layers} H4 swiglu rope", vocab=task.tok.vocab_size,
                      task="world passkey (repeat filler), 5-digit key, needle in segment 1",
                      scoring="key exact match (greedy); digit_acc beside it", chance_digit=0.1)
        rows = {}
        full, _, log_full = train_arm("full", task, cfg, 0, steps, batch)
        rows["full"] = {**evaluate("full", task, full, None, args.n), "attended": chain * p, "train": log_full,
                        **prefill_seconds("full", task, full, None)}
        none, _, log_none = train_arm("none", task, cfg, 0, steps, batch)
        rows["none"] = {**evaluate("none", task, none, None, args.n), "attended": 0, "train": log_none,
                        **prefill_seconds("none", task, none, None)}
        for k in ks:
            for accumulate in ((True, False) if chain > 1 else (True,)):
                model, comp, log = train_arm("summary", task, cfg, k, steps, batch, accumulate)
                name = f"summary_k{k}" + ("" if chain == 1 else ("_accumulated" if accumulate else "_recursive"))
                rows[name] = {**evaluate("summary", task, model, comp, args.n), "train": log,
                              "attended": k * (chain if accumulate else 1), **prefill_seconds("summary", task, model, comp)}
            if chain == 1:
                rows[f"prompt_compression_{k}"] = {**evaluate_lingua(task, full, args.n, k / p),
                                                   "rate": round(k / p, 4)}
        for name, row in rows.items():
            print(f"chain={chain} {name}: {row}", flush=True)
        tag = f"chain{chain}_" if chain > 1 else ""
        for name, row in rows.items():
            if name in ("full", "none"):
                continue
            cfg_row = dict(**common, arm=name, n=row["n"], stderr=row["stderr"], key_acc=row["acc"],
                           digit_acc=row["digit_acc"], digit_n=row["digit_n"], digit_stderr=binom_stderr(
                               row["digit_acc"], row["digit_n"]), attended=row["attended"], rows={n_: {k_: v for k_, v in r.items() if k_ != "train"}
                                                           for n_, r in rows.items()},
                           training={n_: r["train"] for n_, r in rows.items() if "train" in r})
            # two figures per arm: against the lower bound (what the soft tokens carry: digit accuracy, as the
            # key accuracy of a guess is ~1e-5) and against the upper bound (key accuracy)
            out.append(result(f"context_compression_{tag}{name}_vs_no_prefix", "digit_accuracy", True,
                              row["digit_acc"], "no prefix (suffix alone, same training)", rows["none"]["digit_acc"],
                              goal=None, **cfg_row))
            out.append(result(f"context_compression_{tag}{name}_vs_full", "key_accuracy", True, row["acc"],
                              f"full context ({chain * p} prefix tokens, same training)", rows["full"]["acc"],
                              goal=None, **cfg_row))
    for r in out:
        r["config"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_result("context_compression", out)


if __name__ == "__main__":
    main()
