"""Synthetic-world tasks: knowledge QA, arithmetic with CoT, verifiable instructions, code -- no download needed.

Every task rebuilds the world in memory (World(seed, size), deterministic, ~0.1 s for "small") and reads the
test split of one of its corpora, so a model pretrained on that world is tested on held-out items:
  world_qa          held-out people in a held-out question phrasing; exact match of the attribute value
                    (case/punctuation-insensitive), plus `contains_fact` (the value appears in the answer).
                    With k > 1 it also samples k answers and reports the hallucination flag: agreement,
                    uncertain_rate, and accuracy on the answers it would trust vs flag.
  world_arithmetic  word problems with worked solutions ending "#### N" (GSM8K format; maj@k as in gsm8k)
  world_ifeval      verifiable instructions, IFEval-style: each prompt carries 1 + `extra` instructions (a
                    world instruction plus compatible format constraints), checked by lmstack.world's
                    CHECKERS; prompt-level and instruction-level accuracy, strict and loose.
  world_code        the world's HumanEval-format code tasks, sandboxed, pass@k
Few-shot examples come from the world's train split with the fixed seed. Each task's per-reply scorer
(qa_correct, arithmetic_correct, instruction_followed) is also what the SFT and alignment stages score with.

Usage:
    from lmstack.eval import evaluate, get_task
    evaluate(lm, ["world_qa", "world_arithmetic", "world_ifeval"], num_fewshot=3, limit=100)
    evaluate(lm, [get_task("world_qa", size="small", world_seed=0, k=5)], limit=50)   # + hallucination flag
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Callable

from lmstack.world import World
from lmstack.world.checkers import agreement, flag_uncertain, normalize, states_fact
from lmstack.world.instructions import check_instruction
from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.hallucination import chain_seed
from lmstack.eval.lm import GenArgs, GenerateUntil, Request
from lmstack.eval.task import Task, register_task
from lmstack.eval.tasks.gsm8k import ChainOfThoughtTask, extract, gold_answer
from lmstack.eval.tasks.humaneval import CodeTask


@lru_cache(maxsize=4)
def cached_world(seed: int, size: str) -> World:
    """One World per (seed, size) per process: several tasks of one run share it."""
    return World(seed=seed, size=size)


# ---- per-reply scorers: what "right" means for a world task --------------------------------------------
# The tasks below score with these, and so do the speedrun's SFT and alignment stages (lmstack.stages): they ask
# in their own format (the chat template) but do not score again their own way, so one harness decides.
def qa_correct(doc: dict, reply: str) -> bool:
    """world_qa's contains_fact: the reply states the record's answer (the world's fact) as a whole phrase,
    ignoring case and punctuation (lmstack.world.checkers.states_fact; World.is_correct on the fact)."""
    return states_fact(str(doc["answer"]), reply)


def arithmetic_correct(doc: dict, reply: str) -> bool:
    """world_arithmetic's exact_match_strict: the number after the reply's first "####" equals the answer."""
    return extract(reply)[1] == normalize(str(doc["answer"]))


def instruction_followed(doc: dict, reply: str) -> bool:
    """world_ifeval's strict check of one instruction: its checker (name + args) accepts the reply."""
    return check_instruction(doc, reply)


class WorldTask(Task):
    """A task over one corpus of the synthetic world."""

    corpus: str = ""
    eval_split = "test"
    fewshot_split = "train"
    size: str = "small"
    """World size preset: small, medium or large."""
    world_seed: int = 0
    """Seed of the world (use the one the model's pretraining data came from)."""

    def world(self) -> World:
        return cached_world(self.world_seed, self.size)

    def docs(self, split: str) -> list[dict]:
        if split not in ("train", "val", "test"):
            raise LmstackError(f"task {self.name!r} has no split {split!r}; splits: train, val, test")
        return self.world().corpus(self.corpus, split=split)


# ---- knowledge QA --------------------------------------------------------------------------------------
@register_task("world_qa")
class WorldQA(WorldTask):
    corpus = "qa"
    output_type = "generate_until"
    default_metrics = ("exact_match", "contains_fact")
    k: int = 1
    """Sampled answers per question for the hallucination flag (1 = off)."""
    temperature: float = 0.8
    """Temperature of the k sampled answers."""
    threshold: float = 0.5
    """Agreement below this flags an answer as uncertain."""
    max_gen_toks: int = 24
    """Most tokens of an answer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise LmstackError(f"task {self.name!r}: k must be an integer >= 1, got {self.k!r}")
        if self.k > 1 and self.temperature <= 0:
            raise LmstackError(f"task {self.name!r}: k={self.k} sampled answers need temperature > 0")

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: dict) -> str:
        return doc["answer"]

    def gen_args(self, doc: dict) -> GenArgs:
        # "Question:" too: a small model often runs straight on into the next QA pair without a newline.
        return GenArgs(until=["\n", "Question:"], max_gen_toks=self.max_gen_toks)

    def requests(self, doc: dict, context: str) -> list[Request]:
        reqs: list[Request] = [GenerateUntil(context, self.gen_args(doc))]
        if self.k > 1:
            reqs += [GenerateUntil(context, GenArgs(until=["\n", "Question:"], max_gen_toks=self.max_gen_toks,
                                                    temperature=self.temperature, seed=chain_seed(context, 0, i)))
                     for i in range(self.k)]
        return reqs

    def process_results(self, doc: dict, responses: list) -> dict[str, float]:
        answer = responses[0]
        em = M.exact_match(answer, doc["answer"], ignore_punctuation=True)
        out = {"exact_match": em,
               "contains_fact": float(qa_correct(doc, answer))}
        if self.k > 1:
            _, rate = agreement(responses[1:])
            uncertain = flag_uncertain(rate, self.threshold)
            out["agreement"] = rate
            out["uncertain_rate"] = float(uncertain)
            # Accuracy split by the flag: a useful flag has acc_trusted well above acc_flagged.
            out["acc_flagged" if uncertain else "acc_trusted"] = em
        return out

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        names = ["exact_match", "contains_fact"]
        if self.k > 1:
            names += ["agreement", "uncertain_rate", "acc_trusted", "acc_flagged"]
        return {m: M.mean for m in names}


# ---- arithmetic with chain of thought ------------------------------------------------------------------
@register_task("world_arithmetic")
class WorldArithmetic(WorldTask, ChainOfThoughtTask):
    corpus = "arithmetic"
    target_delimiter = ""
    until = ("\n\n",)
    max_gen_toks = 192

    def doc_to_text(self, doc: dict) -> str:
        return doc["question"] + "\n"   # the pretraining text is question, newline, worked solution

    def doc_to_target(self, doc: dict) -> str:
        return doc["solution"]

    def gold(self, doc: dict) -> str:
        return gold_answer(doc["solution"])


# ---- verifiable instruction following (IFEval-like) ----------------------------------------------------
# Primary checkers whose answers are free text, so extra format constraints can be added without conflict.
FREE_TEXT = {"max_words", "min_words", "starts_with", "include_word", "exclude_word", "no_commas", "bullet_count"}
EXTRA_WORDS = ("indeed", "city", "visitors", "famous")
EXTRA_SUFFIXES = ("That is all.", "Thank you.")


def _extra_constraints(rng: random.Random, primary: dict, n: int) -> list[dict]:
    """Up to n format constraints compatible with the primary instruction: (text, checker, args)."""
    options = []
    if primary["checker"] != "no_commas":
        options.append({"text": "Do not use any commas.", "checker": "no_commas", "args": {}})
    if primary["checker"] not in ("ends_with", "exclude_word"):
        suffix = rng.choice(EXTRA_SUFFIXES)
        options.append({"text": f"End your answer with '{suffix}'", "checker": "ends_with", "args": {"suffix": suffix}})
    if primary["checker"] not in ("include_word", "exclude_word"):
        word = rng.choice(EXTRA_WORDS)
        options.append({"text": f"Use the word '{word}' at least once.", "checker": "include_word",
                        "args": {"word": word}})
    rng.shuffle(options)
    return options[:n]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose check: the response, without its first / last line, and without markdown '*'."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for b in base for v in (b, b.replace("*", ""))]


def inst_level(values: list) -> float:
    """Instruction-level accuracy: followed instructions over all instructions (micro-average, as IFEval)."""
    flat = [x for item in values for x in item]
    return sum(flat) / len(flat) if flat else float("nan")


@register_task("world_ifeval")
class WorldIFEval(WorldTask):
    corpus = "instructions"
    output_type = "generate_until"
    target_delimiter = ""
    default_metrics = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                       "inst_level_loose_acc")
    extra: int = 1
    """Format constraints added to each free-text instruction (0..3)."""
    max_gen_toks: int = 128
    """Most tokens of a response."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.extra, int) or not 0 <= self.extra <= 3:
            raise LmstackError(f"task {self.name!r}: extra must be an integer in 0..3, got {self.extra!r}")

    def docs(self, split: str) -> list[dict]:
        out = []
        for rec in super().docs(split):
            rng = random.Random(f"{self.world_seed}/{rec['id']}")
            instructions = [{"text": rec["instruction"], "checker": rec["checker"], "args": rec["args"]}]
            if rec["checker"] in FREE_TEXT:
                instructions += _extra_constraints(rng, rec, self.extra)
            out.append({**rec, "instructions": instructions,
                        "prompt": " ".join(i["text"] for i in instructions)})
        return out

    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"] + "\n"

    def doc_to_target(self, doc: dict) -> str:
        return doc["response"]  # only a few-shot illustration: it satisfies the primary instruction

    def gen_args(self, doc: dict) -> GenArgs:
        return GenArgs(until=["\n\n"], max_gen_toks=self.max_gen_toks)

    @staticmethod
    def followed(instruction: dict, response: str) -> bool:
        return instruction_followed(instruction, response)

    def process_results(self, doc: dict, responses: list) -> dict:
        response = responses[0].strip()
        strict = [self.followed(i, response) for i in doc["instructions"]]
        variants = loose_variants(response)
        loose = [any(self.followed(i, v) for v in variants) for i in doc["instructions"]]
        return {"prompt_level_strict_acc": float(all(strict)), "inst_level_strict_acc": strict,
                "prompt_level_loose_acc": float(all(loose)), "inst_level_loose_acc": loose}

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        return {"prompt_level_strict_acc": M.mean, "inst_level_strict_acc": inst_level,
                "prompt_level_loose_acc": M.mean, "inst_level_loose_acc": inst_level}


# ---- code ----------------------------------------------------------------------------------------------
@register_task("world_code")
class WorldCode(WorldTask, CodeTask):
    corpus = "code"
    fewshot_split = "train"
