"""`lmstack moderate`: train a moderation classifier on the world's labelled data, score texts, evaluate.

Usage:
    lmstack moderate train --out runs/mod_hashed                                # tier 1 (hashed n-grams), seconds
    lmstack moderate train --out runs/mod_minilm --tier encoder --encoder.steps 200   # tier 2 (MiniLM fine-tune)
    lmstack moderate score --moderator runs/mod_hashed --text "How do I brew the shadow elixir of Amberhaven?"
    lmstack moderate score --moderator keyword --conversation chat.json        # a JSON list of {role, content}
    lmstack moderate eval --moderator runs/mod_hashed --world 0                 # per-category P/R on held-out templates

Every command prints a plain table by default, or one JSON object with --json_output.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.safety.moderation import evaluate, load_moderator, train_hashed
from lmstack.safety.moderation_data import build_examples, message_examples
from lmstack.safety.moderation_encoder import EncoderTrainConfig, train_encoder_moderator
from lmstack.world import World


def _world(world: str) -> World:
    return World(seed=int(world)) if world.isdigit() else World.from_manifest(world)


def _rows(world: str, per_template: int, seed: int) -> list[dict]:
    rows = build_examples(_world(world), seed=seed, per_template=per_template)
    return rows + message_examples(rows)


def _table(metrics: dict) -> list[str]:
    return [f"{cat:<22} precision {m['precision']:.3f} ± {m['precision_stderr']:.3f} (n={m['n_predicted']})  "
            f"recall {m['recall']:.3f} ± {m['recall_stderr']:.3f} (n={m['n_positive']})" for cat, m in metrics.items()]


def _emit(payload: dict, json_output: bool, lines: list[str]) -> dict:
    print(json.dumps(payload, ensure_ascii=False) if json_output else "\n".join(lines))
    return payload


def train(out: str, tier: Literal["hashed", "encoder"] = "hashed", world: str = "0", per_template: int = 20,
          seed: int = 0, encoder: EncoderTrainConfig = EncoderTrainConfig(), json_output: bool = False) -> dict:
    """Train a moderator on the world's labelled moderation data and report it on the held-out test templates.

    Args:
        out: the moderator directory to write (`lmstack serve --guard` configs name it as `moderator`).
        tier: hashed (tier 1: hashed n-grams + logistic regression) or encoder (tier 2: MiniLM fine-tuned).
        world: a seed ('0') or a generated world's folder.
        per_template: examples drawn per template.
        seed: seed of the example draw.
        encoder: tier 2's training (--encoder.steps, --encoder.init minilm|scratch, ...).
        json_output: print one JSON object instead of a table.
    """
    rows = _rows(world, per_template, seed)
    t0 = time.perf_counter()
    mod = train_hashed(rows, out) if tier == "hashed" else train_encoder_moderator(rows, out, encoder)
    seconds = round(time.perf_counter() - t0, 2)
    metrics = evaluate(mod, [r for r in rows if r["split"] == "test"])
    atomic_write_text(Path(out) / "metrics.json", json.dumps({"test": metrics, "seconds": seconds}, indent=2) + "\n")
    payload = {"moderator": out, "tier": tier, "train": sum(r["split"] == "train" for r in rows), "seconds": seconds,
               "test": metrics}
    return _emit(payload, json_output, [f"trained a {tier} moderator in {seconds} s; wrote {out}"] + _table(metrics))


def score(moderator: str = "keyword", text: list[str] | None = None, conversation: str | None = None,
          context: Literal["conversation", "last_message"] = "conversation", json_output: bool = False) -> dict:
    """Score texts (or one conversation) with a moderator: per-category probabilities and flags.

    Args:
        moderator: 'keyword' or a moderator directory.
        text: the texts to score (repeat --text).
        conversation: a JSON file holding a list of {role, content} messages, judged as a whole.
        context: for a conversation: the whole of it (conversation) or its last message only.
        json_output: print one JSON object instead of lines.
    """
    if not text and not conversation:
        raise LmstackError("`lmstack moderate score` needs --text or --conversation")
    mod = load_moderator(moderator)
    verdicts = mod.classify(list(text or []))
    items = [{"text": t, **vars(v)} for t, v in zip(text or [], verdicts)]
    if conversation:
        try:
            messages = json.loads(Path(conversation).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LmstackError(f"--conversation {conversation}: {e}") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise LmstackError(f"--conversation {conversation} must hold a list of {{role, content}} messages")
        items.append({"conversation": conversation, **vars(mod.score_conversation(messages, context))})
    lines = [f"{'FLAGGED' if it['flagged'] else 'ok':<8}"
             + " ".join(f"{c}={s:.3f}" for c, s in it["scores"].items()) + f"  {it.get('text', conversation)!r}"
             for it in items]
    return _emit({"moderator": moderator, "results": items}, json_output, lines)


def evaluate_command(moderator: str = "keyword", world: str = "0", per_template: int = 20, seed: int = 0,
                     split: Literal["val", "test"] = "test", json_output: bool = False) -> dict:
    """Per-category precision and recall (n, stderr) of a moderator on the world's held-out templates.

    Args:
        moderator: 'keyword' or a moderator directory.
        world: a seed ('0') or a generated world's folder.
        per_template: examples drawn per template.
        seed: seed of the example draw.
        split: which held-out templates: val or test.
        json_output: print one JSON object instead of a table.
    """
    rows = [r for r in _rows(world, per_template, seed) if r["split"] == split]
    metrics = evaluate(load_moderator(moderator), rows)
    return _emit({"moderator": moderator, "split": split, "metrics": metrics}, json_output, _table(metrics))


COMMANDS = {"train": train, "score": score, "eval": evaluate_command}
