"""Prompt compression: time to first token saved vs accuracy lost, on synthetic-world reading QA.

Task: "<bio of a person>\nQuestion: <question>\nAnswer:" followed by the fact, which is in the bio.
A small llama-style model (4 x 192) is trained inside the benchmark for a fixed time on such prompts of
*training* people; we evaluate on held-out people, so the answer must come from the bio. Accuracy is
4-way multiple choice by log-likelihood (the true fact vs three facts of the same kind taken from other
people), scored through the engine's prompt logprobs; chance is 25%. A minute of CPU training does not
teach exact-match generation, but it does move the likelihoods.

The same small model scores self-information for compression (LLMLingua-style, as in the paper a
small LM compresses the prompt for a big one): the bio is cut to `rate` of its tokens, the question
is kept. TTFT is measured where it matters, on the ~123M llama-base preset (random weights: prefill
time depends on the token count only): TTFT(compressed) = the small model's scoring pass + the big
model's prefill of the shorter prompt, vs the big model's prefill of the full prompt.

Usage:
    python benchmarks/prompt_compression.py [--train_seconds 150] [--eval 80]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from _common import result, write_result
from _tiny_lm import make_tokenizer, train_for

import lmstack
from lmstack.world import World
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.prompt_compression import compress_ids
from lmstack.model import ModelConfig, Transformer, preset


def examples(world: World, split: str) -> list[tuple[str, str, str, str]]:
    """(bio, question, answer, attribute) for QA pairs of the split's people."""
    bios = {}
    for r in world.corpus("pretrain", split="train"):
        if r["kind"] == "bio":
            bios.setdefault(r["subject"], r["text"])
    out = []
    if split == "train":
        for r in world.corpus("pretrain", split="train"):
            if r["kind"] == "qa":
                q, a = r["text"].split("\nAnswer: ")
                out.append((bios.get(r["subject"]), q.removeprefix("Question: "), a, r["attribute"]))
    else:
        out = [(bios.get(r["person"]), r["question"], r["answer"], r["attribute"]) for r in world.corpus("qa", split=split)]
    return [e for e in out if e[0]]


def prompt(bio: str, question: str) -> str:
    return f"{bio}\nQuestion: {question}\nAnswer:"


def option_logprob(llm: LLM, prompt_ids: list[int], option_ids: list[int]) -> float:
    out = llm.generate([prompt_ids + option_ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    lps = out.prompt_logprobs
    n = len(prompt_ids)
    return sum(lps[n + i][t] for i, t in enumerate(option_ids))


def ttft(llm: LLM, ids: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train_seconds", type=float, default=150)
    ap.add_argument("--eval", type=int, default=80)
    ap.add_argument("--ttft_prompts", type=int, default=8)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = World(seed=0, size="small")
    train = examples(world, "train")
    test = examples(world, "test")
    random.Random(0).shuffle(test)
    test = test[:args.eval]
    texts = [prompt(b, q) + f" {a}\n" for b, q, a, _ in train]
    tok = make_tokenizer(texts, vocab_size=1024)
    ids: list[int] = []
    for t in tok.encode_batch(texts):
        ids.extend(t + [tok.eos_id])
    torch.manual_seed(0)
    small = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                                    max_seq_len=256, eos_token_id=tok.eos_id))
    losses = train_for(small, torch.tensor(ids), args.train_seconds, batch=8, seq_len=160, lr=3e-3)
    print(f"trained {len(losses)} steps, loss {sum(losses[-10:]) / 10:.3f}", flush=True)
    scorer = LLM(small, tokenizer=tok, max_num_seqs=1, enable_prefix_caching=False)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        lmstack.save_model(Transformer(preset("llama-base")), d)
        big = LLM(lmstack.load_model(d), max_num_seqs=1, enable_prefix_caching=False)
    # distractors: the same attribute's answers of other test people
    rng = random.Random(1)
    rows = []
    for rate in [1.0] + args.rates:
        correct, n_prompt, n_full, score_times, prompts = 0, 0, 0, [], []
        for bio, q, a, attr in test:
            full_ids = tok.encode(bio)
            start = time.perf_counter()
            kept = compress_ids(small, tok, full_ids, rate)[0] if rate < 1 else full_ids
            score_times.append(time.perf_counter() - start)
            p_ids = kept + tok.encode(f"\nQuestion: {q}\nAnswer:")
            prompts.append(p_ids)
            others = sorted({x[2] for x in test if x[3] == attr and x[2] != a})
            options = [a] + rng.sample(others, min(3, len(others)))
            scores = [option_logprob(scorer, p_ids, tok.encode(" " + o)) for o in options]
            correct += max(range(len(options)), key=scores.__getitem__) == 0
            n_prompt += len(p_ids)
            n_full += len(full_ids) + len(p_ids) - len(kept)
        rows.append(dict(rate=rate, accuracy=correct / len(test), prompt_tokens=n_prompt / len(test),
                         full_tokens=n_full / len(test), score_s=statistics.median(score_times), prompts=prompts))
    # TTFT on the big model: warm up, then alternate between the rates so all see the same machine noise
    for p in rows[0]["prompts"][:2]:
        ttft(big, p)
    times = {r["rate"]: [] for r in rows}
    for i in range(args.ttft_prompts):
        for r in rows:
            times[r["rate"]].append(ttft(big, r["prompts"][i]))
    for r in rows:
        r["big_ttft_s"] = statistics.median(times[r["rate"]])
        print(f"rate {r['rate']}: MC accuracy {r['accuracy']:.3f}, prompt tokens {r['prompt_tokens']:.1f} "
              f"(of {r['full_tokens']:.1f}), llama-base TTFT {r['big_ttft_s'] * 1000:.0f} ms + scoring "
              f"{r['score_s'] * 1000:.1f} ms", flush=True)
    base = rows[0]
    results = []
    for r in rows[1:]:
        total = r["big_ttft_s"] + r["score_s"]
        results.append(result(
            "prompt_compression", f"ttft_s_rate{r['rate']}", False, total, "uncompressed prompt", base["big_ttft_s"],
            goal=None, prompt_tokens=round(r["prompt_tokens"], 1), prompt_tokens_uncompressed=round(
                base["prompt_tokens"], 1), scoring_s=round(r["score_s"], 4), accuracy=round(r["accuracy"], 3),
            accuracy_uncompressed=round(base["accuracy"], 3), accuracy_lost=round(base["accuracy"] - r["accuracy"], 3),
            chance_accuracy=0.25, eval_questions=len(test), train_steps=len(losses),
            train_loss=round(sum(losses[-10:]) / 10, 3), reader="4x192 llama trained on world QA-with-bio prompts",
            ttft_model="llama-base (random init), batch 1", threads=args.threads))
    write_result("prompt_compression", results)


if __name__ == "__main__":
    main()
