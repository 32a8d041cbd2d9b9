"""The speedrun's alignment stage: SFT -> DPO (+RPO's NLL) on the world's preference pairs -> GRPO on arithmetic
and safety requests with a KL anchor, then the same held-out measurements before and after, into the report card.

Why each piece is there (the stage without them took harmful refusal from 89.5% to 0%, issue 14):
  RPO NLL       DPO only widens the chosen-rejected margin; the likelihood of the chosen replies (the
                refusals of harmful requests among them) can fall while it does. rpo_alpha x NLL(chosen)
                holds it up.
  safety in RL  GRPO on arithmetic alone never sees a harmful request, so nothing pays to keep refusing.
                The GRPO prompts mix arithmetic with the training cities' harmful and benign requests, and
                the reward is a mixture: the math verifier where it applies, and the safety reward (refuse
                harmful, answer benign) on every prompt, so over-refusal costs too.
  KL anchor     GRPO's k3 penalty (kl_coef) toward the SFT model keeps what RL does not reward from drifting.
  guard         SFT and aligned are compared on validation data (arithmetic, preference pairs, safety on the
                validation cities); if the aligned model is worse on a row by more than the stderr of the
                difference, the stage keeps the SFT weights and says so. It is a safeguard, not the fix.

What is measured (test splits, greedy decoding; never used to choose settings), each with n and stderr:
  arithmetic          accuracy (the first `#### n` right: world_arithmetic's scorer) on every test arithmetic problem
  qa, instruction     the SFT stage's scorers (stages.sft.TASKS: the eval tasks' per-reply scorers), first n_eval
                      records, batched (task_scores)
  preference          share of test preference pairs where log π(chosen) > log π(rejected)
  harmful refusal     refusal rate on harmful requests about the held-out test cities (want high)
  benign refusal      refusal rate on their benign look-alikes: over-refusal (want low)
The safety requests are every phrasing x brew/drink for those cities (preferences.safety_requests): 120
per side on the small world. The base column comes from the SFT stage's scores when it ran.

The budget is split between DPO and GRPO (dpo_fraction); each stops at its share. GRPO's arithmetic is the
easier half of the problems (difficulty <= max_difficulty): on harder ones a small model almost never samples
a right answer, every group is flat and GRPO has nothing to learn from.

Usage:
    from lmstack.stages.align import align_stage
    result = align_stage("runs/20250101-120000", "runs/.../sft/run/model", world_dir="runs/.../world", budget_s=150)
    print(result["report_md"])
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import random
import time
from typing import Any

import torch

from lmstack.align.config import AlignConfig
from lmstack.align.dpo import PreferenceTrainer
from lmstack.align.grpo import GroupTrainer
from lmstack.align.logprobs import collate, encode_pair, encode_prompt, sequence_logprobs
from lmstack.align.preference_data import pairs_from_records
from lmstack.align.rewards.mixture import RewardMixture
from lmstack.align.rewards.safety import SafetyReward, refusal_rates
from lmstack.align.rewards.verifiable import MathReward
from lmstack.align.rollout import evaluate_policy, prompt_text, sample
from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.eval.tasks.world import arithmetic_correct
from lmstack.model.hf_io import load_model, save_model
from lmstack.stages.sft import TASKS
from lmstack.tokenizer import load_tokenizer
from lmstack.world import read_jsonl
from lmstack.world.preferences import safety_requests


def _read(world_dir: Path, corpus: str, split: str) -> list[dict]:
    return read_jsonl(Path(world_dir) / corpus / f"{split}.jsonl")


@torch.no_grad()
def preference_accuracy(model, tok, pairs, max_len: int = 256, batch_size: int = 16) -> float:
    """Share of pairs whose chosen reply has the higher total log-probability under `model`."""

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for i in range(0, len(pairs), batch_size):
        part = pairs[i:i + batch_size]
        rows = [encode_pair(tok, p.prompt, c) for p in part for c in (p.chosen, p.rejected)]
        lp = sequence_logprobs(model, collate(rows, tok.pad_id, max_len, device)).view(-1, 2)
        wins += int((lp[:, 0] > lp[:, 1]).sum())
    model.train(was)
    return wins / max(1, len(pairs))


def safety_rates(model, tok, prompts: list[str], max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy replies to harmful and benign requests -> refusal rates (rewards.safety.refusal_rates)."""

    ro = sample(model, tok, [{"prompt": p} for p in prompts], n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    return refusal_rates(ro.prompts, ro.texts)


def fitting(records: list[dict], tok, max_seq_len: int, room: int = 32) -> list[dict]:
    """Records whose prompt leaves at least `room` tokens for a reply (a small model's context may be short)."""

    return [r for r in records if len(encode_prompt(tok, prompt_text(r))) + room <= max_seq_len]


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a rate p measured on n independent items."""
    return math.sqrt(p * (1 - p) / n) if n and p == p else float("nan")


# Rows of the stage's table: name -> (score key, n key or None, higher is better).
ROWS = {"arithmetic": ("arithmetic", "arithmetic_n", True), "qa": ("qa", "qa_n", True),
        "instruction": ("instruction", "instruction_n", True),
        "preference": ("preference_accuracy", "preference_n", True),
        "harmful_refusal": ("harmful_refusal_rate", "n_harmful", True),
        "benign_refusal": ("benign_refusal_rate", "n_benign", False)}


VAL_ITEMS = 32
"""Arithmetic problems and preference pairs of the guard's validation pass (safety: 20 requests per side, qa and
instruction: 10 each), short so that the guard costs little beside training."""


def task_scores(model, tok, records: list[dict], n_eval: int, tasks=("qa", "instruction")) -> dict[str, float]:
    """The SFT stage's qa / instruction scorers (lmstack.stages.sft.TASKS: same chat prompt, reply budget
    and checker) on the first n_eval records of each kind, decoded greedily in one batch by the engine rather
    than one record at a time."""

    out: dict[str, float] = {}
    for task in tasks:
        kind, max_new, ok = TASKS[task]
        chosen = fitting([r for r in records if r.get("kind") == kind][:n_eval], tok, model.config.max_seq_len, room=8)
        if chosen:
            ro = sample(model, tok, chosen, n=1, max_new_tokens=max_new, temperature=0.0)
            out[task] = sum(bool(ok(r, text)) for r, text in zip(chosen, ro.texts)) / len(chosen)
            out[f"{task}_n"] = len(chosen)
    return out


def measure(model, tok, data: dict[str, Any], n_eval: int, split: str = "test") -> dict[str, float]:
    """Every held-out number of the stage for one model, on `split` ("test" or "val"); each rate with its n."""

    cap = None if split == "test" else VAL_ITEMS  # the guard's validation pass is kept short
    n_eval = n_eval if split == "test" else min(n_eval, 10)
    problems = data[f"arithmetic_{split}"][:cap]
    # Scored as world_arithmetic scores a reply (its first "#### n"), as the SFT stage's base column is.
    score = lambda prompt, completion, record: float(arithmetic_correct(record, completion))  # noqa: E731
    arith = (evaluate_policy(model, tok, problems, score, max_new_tokens=128)
             if problems else {"mean": float("nan"), "stderr": float("nan"), "n": 0})
    out = {"arithmetic": arith["mean"], "arithmetic_stderr": arith["stderr"], "arithmetic_n": arith["n"]}
    out.update(task_scores(model, tok, data[f"chat_{split}"], n_eval))
    pairs = data[f"pairs_{split}"][:cap]
    out["preference_accuracy"] = preference_accuracy(model, tok, pairs, model.config.max_seq_len)
    out["preference_n"] = len(pairs)
    out.update(safety_rates(model, tok, data[f"safety_{split}"]))
    for row, (key, n_key, _) in ROWS.items():
        if row != "arithmetic" and key in out:
            out[f"{key}_stderr"] = binomial_stderr(out[key], int(out[n_key]))
    return out


def worse_rows(before: dict, after: dict, z: float = 1.0) -> list[str]:
    """Rows where `after` is worse than `before` by more than z x the stderr of the difference."""
    bad = []
    for row, (key, n_key, higher) in ROWS.items():
        if key not in before or key not in after or before[key] != before[key]:
            continue
        n = int(before[n_key])
        se = math.hypot(binomial_stderr(before[key], n), binomial_stderr(after[key], n)) or 1.0 / max(n, 1)
        change = (after[key] - before[key]) * (1 if higher else -1)
        if change < -z * se:
            bad.append(row)
    return bad


def stage_reward(safety_weight: float = 1.0):
    """GRPO's reward: the math verifier where a record has an answer, and the safety reward (refuse harmful
    requests, answer the rest) on every prompt, so a refusal of arithmetic or of a benign request costs too."""

    return RewardMixture({"math": (MathReward(), 1.0), "safety": (SafetyReward(), safety_weight)})


def _cities(records: list[dict]) -> list[str]:
    return sorted({r["city"] for r in records if isinstance(r.get("city"), str)})


def _data(world_dir: Path, tok, max_seq_len: int, val_safety: int = 20) -> dict[str, Any]:
    chat = {s: _read(world_dir, "chat", s) for s in ("train", "val", "test")}
    raw = {s: _read(world_dir, "preferences", s) for s in ("train", "val", "test")}
    prefs = {s: pairs_from_records(raw[s]).rows for s in raw}
    # Every city is in one split (World.city_split), so each split's requests name cities no other split has.
    requests = {s: safety_requests(_cities(raw[s] + chat[s]), limit=None if s != "val" else val_safety) for s in raw}
    requests = {s: fitting(r, tok, max_seq_len) for s, r in requests.items()}
    arith = {s: fitting([r for r in chat[s] if r.get("kind") == "arithmetic"], tok, max_seq_len) for s in chat}
    out = {"safety_train_records": requests["train"]}
    for s in ("train", "val", "test"):
        out.update({f"chat_{s}": chat[s], f"pairs_{s}": prefs[s], f"arithmetic_{s}": arith[s],
                    f"safety_{s}": [r["prompt"] for r in requests[s]]})
    return out


def align_stage(run_dir: str | Path, sft_dir: str | Path, world_dir: str | Path, budget_s: float = 150.0,
                dpo_fraction: float = 0.35, seed: int = 0, n_eval: int = 30, max_difficulty: int = 2,
                dpo_lr: float = 2e-4, grpo_lr: float = 1e-4, rpo_alpha: float = 1.0, kl_coef: float = 0.05,
                safety_weight: float = 1.0, safety_share: float = 0.3, guard: bool = True,
                out_dir: str | Path | None = None, log=print, log_cfg=None) -> dict[str, Any]:
    """DPO (+RPO) then GRPO (math + safety, KL-anchored) from sft_dir within budget_s seconds of training; writes
    {out_dir or run_dir/align}/{model,report.md,scores.json} and returns {"scores": {"sft": ..., "aligned": ...},
    "dpo": ..., "grpo": ..., "guard": ..., "report_md"}.

    safety_share: the share of GRPO's prompts that are safety requests; guard: keep the SFT weights when the
    aligned model is worse on validation (see the module docstring). The DPO and GRPO curves go to
    {out}/dpo/metrics.jsonl and {out}/grpo/metrics.jsonl (+ TensorBoard / W&B as log_cfg, a LogConfig, says)."""

    if not 0 <= safety_share < 1:
        raise LmstackError(f"safety_share must be in [0, 1), got {safety_share}")
    run_dir, world_dir = Path(run_dir), Path(world_dir)
    out = Path(out_dir) if out_dir else run_dir / "align"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = load_tokenizer(sft_dir)
    policy = load_model(sft_dir, lazy=False)
    data = _data(world_dir, tok, policy.config.max_seq_len)
    t0 = time.perf_counter()
    scores = {"sft": measure(policy, tok, data, n_eval)}
    log(f"SFT ({time.perf_counter() - t0:.0f} s): {json.dumps({k: round(v, 3) for k, v in scores['sft'].items()})}")
    val_sft = measure(policy, tok, data, n_eval, split="val") if guard else {}
    log(f"SFT measured on test and val in {time.perf_counter() - t0:.0f} s")
    sft_state = {k: v.detach().clone() for k, v in policy.state_dict().items()} if guard else None
    eval_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    dpo_cfg = AlignConfig(method="dpo", beta=0.1, batch_size=8, max_len=policy.config.max_seq_len, rpo_alpha=rpo_alpha,
                          train={"steps": 10_000, "max_seconds": budget_s * dpo_fraction, "eval_every": 0,
                                 "progress": False, "device": "cpu", "seed": seed, "log_every": 5},
                          optim={"lr": dpo_lr}, schedule={"warmup_steps": 10})
    if log_cfg is not None:
        dpo_cfg.log = log_cfg
    dpo = PreferenceTrainer(policy, tok, dpo_cfg, log=log).fit(data["pairs_train"], data["pairs_val"],
                                                               out_dir=out / "dpo")
    policy.train()
    grpo_cfg = AlignConfig(method="grpo", group_size=8, prompts_per_step=8, temperature=0.7, max_tokens=128,
                           kl_coef=kl_coef, eval_prompts=0,
                           # a GRPO step takes seconds: every one (log_every 1) is a point of the report's curves
                           train={"steps": 10_000, "max_seconds": budget_s * (1 - dpo_fraction), "progress": False,
                                  "device": "cpu", "seed": seed, "log_every": 1},
                           optim={"lr": grpo_lr}, schedule={"warmup_steps": 3})
    if log_cfg is not None:
        grpo_cfg.log = log_cfg
    easy = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= max_difficulty] or data["arithmetic_train"]
    safety = data["safety_train_records"]
    if easy and safety and safety_share > 0:  # safety requests make up safety_share of the prompt pool
        k = max(1, round(len(easy) * safety_share / (1 - safety_share)))
        safety = random.Random(seed).sample(safety, min(k, len(safety)))
    prompts = easy + (safety if safety_share > 0 else [])
    reward = stage_reward(safety_weight)
    if prompts:
        grpo = GroupTrainer(policy, tok, grpo_cfg, reward, log=log).fit(prompts, out_dir=out / "grpo")
        grpo["train_prompts"] = len(prompts)
        grpo["safety_prompts"] = len(prompts) - len(easy)
    else:  # a context too short for any prompt (tiny test models)
        log("GRPO skipped: no prompt fits the model's context")
        grpo = {"steps": 0, "train_seconds": 0.0, "train_prompts": 0, "safety_prompts": 0}
    train_seconds = time.perf_counter() - t1

    decision = {"enabled": guard, "kept": "aligned", "worse_on_val": []}
    if guard:
        val_aligned = measure(policy, tok, data, n_eval, split="val")
        decision.update(val_sft=val_sft, val_aligned=val_aligned, worse_on_val=worse_rows(val_sft, val_aligned))
        if decision["worse_on_val"]:
            log(f"guard: the aligned model is worse on validation ({', '.join(decision['worse_on_val'])}); "
                "keeping the SFT weights")
            policy.load_state_dict(sft_state)
            decision["kept"] = "sft"
    policy.eval()
    scores["aligned"] = measure(policy, tok, data, n_eval) if decision["kept"] == "aligned" else dict(scores["sft"])
    log(f"aligned: {json.dumps({k: round(v, 3) for k, v in scores['aligned'].items()})}")
    save_model(policy, out / "model", tokenizer=tok)

    base = {}
    sft_scores = run_dir / "sft" / "scores.json"
    if sft_scores.is_file():
        base = json.loads(sft_scores.read_text()).get("base", {})
    report = _report(scores, base, dpo, grpo, decision)
    summary = {"scores": scores, "base": base, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "guard": decision, "settings": {"budget_s": budget_s, "dpo_fraction": dpo_fraction,
                                               "rpo_alpha": rpo_alpha, "kl_coef": kl_coef,
                                               "safety_weight": safety_weight, "safety_share": safety_share,
                                               "dpo_lr": dpo_lr, "grpo_lr": grpo_lr, "seed": seed},
               "dpo": {k: v for k, v in dpo.items() if k != "history"},
               "grpo": {k: v for k, v in grpo.items() if k != "history"}, "report_md": report}
    atomic_write_text(out / "scores.json", json.dumps(summary, indent=1, default=float))
    atomic_write_text(out / "report.md", report + "\n")
    log(report)
    return summary


def _report(scores: dict, base: dict, dpo: dict, grpo: dict, guard: dict | None = None) -> str:
    s, a = scores["sft"], scores["aligned"]
    pct = lambda x: "—" if x is None or x != x else f"{x:.1%}"  # noqa: E731
    pm = lambda d, k: f"{pct(d.get(k))} ± {pct(d.get(k + '_stderr'))}" if k in d else "—"  # noqa: E731
    names = {"arithmetic": f"arithmetic, all {s['arithmetic_n']} test problems",
             "qa": f"qa (first {s.get('qa_n', 30)} test)",
             "instruction": f"instruction following (first {s.get('instruction_n', 30)} test)",
             "preference": f"preference pairs (n={s.get('preference_n', '?')}): log π(chosen) > log π(rejected)",
             "harmful_refusal": f"refusal of harmful requests (n={s['n_harmful']}, want high)",
             "benign_refusal": f"refusal of benign look-alikes (n={s['n_benign']}, over-refusal, want low)"}
    lines = [f"## Alignment (DPO + RPO NLL {dpo['steps']} steps in {dpo['train_seconds']:.0f} s, then GRPO on "
             f"arithmetic and safety requests {grpo['steps']} steps in {grpo['train_seconds']:.0f} s)", "",
             "| held-out metric (greedy, ± stderr) | base | SFT | aligned (SFT → DPO → GRPO) |", "|---|---:|---:|---:|"]
    for row, (key, _, _) in ROWS.items():
        b = base.get(row)
        lines.append(f"| {names[row]} | {pct(b) if b is not None else '—'} | {pm(s, key)} | {pm(a, key)} |")
    dv = dpo.get("val_after") or {}
    if dv:
        lines += ["", f"DPO held-out implicit-reward accuracy {dv.get('accuracy', float('nan')):.1%}, margin "
                      f"{dv.get('margin', float('nan')):.3f}. GRPO trained on {grpo['train_prompts']} prompts "
                      f"({grpo.get('safety_prompts', 0)} of them safety requests; reward: math verifier + safety, "
                      "8 samples per prompt, temperature 0.7, k3 KL anchor to the SFT model)."]
    if guard and guard.get("enabled"):
        if guard["kept"] == "sft":
            lines += ["", f"**Guard:** the aligned model was worse than SFT on validation "
                          f"({', '.join(guard['worse_on_val'])}), so the stage kept the SFT weights; the aligned "
                          "column repeats SFT."]
        else:
            lines += ["", "Guard: the aligned model was not worse than SFT on any validation row, so it was kept."]
    return "\n".join(lines)
