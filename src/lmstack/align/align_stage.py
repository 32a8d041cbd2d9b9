"""The speedrun's alignment stage: SFT -> DPO on the world's preference pairs -> GRPO on arithmetic with the
math verifier, then the same held-out measurements before and after, into the report card.

What is measured (test splits, greedy decoding; never used to choose settings):
  arithmetic          accuracy (final `#### n` right) on every test arithmetic problem, ± stderr
  qa, instruction     the SFT stage's scorers (lmstack.adapt.sft_stage.world_task_scores), first n_eval records
  preference          share of test preference pairs where log π(chosen) > log π(rejected)
  harmful refusal     refusal rate on the world's harmful requests (want high)
  benign refusal      refusal rate on their benign look-alikes: over-refusal (want low)
The base column comes from the SFT stage's scores when it ran (same scorers, pretraining prompt format).

The budget is split between DPO and GRPO (dpo_fraction); each stops at its share. GRPO trains on the easier
half of the problems (difficulty <= max_difficulty): on harder ones a small model almost never samples a
right answer, every group is flat and GRPO has nothing to learn from.

Usage:
    from lmstack.align.align_stage import align_stage
    result = align_stage("runs/20250101-120000", "runs/.../sft/run/model", world_dir="runs/.../world", budget_s=150)
    print(result["report_md"])
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.config import atomic_write_text


def _read(world_dir: Path, corpus: str, split: str) -> list[dict]:
    from lmstack.data.world import read_jsonl

    return read_jsonl(Path(world_dir) / corpus / f"{split}.jsonl")


@torch.no_grad()
def preference_accuracy(model, tok, pairs, max_len: int = 256, batch_size: int = 16) -> float:
    """Share of pairs whose chosen reply has the higher total log-probability under `model`."""
    from lmstack.align.logprobs import collate, encode_pair, sequence_logprobs

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
    from lmstack.align.rewards.safety import refusal_rates
    from lmstack.align.rollout import sample

    ro = sample(model, tok, [{"prompt": p} for p in prompts], n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    return refusal_rates(ro.prompts, ro.texts)


def fitting(records: list[dict], tok, max_seq_len: int, room: int = 32) -> list[dict]:
    """Records whose prompt leaves at least `room` tokens for a reply (a small model's context may be short)."""
    from lmstack.align.logprobs import encode_prompt
    from lmstack.align.rollout import prompt_text

    return [r for r in records if len(encode_prompt(tok, prompt_text(r))) + room <= max_seq_len]


def measure(model, tok, data: dict[str, Any], n_eval: int) -> dict[str, float]:
    """Every held-out number of the stage for one model."""
    from lmstack.adapt.sft_stage import world_task_scores
    from lmstack.align.rewards.verifiable import MathReward
    from lmstack.align.rollout import evaluate_policy

    arith = (evaluate_policy(model, tok, data["arithmetic_test"], MathReward(), max_new_tokens=128)
             if data["arithmetic_test"] else {"mean": float("nan"), "stderr": float("nan"), "n": 0})
    out = {"arithmetic": arith["mean"], "arithmetic_stderr": arith["stderr"], "arithmetic_n": arith["n"]}
    out.update(world_task_scores(model, tok, data["chat_test"], chat=True, n_eval=n_eval, tasks=("qa", "instruction")))
    out["preference_accuracy"] = preference_accuracy(model, tok, data["pairs_test"], model.config.max_seq_len)
    out.update(safety_rates(model, tok, data["safety_prompts"]))
    return out


def _data(world_dir: Path, tok, max_seq_len: int) -> dict[str, Any]:
    from lmstack.align.preference_data import pairs_from_records

    chat = {s: _read(world_dir, "chat", s) for s in ("train", "val", "test")}
    prefs = {s: pairs_from_records(_read(world_dir, "preferences", s)).rows for s in ("train", "val", "test")}
    safety = list(dict.fromkeys(
        [p.prompt for p in prefs["test"] if p.meta.get("kind") in ("harmful", "benign")]
        + [m["content"] for r in chat["test"] if r.get("kind") in ("refusal", "benign")
           for m in r["messages"] if m["role"] == "user"]))
    safety = [r["prompt"] for r in fitting([{"prompt": p} for p in safety], tok, max_seq_len)]
    arith = {s: fitting([r for r in chat[s] if r.get("kind") == "arithmetic"], tok, max_seq_len) for s in chat}
    return {"chat_test": chat["test"], "pairs_train": prefs["train"], "pairs_val": prefs["val"],
            "pairs_test": prefs["test"], "safety_prompts": safety, "arithmetic_train": arith["train"],
            "arithmetic_val": arith["val"], "arithmetic_test": arith["test"]}


def align_stage(run_dir: str | Path, sft_dir: str | Path, world_dir: str | Path, budget_s: float = 150.0,
                dpo_fraction: float = 0.35, seed: int = 0, n_eval: int = 30, max_difficulty: int = 2,
                dpo_lr: float = 2e-4, grpo_lr: float = 1e-4, log=print) -> dict[str, Any]:
    """DPO then GRPO from sft_dir within budget_s seconds of training; writes run_dir/align/{model,report.md,
    scores.json} and returns {"scores": {"sft": ..., "aligned": ...}, "dpo": ..., "grpo": ..., "report_md"}."""
    from lmstack.align.config import AlignConfig
    from lmstack.align.dpo import PreferenceTrainer
    from lmstack.align.grpo import GroupTrainer
    from lmstack.align.rewards.verifiable import MathReward
    from lmstack.model.hf_io import load_model, save_model
    from lmstack.tokenizer import load_tokenizer

    run_dir, world_dir = Path(run_dir), Path(world_dir)
    out = run_dir / "align"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = load_tokenizer(sft_dir)
    policy = load_model(sft_dir, lazy=False)
    data = _data(world_dir, tok, policy.config.max_seq_len)
    t0 = time.perf_counter()
    scores = {"sft": measure(policy, tok, data, n_eval)}
    log(f"SFT: {json.dumps({k: round(v, 3) for k, v in scores['sft'].items()})}")

    dpo_cfg = AlignConfig(method="dpo", beta=0.1, lr=dpo_lr, steps=10_000, max_seconds=budget_s * dpo_fraction,
                          batch_size=8, max_len=policy.config.max_seq_len, warmup_steps=10, eval_every=0, progress=False, device="cpu", seed=seed)
    dpo = PreferenceTrainer(policy, tok, dpo_cfg, log=log).fit(data["pairs_train"], data["pairs_val"][:64])
    policy.train()
    grpo_cfg = AlignConfig(method="grpo", lr=grpo_lr, steps=10_000, max_seconds=budget_s * (1 - dpo_fraction),
                           group_size=8, prompts_per_step=8, temperature=0.7, max_new_tokens=128, warmup_steps=3,
                           eval_prompts=0, progress=False, device="cpu", seed=seed)
    easy = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= max_difficulty]
    if easy or data["arithmetic_train"]:
        grpo = GroupTrainer(policy, tok, grpo_cfg, MathReward(), log=log).fit(easy or data["arithmetic_train"])
    else:  # a context too short for any arithmetic prompt (tiny test models)
        log("GRPO skipped: no arithmetic prompt fits the model's context")
        grpo = {"steps": 0, "train_seconds": 0.0, "train_prompts": 0}
    train_seconds = time.perf_counter() - t0
    scores["aligned"] = measure(policy, tok, data, n_eval)
    log(f"aligned: {json.dumps({k: round(v, 3) for k, v in scores['aligned'].items()})}")
    save_model(policy, out / "model", tokenizer=tok)

    base = {}
    sft_scores = run_dir / "sft" / "scores.json"
    if sft_scores.is_file():
        base = json.loads(sft_scores.read_text()).get("base", {})
    report = _report(scores, base, dpo, grpo)
    summary = {"scores": scores, "base": base, "train_seconds": train_seconds,
               "dpo": {k: v for k, v in dpo.items() if k != "history"},
               "grpo": {k: v for k, v in grpo.items() if k != "history"}, "report_md": report}
    atomic_write_text(out / "scores.json", json.dumps(summary, indent=1, default=float))
    atomic_write_text(out / "report.md", report + "\n")
    log(report)
    return summary


def _report(scores: dict, base: dict, dpo: dict, grpo: dict) -> str:
    s, a = scores["sft"], scores["aligned"]
    pct = lambda x: "—" if x is None or x != x else f"{x:.1%}"  # noqa: E731
    rows = [
        (f"arithmetic, all {s['arithmetic_n']} test problems (greedy, ± stderr)", None,
         f"{pct(s['arithmetic'])} ± {pct(s['arithmetic_stderr'])}", f"{pct(a['arithmetic'])} ± {pct(a['arithmetic_stderr'])}"),
        ("qa (first 30 test)", base.get("qa"), pct(s.get("qa")), pct(a.get("qa"))),
        ("instruction following (first 30 test)", base.get("instruction"), pct(s.get("instruction")),
         pct(a.get("instruction"))),
        ("preference pairs: log π(chosen) > log π(rejected)", None, pct(s["preference_accuracy"]),
         pct(a["preference_accuracy"])),
        (f"refusal of harmful requests (n={s['n_harmful']}, want high)", None, pct(s["harmful_refusal_rate"]),
         pct(a["harmful_refusal_rate"])),
        (f"refusal of benign look-alikes (n={s['n_benign']}, over-refusal, want low)", None,
         pct(s["benign_refusal_rate"]), pct(a["benign_refusal_rate"])),
    ]
    lines = [f"## Alignment (DPO {dpo['steps']} steps in {dpo['train_seconds']:.0f} s, then GRPO {grpo['steps']} "
             f"steps in {grpo['train_seconds']:.0f} s)", "",
             "| held-out metric | base | SFT | aligned (SFT → DPO → GRPO) |", "|---|---:|---:|---:|"]
    for name, b, sv, av in rows:
        lines.append(f"| {name} | {pct(b) if b is not None else '—'} | {sv} | {av} |")
    dv = dpo.get("val_after") or {}
    if dv:
        lines += ["", f"DPO held-out implicit-reward accuracy {dv.get('accuracy', float('nan')):.1%}, margin "
                      f"{dv.get('margin', float('nan')):.3f}. GRPO trained on {grpo['train_prompts']} easier "
                      f"arithmetic problems (math verifier, 8 samples per prompt, temperature 0.7)."]
    return "\n".join(lines)
