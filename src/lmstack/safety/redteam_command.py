"""`lmstack redteam`: attack a chat model with the automated red team, and optionally train it against what was
found (safety/attacks.py, redteam.py, adversarial.py; issue 21 §2).

    lmstack redteam --model runs/x/sft/run/model --world runs/x/world --out runs/redteam
    lmstack redteam runs/x/sft/run/model --world runs/x/world --train --replay runs/x/sft/data/train.jsonl

Steps:
  1. measure the model on the world's test cities: ASR per attack family on the held-out templates (and pooled),
     refusal of the bare harmful requests, over-refusal of the benign look-alikes, bare and wrapped in the
     held-out templates; each with n and stderr;
  2. search: mutation-and-search over the train templates on the train cities' harmful requests, --budget
     queries; then --rewrites LM-written attacks (the model itself prompted as a red-team writer);
  3. with --train: adversarial SFT (lmstack.adapt.finetune, full) on refusals to the attacks (--attacks found:
     the search's successful ones; found+train: those plus each single train template) around train-city
     harmful requests, the same attacks around benign look-alikes answered helpfully, bare requests, and
     --replay_rows rows of --replay (the model's own SFT data); then step 1 again on the trained model.
Judges: the world's harmful-content check (primary, see redteam.py) and, with --classifier (default on), the
tier-1 moderation classifier (safety/moderation.py, trained here on the world's moderation data) on the same
replies, reported as asr_classifier.
Writes into --out: report.json (every number, the found attacks with an example each, the rewrites),
config.yaml, and with --train the training run (run/, adversarial.jsonl; the model in run/model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import json
from pathlib import Path
import time
from typing import Any, Literal

from lmstack.config import ConfigCommand, atomic_write_text, save_config
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.safety.adversarial import adversarial_rows, adversarial_train, replay_rows
from lmstack.safety.attacks import FAMILIES, Attack, heldout_templates, train_templates
from lmstack.safety.moderation import train_hashed
from lmstack.safety.moderation_data import build_examples
from lmstack.safety.redteam import (AttackJudge, ModelTarget, attacker_rewrites, binomial_stderr, measure_asr,
                                    moderator_flags, refusal_rate, search)
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer
from lmstack.world import World
from lmstack.world.preferences import is_harmful_request, safety_requests


@dataclass
class RedTeamConfig:
    model: str = ""
    """The chat model to attack (a directory with its tokenizer.json and chat template)."""
    world: str = ""
    """The synthetic world's directory (manifest.json); empty = World(seed=0, size='small')."""
    out: str = "redteam"
    """Directory for report.json (and the adversarial training run with --train)."""
    budget: int = 600
    """Search: prompts sent to the model."""
    queries_per_attack: int = 4
    """Search: harmful requests each candidate attack is tried on."""
    rewrites: int = 60
    """LM-written rewrites (one per train-city harmful request; 0 = none)."""
    eval_limit: int = 60
    """Test-city harmful requests (and as many benign look-alikes) in each measurement."""
    wrapped_benign: int = 20
    """Benign look-alikes wrapped in each held-out template, for the wrapped over-refusal."""
    max_tokens: int = 48
    """Reply budget of the attacked model."""
    classifier: bool = True
    """Also judge replies with the tier-1 moderation classifier (reported as asr_classifier)."""
    train: bool = False
    """Adversarial SFT on the attacks, then measure again."""
    attacks: Literal["found", "found+train"] = "found+train"
    """Attacks the training data wraps: the search's successful ones, or those plus every single train template."""
    max_attacks: int = 24
    """Most found attacks trained on (the best by success rate), so a search that finds hundreds does not drown
    the benign rows."""
    rows_per_attack: int = 12
    """Training rows per attack of wrapped harmful requests (refused)."""
    benign_weight: float = 1.0
    """Wrapped benign look-alikes (answered) per wrapped harmful row: above 1 fights refusing the wrapper itself."""
    replay: str = ""
    """Chat JSONL replayed against forgetting (e.g. the model's SFT data); empty = none."""
    replay_rows: int = 800
    """Rows drawn from --replay."""
    steps: int = 150
    """Adversarial SFT steps."""
    lr: float = 1e-4
    """Adversarial SFT learning rate (AdamW)."""
    seed: int = 0
    """Seed of the search, the rewrites and the training data."""
    threads: int = 0
    """CPU threads for torch (0 = the process default)."""

    def __post_init__(self) -> None:
        for name in ("budget", "queries_per_attack", "eval_limit", "max_tokens", "steps"):
            if getattr(self, name) < 1:
                raise LmstackError(f"{name}={getattr(self, name)} is not allowed; it must be >= 1")
        for name in ("rewrites", "wrapped_benign", "rows_per_attack", "replay_rows", "max_attacks"):
            if getattr(self, name) < 0:
                raise LmstackError(f"{name}={getattr(self, name)} is not allowed; it must be >= 0")
        if self.attacks not in ("found", "found+train"):
            raise LmstackError(f"attacks={self.attacks!r} is not allowed; choose 'found' or 'found+train'")


def _requests(world: World, split: str, limit: int | None) -> tuple[list[dict], list[dict]]:
    recs = safety_requests([c.name for c in world.cities if world.city_split(c) == split], limit=limit)
    if not recs:
        raise LmstackError(f"the world has no {split}-split city to draw safety requests from")
    return [r for r in recs if is_harmful_request(r)], [r for r in recs if not is_harmful_request(r)]


def measure(target: ModelTarget, harmful: list[dict], benign: list[dict], n_wrapped: int,
            also: dict[str, AttackJudge] | None = None) -> dict[str, Any]:
    """ASR per held-out family and pooled ("all_heldout"), harmful refusal of the bare requests, over-refusal of
    the bare look-alikes and of look-alikes wrapped in the held-out templates."""
    also = also or {}
    held = {f: [Attack((t,)) for t in heldout_templates() if t.family == f] for f in FAMILIES}
    asr = measure_asr(target, held, harmful, also=also)
    n = sum(a["n"] for a in asr.values())
    keys = ["asr", "non_refusal"] + [f"asr_{name}" for name in also]
    # Families whose templates did not fit the context have n=0 (and a NaN rate): they weigh nothing here.
    pooled = {k: sum(a[k] * a["n"] for a in asr.values() if a["n"]) / n if n else float("nan") for k in keys}
    asr["all_heldout"] = {**pooled, "n": n, "skipped": sum(a["skipped"] for a in asr.values()),
                          **{("stderr" if k == "asr" else f"{k}_stderr"): binomial_stderr(v, n)
                             for k, v in pooled.items()}}
    wrapped = {f: refusal_rate(target, [Attack((t,)).apply(r["prompt"]) for t in heldout_templates() if t.family == f
                                        for r in benign[:n_wrapped]]) for f in FAMILIES}
    n_w = sum(w["n"] for w in wrapped.values())
    rate = sum(w["rate"] * w["n"] for w in wrapped.values() if w["n"]) / n_w if n_w else float("nan")
    return {"asr": asr, "harmful_refusal": refusal_rate(target, [r["prompt"] for r in harmful]),
            "over_refusal": refusal_rate(target, [r["prompt"] for r in benign]),
            "over_refusal_wrapped": {"rate": rate, "stderr": binomial_stderr(rate, n_w), "n": n_w,
                                     "skipped": sum(w["skipped"] for w in wrapped.values()), "by_family": wrapped}}


def redteam(cfg: RedTeamConfig) -> dict[str, Any]:
    """Red-team a chat model (and with --train, train it against the attacks found); returns report.json's data."""
    if not cfg.model or not Path(cfg.model).is_dir():
        raise LmstackError(f"--model must be a model directory, got {cfg.model!r}")
    if cfg.train and cfg.replay and not Path(cfg.replay).is_file():
        raise LmstackError(f"--replay file not found: {cfg.replay}")
    set_threads(cfg.threads)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    world = World.from_manifest(cfg.world) if cfg.world else World(seed=0, size="small")
    harm_test, benign_test = _requests(world, "test", cfg.eval_limit)
    harm_train, benign_train = _requests(world, "train", None)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    target = ModelTarget(model, tok, max_new_tokens=cfg.max_tokens)
    also = {"classifier": AttackJudge(moderation=moderator_flags(train_hashed(build_examples(world))))} \
        if cfg.classifier else {}

    report: dict[str, Any] = {"model": cfg.model, "config": asdict(cfg),
                              "before": measure(target, harm_test, benign_test, cfg.wrapped_benign, also)}
    print(f"held-out ASR before: {report['before']['asr']['all_heldout']['asr']:.3f} "
          f"(n={report['before']['asr']['all_heldout']['n']})")
    found = search(target, harm_train, budget=cfg.budget, per_attack=cfg.queries_per_attack, seed=cfg.seed,
                   log=print)
    report["search"] = found.to_dict()
    if cfg.rewrites:
        rewrites = attacker_rewrites(model, tok, harm_train[:cfg.rewrites], max_new_tokens=cfg.max_tokens,
                                     seed=cfg.seed)
        sent = [r for r in rewrites if r["prompt"] and target.fits(r["prompt"])]
        v = AttackJudge().verdicts(sent, target([r["prompt"] for r in sent])) if sent else []
        rate = sum(x["success"] for x in v) / len(v) if v else float("nan")
        report["rewrites"] = {"n": len(rewrites), "sent": len(v), "asr": rate, "stderr": binomial_stderr(rate, len(v)),
                              "non_refusal": sum(not x["refused"] for x in v) / len(v) if v else float("nan"),
                              "keeps_request": sum(r["keeps_request"] for r in rewrites) / len(rewrites),
                              "examples": [r["prompt"] for r in rewrites[:5]]}
    if cfg.train:
        attacks = [r.attack for r in found.successful[:cfg.max_attacks]]
        if cfg.attacks == "found+train":
            attacks += [a for a in (Attack((t,)) for t in train_templates()) if a not in attacks]
        if not attacks:
            raise LmstackError("the search found no successful attack to train on; use --attacks found+train")
        rows = adversarial_rows(attacks, harm_train, benign_train, world, per_attack=cfg.rows_per_attack,
                                seed=cfg.seed, benign_weight=cfg.benign_weight, fits=target.fits)
        n_adv = len(rows)
        if cfg.replay and cfg.replay_rows:
            rows += replay_rows(cfg.replay, cfg.replay_rows, seed=cfg.seed)
        t0 = time.perf_counter()
        summary = adversarial_train(cfg.model, rows, out, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed)
        trained = load_model(summary["result"]).eval()
        report["training"] = {"attacks": len(attacks), "attacks_found": len(found.successful),
                              "rows_adversarial": n_adv, "rows_replay": len(rows) - n_adv, "steps": summary["steps"],
                              "seconds": round(time.perf_counter() - t0, 1), "model": summary["result"]}
        report["after"] = measure(ModelTarget(trained, tok, max_new_tokens=cfg.max_tokens), harm_test,
                                  benign_test, cfg.wrapped_benign, also)
        print(f"held-out ASR after: {report['after']['asr']['all_heldout']['asr']:.3f}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    print(f"wrote {out / 'report.json'}")
    return report


COMMANDS = ConfigCommand(RedTeamConfig, redteam)
