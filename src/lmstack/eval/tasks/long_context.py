"""Long context: passkey retrieval at 1x, 2x and 4x the training context, per position type and sink cache.

A haystack of filler sentences hides "The pass key is 48213. Remember it. ..." at a relative depth, and
the prompt ends with "What is the pass key? The pass key is". Two scorings:
  - loglikelihood (default): the true key against n_choices-1 random 5-digit keys, acc = the true key has
    the highest log-likelihood; chance is 1/n_choices, so even a tiny model gives a graded signal;
  - generate: greedy generation, exact match of the first number produced.
`passkey_table` runs the task over a grid (context multiple x depth) for every model, plus derived
variants: RoPE with inference-time scaling (linear / ntk / yarn via ModelConfig.rope_scaling, factor =
the largest multiple) and a StreamingLLM sink cache (attention sinks + a rolling window), and renders
one markdown table per variant.

Usage:
    from lmstack.eval.tasks.long_context import passkey_table
    out = passkey_table({"rope": "runs/rope/model", "alibi": "runs/alibi/model"}, n_per_cell=8)
    print(out["markdown"])
    lmstack eval --model DIR --tasks passkey       # one cell: ~1000 characters, depths 0.1/0.5/0.9
"""
from __future__ import annotations

import copy
from pathlib import Path
import random
import re
from typing import Any

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.evaluator import evaluate
from lmstack.eval.lm import GenArgs, cut_at_stop, encode_pair, new_stats
from lmstack.eval.task import Task, register_task
from lmstack.tokenizer import load_tokenizer
from lmstack.world import World
from lmstack.world.passkey import make_passkey_document

SCORINGS = ("loglikelihood", "generate")
FILLERS = ("repeat", "world")


@register_task("passkey")
class PasskeyTask(Task):
    name = "passkey"
    output_type = "multiple_choice"
    default_metrics = ("acc",)
    scoring: str = "loglikelihood"
    """loglikelihood (rank the key among n_choices candidates) or generate (exact match of generated key)."""
    length_chars: int = 1000
    """Haystack length in characters (passkey_table sets it from the model's context in tokens)."""
    depths: tuple = (0.1, 0.5, 0.9)
    """Relative positions of the needle (0 = start, 1 = end)."""
    n_per_depth: int = 5
    """Documents per depth."""
    n_choices: int = 5
    """Candidate keys for loglikelihood scoring (the true one + random distractors)."""
    filler: str = "repeat"
    """repeat (classic repeated lines) or world (synthetic-world sentences full of distractor numbers)."""
    seed: int = 0
    """Seed of the keys, the distractors and the filler."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.scoring not in SCORINGS:
            raise LmstackError(f"passkey scoring={self.scoring!r}; choose one of {', '.join(SCORINGS)}")
        if self.filler not in FILLERS:
            raise LmstackError(f"passkey filler={self.filler!r}; choose one of {', '.join(FILLERS)}")
        if self.n_choices < 2:
            raise LmstackError(f"passkey n_choices must be >= 2, got {self.n_choices}")
        if self.scoring == "generate":
            self.output_type, self.default_metrics = "generate_until", ("exact_match",)

    def docs(self, split: str) -> list[dict]:
        rng = random.Random(self.seed)
        world = None
        if self.filler == "world":
            world = World(seed=self.seed, n_people=30)
        out = []
        for depth in self.depths:
            for i in range(self.n_per_depth):
                rec = make_passkey_document(rng, self.length_chars, "chars", depth, self.filler, world)
                keys = {rec["answer"]}
                while len(keys) < self.n_choices:
                    keys.add(str(rng.randint(10000, 99999)))
                choices = sorted(keys - {rec["answer"]})
                gold = rng.randrange(self.n_choices)
                choices.insert(gold, rec["answer"])
                out.append({"id": f"passkey/{depth}/{i}", "text": rec["text"], "question": rec["question"],
                            "answer": rec["answer"], "depth": depth, "choices": choices, "gold": gold})
        return out

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['text']}\n{doc['question']} The pass key is"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: dict) -> int | str:
        return doc["gold"] if self.scoring == "loglikelihood" else doc["answer"]

    def gen_args(self, doc: dict) -> GenArgs:
        return GenArgs(until=["\n"], max_gen_toks=12)

    def process_results(self, doc: dict, responses: list) -> dict[str, float]:
        if self.scoring == "loglikelihood":
            return {"acc": M.acc([r[0] for r in responses], doc["gold"])}
        found = re.search(r"\d+", responses[0])
        return {"exact_match": float(found is not None and found.group() == doc["answer"])}

    def chance(self, doc: dict) -> float | None:
        return 1.0 / self.n_choices if self.scoring == "loglikelihood" else None


# ---- the sink-cache LM: every request runs through a StreamingLLM cache ----------------------------------
class SinkCacheLM:
    """An LM whose forward passes use a SinkCache: the first n_sink tokens plus a rolling window.

    Memory stays flat however long the prompt is; what falls out of the window is forgotten, which is
    what the passkey table shows. Wraps a LocalLM (its tokenization, so scores stay comparable) and scores
    each request in one forward pass through a fresh sink cache, without truncating the prompt."""

    def __init__(self, base, window: int, n_sink: int = 4):
        cfg = base.model.config
        if cfg.position in ("learned", "sinusoidal"):
            raise LmstackError(f"a sink cache cannot re-assign {cfg.position!r} positions; use rope or alibi")
        if window < 1 or n_sink < 0:
            raise LmstackError(f"a sink cache needs window >= 1 and n_sink >= 0, got {window} and {n_sink}")
        self.base, self.model, self.tokenizer, self.config = base, base.model, base.tokenizer, cfg
        self.window, self.n_sink, self.max_length = window, n_sink, base.max_length
        self.stats = new_stats()

    def token_count(self, text: str) -> int:
        return self.base.token_count(text)

    def _cache(self):
        return self.model.new_cache(1, kind="sink", window=self.window, n_sink=self.n_sink)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        # lazy: heavy (torch), which this module does not import at its top
        import torch

        out = []
        for context, continuation in requests:
            if context:
                ctx, cont = encode_pair(context, continuation, self.base.encode)  # lm-eval's split
            else:  # a whole text, conditioned on the prefix token as LocalLM does
                ctx, cont = [self.base.prefix_token_id], self.base.encode(continuation, special=False)
            ids = torch.tensor([ctx + cont], device=next(self.model.parameters()).device)
            with torch.no_grad():
                logp = self.model(ids[:, :-1], cache=self._cache())[0, -len(cont):].float().log_softmax(-1)
            target = ids[0, -len(cont):]
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
            self.stats["prompt_tokens"] += ids.shape[1] - 1
            self.stats["requests"] += 1
        return out

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        return [ll for ll, _ in self.loglikelihood([("", t) for t in texts])]

    def generate_until(self, requests: list[tuple[str, GenArgs]]) -> list[str]:
        # lazy: heavy (torch), which this module does not import at its top
        import torch

        # lazy: heavy (torch), which this module does not import at its top
        from lmstack.model.reference_decode import reference_decode

        if self.n_sink != self.config.n_sink_tokens:
            raise LmstackError(f"generation through the sink cache keeps the model's n_sink_tokens="
                               f"{self.config.n_sink_tokens} sinks; this LM was built with n_sink={self.n_sink}")
        out = []
        for context, args in requests:
            ids = torch.tensor([self.base.encode(context)], device=next(self.model.parameters()).device)
            new = reference_decode(self.model, ids, args.max_gen_toks, temperature=args.temperature, top_p=args.top_p,
                                   eos_id=self.tokenizer.special_id("eos"), cache="sink", window=self.window,
                                   seed=args.seed)[0, ids.shape[1]:].tolist()
            self.stats["prompt_tokens"] += ids.shape[1]
            self.stats["generated_tokens"] += len(new)
            self.stats["requests"] += 1
            out.append(cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), args.until))
        return out


# ---- variants and the table ---------------------------------------------------------------------------
def with_rope_scaling(model, kind: str, factor: float):
    """A copy of a RoPE model whose rotary tables use inference-time context extension (`kind`, `factor`)."""
    # lazy: heavy (torch), which this module does not import at its top
    from lmstack.model.positions import RotaryEmbedding

    if model.config.position != "rope":
        raise LmstackError(f"rope scaling needs a RoPE model, this one uses position={model.config.position!r}")
    scaled = copy.deepcopy(model)
    cfg = model.config
    scaled.config = cfg.replace(rope_scaling=kind, rope_factor=float(factor),
                                rope_original_max_seq_len=cfg.max_seq_len)
    scaled.rope = RotaryEmbedding(scaled.config).to(next(model.parameters()).device)
    return scaled


def _load(spec) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory or anything with .model and .tokenizer (e.g. LocalLM)."""
    if isinstance(spec, (str, Path)):
        # lazy: heavy (torch), which this module does not import at its top
        from lmstack.model.hf_io import load_model

        return load_model(spec), load_tokenizer(spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec
    if hasattr(spec, "model") and hasattr(spec, "tokenizer"):
        return spec.model, spec.tokenizer
    raise LmstackError(f"passkey_table: {spec!r} is neither a model directory nor (model, tokenizer)")


def _chars_for_tokens(lm, tokens: int, filler: str, seed: int) -> int:
    """Haystack characters that make a prompt of about `tokens` tokens with this LM's tokenizer.

    Characters per token differ between filler and needle, so the estimate is refined a few times on a
    probe document (the needle alone sets a floor: a prompt can never be shorter than it)."""
    chars = 4 * tokens
    for _ in range(4):
        probe = PasskeyTask(length_chars=chars, depths=(0.5,), n_per_depth=1, filler=filler, seed=seed)
        got = lm.token_count(probe.doc_to_text(probe.docs("test")[0]))
        chars = max(80, round(chars * tokens / max(1, got)))
    return chars


def _label(cfg) -> str:
    if cfg.position == "rope" and cfg.rope_scaling != "none":
        return f"RoPE + {cfg.rope_scaling} x{cfg.rope_factor:g}"
    return {"rope": "RoPE", "alibi": "ALiBi"}.get(cfg.position, cfg.position)


def passkey_table(models: dict[str, Any], multiples: tuple[int, ...] = (1, 2, 4),
                  depths: tuple[float, ...] = (0.1, 0.5, 0.9), n_per_cell: int = 8, scoring: str = "loglikelihood",
                  n_choices: int = 5, rope_scalings: tuple[str, ...] = ("linear", "ntk", "yarn"), sink: bool = True,
                  sink_window: int | None = None, n_sink: int = 4, filler: str = "repeat", seed: int = 0,
                  progress: bool = False) -> dict:
    """Passkey accuracy per (context multiple, depth) for each model and its derived variants.

    models: name -> model directory, (model, tokenizer) or a LocalLM. The training context is each
    model's max_seq_len. Returns {"variants": {name: {"position", "train_ctx", "rows": [{"multiple",
    "tokens", "scores": {depth: score}, "mean"}]}}, "chance", "metric", "markdown"}."""
    # lazy: heavy (numpy, torch), which this module does not import at its top
    from lmstack.eval.local_lm import LocalLM

    metric = "acc" if scoring == "loglikelihood" else "exact_match"
    variants: dict[str, Any] = {}
    for name, spec in models.items():
        model, tok = _load(spec)
        cfg = model.config
        longest = max(multiples) * cfg.max_seq_len + 64
        variants[f"{name}: {_label(cfg)}"] = (cfg, tok, LocalLM(model, tokenizer=tok, max_length=longest))
        if cfg.position == "rope" and cfg.rope_scaling == "none":
            for kind in rope_scalings:
                scaled = with_rope_scaling(model, kind, max(multiples))
                variants[f"{name}: {_label(scaled.config)}"] = (
                    scaled.config, tok, LocalLM(scaled, tokenizer=tok, max_length=longest))
        if sink and cfg.position in ("rope", "alibi"):
            window = sink_window or cfg.max_seq_len - n_sink
            variants[f"{name}: {_label(cfg)} + sink cache ({n_sink} sinks, window {window})"] = (
                cfg, tok, SinkCacheLM(LocalLM(model, tokenizer=tok, max_length=longest), window, n_sink))
    out: dict[str, Any] = {"variants": {}, "metric": metric, "chance": 1 / n_choices if metric == "acc" else 0.0,
                           "config": {"multiples": list(multiples), "depths": list(depths), "n_per_cell": n_per_cell,
                                      "scoring": scoring, "n_choices": n_choices, "filler": filler, "seed": seed}}
    for vname, (cfg, tok, lm) in variants.items():
        rows = []
        for mult in multiples:
            chars = _chars_for_tokens(lm, mult * cfg.max_seq_len, filler, seed)
            scores, lengths = {}, []
            for depth in depths:
                task = PasskeyTask(scoring=scoring, length_chars=chars, depths=(depth,), n_per_depth=n_per_cell,
                                   n_choices=n_choices, filler=filler,
                                   seed=seed + 1000 * mult + round(100 * depth))  # fresh keys per cell
                task.name = f"passkey_{mult}x_{depth}"
                lengths += [lm.token_count(task.doc_to_text(d)) for d in task.cached_docs("test")]
                res = evaluate(lm, [task], bootstrap_iters=0, progress=progress)["results"][task.name]
                scores[f"{depth:g}"] = res["metrics"][metric]
            rows.append({"multiple": mult, "tokens": round(sum(lengths) / len(lengths)), "scores": scores,
                         "mean": sum(scores.values()) / len(scores)})
        out["variants"][vname] = {"position": _label(cfg), "train_ctx": cfg.max_seq_len, "rows": rows}
    out["markdown"] = passkey_markdown(out)
    return out


def passkey_markdown(result: dict) -> str:
    """One markdown table per variant: rows are context multiples, columns needle depths."""
    depths = result["config"]["depths"]
    chance = f", chance {result['chance']:.2f}" if result["chance"] else ""
    parts = []
    for name, v in result["variants"].items():
        parts += [f"**{name}** (trained at {v['train_ctx']} tokens; {result['metric']}{chance})", "",
                  "| context | prompt tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
                  "|---|---:|" + "---:|" * (len(depths) + 1)]
        for r in v["rows"]:
            cells = " | ".join(f"{r['scores'][f'{d:g}']:.2f}" for d in depths)
            parts.append(f"| {r['multiple']}x | {r['tokens']} | {cells} | {r['mean']:.2f} |")
        parts.append("")
    return "\n".join(parts)
