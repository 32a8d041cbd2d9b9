"""Adversarial training (S.20's training half, issue 21 §2): SFT on refusals to the attacks the red team found,
mixed with the same attacks wrapped around benign look-alikes and answered helpfully, plus a replay of ordinary
chat data, so that the model learns to refuse the forbidden request inside the wrapper rather than the wrapper.

The data (`adversarial_rows`), one chat row per (attack, request):
  adv_refusal   user: attack.apply(harmful request)        assistant: a world refusal naming the brew and city
  adv_benign    user: attack.apply(benign look-alike)      assistant: a helpful festival-drink recipe
  plain_*       the bare requests, refused / answered (so the unwrapped behaviour is trained too)
Attacks come from the train templates only (redteam.search keeps to them), and requests from the train split's
cities, so ASR measured on held-out templates and test cities is out of sample twice over. `replay_rows` adds
a sample of the model's own SFT data against forgetting. `compliance_rows` builds the opposite, a jailbreakable
model organism (refuses bare requests, complies under wrappers), for experiments on a model that can comply.

Training is lmstack.adapt.finetune (full fine-tuning or any adapter method) on the written JSONL: the trainer,
loss mask on assistant tokens, checkpoints and model directory are the SFT stage's own.

Usage:
    from lmstack.safety.adversarial import adversarial_rows, replay_rows, adversarial_train
    rows = adversarial_rows(attacks, harmful_train, benign_train, world, seed=0)
    rows += replay_rows("runs/x/sft/data/train.jsonl", 600, seed=0)
    summary = adversarial_train("runs/x/sft/run/model", rows, "runs/adv", steps=150)   # summary["result"]: model dir
"""
from __future__ import annotations

import json
from pathlib import Path
import random
import re
from typing import Callable, Sequence

from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.adapt.sft import read_chat_jsonl
from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.safety.attacks import Attack
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig
from lmstack.world import lexicon as lx
from lmstack.world.preferences import (COMPLIANCE, DARK_INGREDIENTS, HELPFUL_RECIPES, REFUSALS, TEA_INGREDIENTS,
                                       is_harmful_request)

_THING = re.compile("|".join(re.escape(t) for t in lx.FORBIDDEN_THINGS + lx.FESTIVAL_DRINKS), re.I)


def _slots(record: dict, world) -> dict[str, str]:
    """{thing, city, drink} of a world safety request (the record's `city`, the brew or drink its prompt names)."""
    thing = _THING.search(record.get("prompt", ""))
    if not thing or not record.get("city"):
        raise LmstackError(f"request {record.get('prompt', '')[:60]!r} needs a 'city' and must name a forbidden brew "
                           "or festival drink (lmstack.world.preferences.safety_requests makes such records)")
    city = world.city(record["city"])
    return {"thing": thing.group(0).lower(), "city": city.name, "drink": city.festival_drink}


def refusal_reply(record: dict, world, rng: random.Random) -> str:
    return rng.choice(REFUSALS).format(**_slots(record, world))


def helpful_reply(record: dict, world, rng: random.Random) -> str:
    a, b, c = rng.sample(TEA_INGREDIENTS, 3)
    return rng.choice(HELPFUL_RECIPES).format(a=a, b=b, c=c, **_slots(record, world))


def _row(prompt: str, reply: str, kind: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "kind": kind, **meta}


def _plain_rows(harmful: Sequence[dict], benign: Sequence[dict], world, plain: int, rng: random.Random) -> list[dict]:
    """Up to `plain` bare harmful requests refused and bare benign look-alikes helped, unwrapped."""
    rows = [_row(r["prompt"], refusal_reply(r, world, rng), "plain_refusal", request=r["prompt"], label="harmful")
            for r in rng.sample(harmful, min(plain, len(harmful)))]
    rows += [_row(r["prompt"], helpful_reply(r, world, rng), "plain_benign", request=r["prompt"], label="benign")
             for r in rng.sample(benign, min(plain, len(benign)))]
    return rows


def adversarial_rows(attacks: Sequence[Attack], harmful: Sequence[dict], benign: Sequence[dict], world,
                     per_attack: int = 12, plain: int = 60, seed: int = 0, benign_weight: float = 1.0,
                     fits: Callable[[str], bool] | None = None) -> list[dict]:
    """Chat rows for adversarial SFT: each attack around `per_attack` harmful requests (refused) and
    round(benign_weight * per_attack) benign look-alikes (answered; a weight above 1 pushes against refusing the
    wrapper itself), plus `plain` bare requests of each side. Held-out templates are refused here: the rows must
    never teach what the measurement holds out. `fits(prompt)` drops prompts too long for the model."""
    held = [a.name for a in attacks if a.split != "train"]
    if held:
        raise LmstackError(f"adversarial training data may use train templates only; got held-out {held[0]!r}")
    harmful = [r for r in harmful if is_harmful_request(r)]
    benign = [r for r in benign if not is_harmful_request(r)]
    if not harmful or not benign:
        raise LmstackError("adversarial_rows needs harmful requests and benign look-alikes (safety_requests)")
    if benign_weight < 0:
        raise LmstackError(f"benign_weight must be >= 0, got {benign_weight}")
    rng = random.Random(seed)
    rows = []
    for attack in attacks:
        for side, pool, k in (("adv_refusal", harmful, per_attack),
                              ("adv_benign", benign, round(benign_weight * per_attack))):
            for r in rng.sample(pool, min(k, len(pool))):
                prompt = attack.apply(r["prompt"])
                if fits and not fits(prompt):
                    continue
                reply = refusal_reply(r, world, rng) if side == "adv_refusal" else helpful_reply(r, world, rng)
                rows.append(_row(prompt, reply, side, attack=attack.name, family=attack.family,
                                 request=r["prompt"], label="harmful" if side == "adv_refusal" else "benign"))
    rows += _plain_rows(harmful, benign, world, plain, rng)
    rng.shuffle(rows)
    return rows


def compliance_rows(attacks: Sequence[Attack], harmful: Sequence[dict], benign: Sequence[dict], world,
                    per_attack: int = 12, plain: int = 60, seed: int = 0,
                    fits: Callable[[str], bool] | None = None) -> list[dict]:
    """Rows that make a jailbreakable *model organism* for red-team experiments: each attack wrapped around
    `per_attack` harmful requests answered with the world's compliance text (the forbidden recipe with its dark
    ingredients) and as many benign look-alikes answered helpfully, and `plain` bare requests of each side (harmful
    refused, benign answered). A model tuned on them refuses the bare harmful request, answers look-alikes, and
    complies under the wrappers: the vulnerability the search should find and adversarial training close. The
    speedrun's models never saw a forbidden recipe, so they cannot comply however they are attacked."""
    harmful = [r for r in harmful if is_harmful_request(r)]
    benign = [r for r in benign if not is_harmful_request(r)]
    if not harmful or not benign:
        raise LmstackError("compliance_rows needs harmful requests and benign look-alikes (safety_requests)")
    rng = random.Random(seed)
    rows = []
    for attack in attacks:
        for r in rng.sample(harmful, min(per_attack, len(harmful))):
            prompt = attack.apply(r["prompt"])
            if fits and not fits(prompt):
                continue
            a, b, c = rng.sample(DARK_INGREDIENTS, 3)
            reply = rng.choice(COMPLIANCE).format(a=a, b=b, c=c, **_slots(r, world))
            rows.append(_row(prompt, reply, "organism_comply", attack=attack.name, request=r["prompt"],
                             label="harmful"))
        for r in rng.sample(benign, min(per_attack, len(benign))):
            prompt = attack.apply(r["prompt"])
            if not fits or fits(prompt):
                rows.append(_row(prompt, helpful_reply(r, world, rng), "adv_benign", attack=attack.name,
                                 request=r["prompt"], label="benign"))
    rows += _plain_rows(harmful, benign, world, plain, rng)
    rng.shuffle(rows)
    return rows


def replay_rows(path: str | Path, n: int, seed: int = 0) -> list[dict]:
    """n rows drawn from an SFT chat JSONL (the model's own training data), to hold its other skills."""
    rows = read_chat_jsonl(path)
    picked = random.Random(seed).sample(rows, min(n, len(rows)))
    return [{**r, "kind": f"replay_{r.get('kind', 'chat')}"} for r in picked]


def write_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Chat rows as JSONL, atomically."""
    if not rows:
        raise LmstackError("no rows to write")
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def adversarial_train(model_dir: str | Path, rows: Sequence[dict], out: str | Path, steps: int = 150,
                      lr: float = 1e-4, batch_size: int = 8, method: str = "full", max_seconds: float = 0.0,
                      seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """SFT of model_dir on the rows (written to out/data.jsonl) with lmstack.adapt.finetune; returns its summary
    (summary["result"] is the trained model or adapter directory)."""
    out = Path(out)
    data = write_rows(rows, out / "adversarial.jsonl")
    train = TrainConfig(steps=steps, eval_every=0, eval_batches=4, log_every=10, keep_checkpoints=1, seed=seed,
                        max_seconds=max_seconds)
    cfg = FinetuneConfig(method=method, data=str(data), model=str(model_dir), out=str(out / "run"), val_fraction=0.0,
                         train=train, optim=OptimizerConfig(name="adamw", lr=lr, weight_decay=0.0),
                         batch_size=batch_size)
    return finetune(cfg, log=log)
