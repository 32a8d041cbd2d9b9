"""RAG end to end on the synthetic world's held-out QA: does retrieval make the speedrun's chat model right, and
does fact checking catch what is wrong?

Figures (each a result object; every rate carries n and stderr in its config):
- world_qa_accuracy: RAG (ours) against the same model closed-book (baseline), on held-out people and
  phrasings (QA split "test"); the issue's goal is +40 points (config.gain_points).
- hallucination_rate: answers that state something other than the truth, RAG against closed-book, and
  RAG after fact-check revision (unsupported claims dropped) against RAG.
- unsupported_claim_rate: claims the fact checker does not label supported, RAG against closed-book.
- factcheck_f1 (+ precision and recall in config): flagging planted false facts (the world's true claims with
  one attribute value swapped) among true ones; ours = the NLI judge, baseline = the LM's yes/no likelihood
  (rag/factcheck.py's `lm` judge) with the same model and evidence.
- latency_per_question: one question at a time, retrieval + generation (ours, RAG) against the closed-book
  answer alone (baseline): what retrieval and the longer prompt cost.
- world_qa_accuracy_context_tuned (--tune_seconds > 0): the model fine-tuned briefly on retrieval-formatted chats
  of the train split (RAG.training_chats), with RAG, against the SFT model closed-book.

A ratio is null where its denominator is zero (e.g. a closed-book accuracy of 0); config.difference has the gap.

- world_qa_accuracy_extractive (a diagnostic, not the pipeline): the same RAG prompts, but the answer is
  constrained by guided decoding (`choice`) to a tail of one sentence of the retrieved passages plus its
  citation, so the model only has to pick where to start copying; against free generation. It separates
  "cannot copy" from "cannot find the answer in its context".
- world_qa_accuracy_sft_without_retrieval_chats (--plain_model): an SFT model whose mix had no retrieval-formatted
  chats (`lmstack speedrun --rag false`), with RAG, against the same model closed-book: what reading a context
  needs beyond chat SFT.

The prompts are the speedrun RAG stage's (lmstack.stages.rag: whole bios, top k=2 by BM25, a 24-token answer
budget), so the speedrun's SFT model, whose mix had those chats, is asked as it was trained.

Run (under the shared lock; the model is the newest speedrun's SFT model under runs/ by default):
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/rag.py --n 200
    .venv/bin/python benchmarks/rag.py --model runs/x/sft/run/model --world runs/x/world \
        --plain_model runs/y/sft/run/model --n 100
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import RESULTS, result

import lmstack
from lmstack.rag.answer import RAG, evaluate_world_qa, world_qa_items
from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.rag.factcheck import FactChecker, LMJudge, default_nli
from lmstack.infer.sampling_params import SamplingParams
from lmstack.rag.prompt import RagPromptWarning, split_sentences
from lmstack.stages.rag import MAX_TOKENS, build_world_index
from lmstack.train.config import TrainConfig
from lmstack.world import World
from lmstack.world.qa import answer_sentence

NAME = "rag"


def find_sft_model() -> tuple[str, str]:
    """(the newest speedrun's SFT model dir under runs/, its world dir)."""
    found = sorted(glob.glob("runs/*/sft/**/config.json", recursive=True), key=os.path.getmtime)
    if not found:
        raise SystemExit("no SFT model under runs/*/sft yet (run `make speedrun`); or pass --model and --world")
    model = Path(found[-1]).parent
    run = next(p for p in model.parents if p.parent.name == "runs")
    return str(model), str(run / "world")


def planted_claims(world, people, n: int, seed: int) -> list[tuple[str, bool]]:
    """n (claim, is_false) pairs: a true claim and the same claim with its value swapped, about `people`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n // 2):
        person, attribute = rng.choice(people), rng.choice(["birth_city", "university", "major", "employer",
                                                             "employer_city", "profession", "hobby", "birth_date"])
        true = world.fact(person, attribute)
        out.append((answer_sentence(person, attribute), False))
        out.append((answer_sentence(person, attribute, world.other_value(attribute, true, rng)), True))
    return out


def prf(flags: list[bool], truth: list[bool]) -> dict:
    tp = sum(f and t for f, t in zip(flags, truth))
    fp = sum(f and not t for f, t in zip(flags, truth))
    fn = sum(t and not f for f, t in zip(flags, truth))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    n_pos, n_flag = tp + fn, tp + fp
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "n": len(flags),
            "n_false": n_pos, "n_flagged": n_flag,
            "precision_stderr": math.sqrt(p * (1 - p) / n_flag) if n_flag else 0.0,
            "recall_stderr": math.sqrt(r * (1 - r) / n_pos) if n_pos else 0.0}


def rate_result(metric: str, ours: dict, baseline_name: str, base: dict, higher: bool, **config) -> dict:
    r = result(NAME, metric, higher, ours["value"], baseline_name, base["value"], **config,
               ours_n=ours["n"], ours_stderr=round(ours["stderr"], 4), baseline_n=base["n"],
               baseline_stderr=round(base["stderr"], 4))
    if not math.isfinite(r["ratio"]):
        r["ratio"] = None  # a zero baseline (or zero ours for lower-is-better): the difference says it
    r["config"]["difference"] = round(ours["value"] - base["value"], 4)
    return r


def write_results(results: list[dict]) -> Path:
    """results/rag.json, atomically (as _common.write_result, which cannot print a None ratio)."""
    for r in results:  # JSON has no Infinity: a zero denominator leaves the ratio null
        if r["ratio"] is not None and not math.isfinite(r["ratio"]):
            r["ratio"] = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    for r in results:
        ratio = "n/a (zero denominator)" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['metric']}: ours={r['ours']:.4g} {r['baseline']['name']}={r['baseline']['value']:.4g} ratio={ratio}")
    print(f"wrote {path}")
    return path


def tune_on_context(rag: RAG, world, model: str, out: str, seconds: float, seed: int) -> tuple[str, dict]:
    """Fine-tune `model` (full) for `seconds` on retrieval-formatted chats of the world's train-split QA (the
    prompt `rag.ask` builds, the answer sentence citing its chunk); returns (the tuned model dir, summary)."""
    items = world.corpus("qa", split="train")
    random.Random(seed).shuffle(items)
    items = items[:4000]
    people = {p.name: p for p in world.people}
    pairs = [(it["question"], answer_sentence(people[it["person"]], it["attribute"])) for it in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RagPromptWarning)  # most bios are cut to fit a short context: expected
        chats = rag.training_chats(pairs, gold=[it["answer"] for it in items])
    data = Path(out) / "chats.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    cfg = FinetuneConfig(method="full", data=str(data), model=model, out=str(Path(out) / "run"),
                         train=TrainConfig(steps=100_000, max_seconds=seconds, eval_every=0, eval_batches=2,
                                           log_every=20, keep_checkpoints=1, seed=seed),
                         batch_size=8, seq_len=rag.max_model_len)
    summary = finetune(cfg)
    return str(summary["result"]), {k: summary.get(k) for k in ("steps", "final_loss", "val_loss", "train_seconds")}


def sentence_tails(hits) -> list[str]:
    """Every tail of every sentence of the numbered passages, with the passage's citation: the answers an
    extractive reader may give ('Vertex Mining [1].', 'has a job at Vertex Mining [1].', ...)."""
    tails = set()
    for n, h in enumerate(hits, 1):
        for sentence in split_sentences(h.chunk.text):
            words = sentence.rstrip(".!?").split()
            tails.update(" ".join(words[i:]) + f" [{n}]." for i in range(len(words)))
    return sorted(tails)


def extractive_accuracy(rag: RAG, world, items: list[dict]) -> dict:
    """World QA accuracy when the answer must be a sentence tail of the retrieved passages (guided `choice`)."""
    convs, params = [], []
    for it in items:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RagPromptWarning)
            prompt = rag.prompt(it["question"], rag.retrieve(it["question"]))
        convs.append(prompt.messages)
        params.append(SamplingParams(max_tokens=48, temperature=0.0, choice=sentence_tails(prompt.hits)))
    outs = rag.llm.chat(convs, params)
    ok = [world.is_correct(it["person"], it["attribute"], o.outputs[0].text) for it, o in zip(items, outs)]
    p = sum(ok) / len(ok)
    return {"value": p, "n": len(ok), "stderr": math.sqrt(p * (1 - p) / len(ok)),
            "examples": [{"question": it["question"], "gold": it["answer"], "answer": o.outputs[0].text}
                         for it, o in list(zip(items, outs))[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="chat model directory (default: the newest speedrun's SFT model)")
    ap.add_argument("--world", help="the world folder (manifest.json) the model was trained on")
    ap.add_argument("--n", type=int, default=200, help="held-out QA items")
    ap.add_argument("--n_claims", type=int, default=200, help="planted claims for the fact checker (half false)")
    ap.add_argument("--k", type=int, default=2, help="chunks per prompt (the speedrun's RAG stage: 2)")
    ap.add_argument("--mode", default="bm25", choices=["bm25", "dense", "hybrid"],
                    help="retrieval for the prompts (the speedrun's RAG stage: bm25)")
    ap.add_argument("--plain_model", help="an SFT model fine-tuned without retrieval chats, also asked with RAG")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--latency_n", type=int, default=20, help="questions timed one at a time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune_seconds", type=float, default=0.0,
                    help="also fine-tune the model this long on retrieval-formatted chats and evaluate it (0 = skip)")
    ap.add_argument("--tune_out", default="/tmp/rag_bench_tuned")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)  # accuracies do not depend on it; the latency ratio is same-run
    model, world_dir = (args.model, args.world) if args.model else find_sft_model()
    world = World.from_manifest(args.world or world_dir)
    print(f"model {model}, world {args.world or world_dir}: {len(world.people)} people")

    t0 = time.perf_counter()
    index = build_world_index(world, None, args.embedder)
    index_s = time.perf_counter() - t0
    llm = lmstack.LLM(model, max_num_seqs=16)
    rag = RAG(llm, index, k=args.k, mode=args.mode, max_tokens=MAX_TOKENS)
    checker = FactChecker(None, index, k=5, mode=args.mode)
    items = world_qa_items(world, "test", args.n, seed=args.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RagPromptWarning)
        m = evaluate_world_qa(rag, world, items, checker)
    n_trimmed = sum(issubclass(w.category, RagPromptWarning) for w in caught)
    eval_s = time.perf_counter() - t0
    common = {"model": model, "n_people": len(world.people), "split": "test (held-out people and phrasing)",
              "k": args.k, "mode": args.mode, "embedder": index.embedder_name, "threads": args.threads,
              "index_build_s": round(index_s, 2), "eval_s": round(eval_s, 1), "max_model_len": rag.max_model_len,
              "prompts_trimmed": n_trimmed, "load_avg_1min_at_start": load_at_start}
    for key, v in m.items():
        if isinstance(v, dict) and "stderr" in v:
            print(f"  {key:<40} {v['value']:.3f} ± {v['stderr']:.3f} (n={v['n']})")
    results = [
        rate_result("world_qa_accuracy", m["accuracy_rag"], "closed-book (same model, no retrieval)",
                    m["accuracy_closed_book"], True, gain_points=round(100 * (m["accuracy_rag"]["value"]
                                                                          - m["accuracy_closed_book"]["value"]), 1),
                    goal_points=40, retrieval_gold_in_context=m["retrieval_gold_in_context"],
                    citations_present=m["citations_present"], citations_ok=m["citations_ok"],
                    examples=m["examples"], **common),
        rate_result("hallucination_rate", m["hallucination_rag"], "closed-book", m["hallucination_closed_book"],
                    False, **common),
        rate_result("hallucination_rate_after_revision", m["hallucination_rag_revised"], "RAG without revision",
                    m["hallucination_rag"], False, abstained=m["abstained_rag_revised"],
                    accuracy_after_revision=m["accuracy_rag_revised"], **common),
        rate_result("unsupported_claim_rate", m["unsupported_claims_rag"], "closed-book",
                    m["unsupported_claims_closed_book"], False,
                    answers_with_unsupported_claim_rag=m["answers_with_unsupported_claim_rag"],
                    answers_with_unsupported_claim_closed_book=m["answers_with_unsupported_claim_closed_book"],
                    **common),
    ]

    ext = extractive_accuracy(rag, world, items)
    results.append(rate_result("world_qa_accuracy_extractive", ext, "free generation (RAG)", m["accuracy_rag"],
                               True, examples=ext["examples"], **common))

    # the fact checker on planted false facts: the nli judge against the LM's yes/no likelihood
    claims = planted_claims(world, world.people_in("test"), args.n_claims, args.seed + 1)
    truth = [bad for _, bad in claims]
    scores = {}
    for name, judge in (("nli", default_nli()), ("lm", LMJudge(llm))):
        fc = FactChecker(llm, index, k=5, mode=args.mode, judge=judge)
        t0 = time.perf_counter()
        flags = [fc.verdict(c).label != "supported" for c, _ in claims]
        scores[name] = {**prf(flags, truth), "seconds_per_claim": (time.perf_counter() - t0) / len(claims)}
        print(f"  factcheck {name}: {scores[name]}")
    results.append(result(NAME, "factcheck_f1", True, scores["nli"]["f1"], "LM yes/no likelihood judge",
                          scores["lm"]["f1"], nli=scores["nli"], lm=scores["lm"],
                          planted="true claims and the same claims with one attribute value swapped (half each)",
                          **common))

    # latency: one question at a time
    lat_q = [it["question"] for it in items[:args.latency_n]]
    rag_times, closed_times = [], []
    for q in lat_q:
        t0 = time.perf_counter()
        rag.ask(q)
        rag_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rag.ask_closed_book(q)
        closed_times.append(time.perf_counter() - t0)
    results.append(result(NAME, "latency_per_question_s", False, statistics.median(rag_times),
                          "closed-book answer alone", statistics.median(closed_times), n=len(lat_q),
                          rag_mean_s=statistics.mean(rag_times), closed_mean_s=statistics.mean(closed_times),
                          batched_rag_s_per_question=m["seconds_per_question_batched"], **common))
    if args.tune_seconds > 0:  # the "model fine-tuned to use context"
        tuned, summary = tune_on_context(rag, world, model, args.tune_out, args.tune_seconds, args.seed)
        tuned_rag = RAG(lmstack.LLM(tuned, max_num_seqs=16), index, k=args.k, mode=args.mode, max_tokens=MAX_TOKENS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RagPromptWarning)
            t = evaluate_world_qa(tuned_rag, world, items, checker)
        results.append(rate_result(
            "world_qa_accuracy_context_tuned", t["accuracy_rag"], "closed-book SFT model (no retrieval)",
            m["accuracy_closed_book"], True, tuned_model=tuned, tune=summary,
            gain_points=round(100 * (t["accuracy_rag"]["value"] - m["accuracy_closed_book"]["value"]), 1),
            goal_points=40, tuned_closed_book=t["accuracy_closed_book"], citations_ok=t["citations_ok"],
            hallucination_rag=t["hallucination_rag"], hallucination_rag_revised=t["hallucination_rag_revised"],
            unsupported_claims_rag=t["unsupported_claims_rag"], examples=t["examples"], **common))
    if args.plain_model:  # the same questions to a chat model that never saw a retrieval-formatted chat
        plain = RAG(lmstack.LLM(args.plain_model, max_num_seqs=16), index, k=args.k, mode=args.mode,
                    max_tokens=MAX_TOKENS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RagPromptWarning)
            p = evaluate_world_qa(plain, world, items)
        results.append(rate_result(
            "world_qa_accuracy_sft_without_retrieval_chats", p["accuracy_rag"], "the same model closed-book",
            p["accuracy_closed_book"], True, plain_model=args.plain_model,
            gain_points=round(100 * (p["accuracy_rag"]["value"] - p["accuracy_closed_book"]["value"]), 1),
            citations_present=p["citations_present"], hallucination_rag=p["hallucination_rag"],
            examples=p["examples"], **{**common, "model": args.plain_model}))
    write_results(results)


if __name__ == "__main__":
    main()
