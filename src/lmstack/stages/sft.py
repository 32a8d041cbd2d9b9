"""The speedrun's SFT stage: fine-tune the pretrained model on the synthetic world's chat data, then score base
vs SFT on the world's held-out tasks by generating answers.

Training data: the world's chat conversations of kinds qa, multi_turn, arithmetic, instruction, persona and
refusal/benign safety data (train split), mixed with STAGE_MIX weights. Scores (test split, greedy decoding, `n_eval` per task):
  qa           the reply's first line states the true fact as a whole phrase (held-out people *and* phrasings:
               knowledge the model can only have from the biographies it read in pretraining)
  arithmetic   the first `#### n` in the reply equals the answer
  instruction  the reply's first paragraph passes the record's verifiable checker
Each is the eval task's own per-reply scorer (world_qa's contains_fact, world_arithmetic's exact_match_strict,
world_ifeval's strict check: lmstack.eval.tasks.world), so the stage and the eval harness score alike.
The base model is asked in its pretraining format ("Question: ...\\nAnswer:" for QA, the bare problem for
arithmetic and instructions); the SFT model through the chat template. Both numbers go in the report card.

Usage:
    from lmstack.stages.sft import sft_stage
    result = sft_stage("runs/20250101-120000", "runs/.../pretrain/checkpoints/step_00002000/model", budget_s=120)
    print(result["report_md"])       # a markdown table: task | base | SFT
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.finetune import FinetuneConfig, finetune, load_result
from lmstack.config import atomic_write_text
from lmstack.eval.tasks.world import arithmetic_correct, instruction_followed, qa_correct
from lmstack.model.hf_io import load_model
from lmstack.model.reference_decode import reference_decode
from lmstack.tokenizer import load_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig
from lmstack.world import World, read_jsonl
from lmstack.world.qa import qa_text

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LoRA-style methods adapt every attention projection
# refusal/benign: safety data (refuse the world's forbidden brews, help with their look-alikes), as chat SFT
# mixes carry. At 0.5 each (4.5% of the mix) the speedrun's ~260 SFT steps left the model refusing only 45% of
# harmful requests, and the alignment stage cannot teach refusal from there; 1.5 each makes it part of SFT.
STAGE_MIX = {"qa": 3.0, "multi_turn": 1.0, "arithmetic": 3.0, "instruction": 2.0, "persona": 1.0, "refusal": 1.5,
             "benign": 1.5}


def _world_chat(world_dir: str | Path | None, seed: int, split: str) -> list[dict]:
    if world_dir is not None:
        return read_jsonl(Path(world_dir) / "chat" / f"{split}.jsonl")

    return World(seed=seed, size="small").corpus("chat", split=split)


def _reply(model, tok, ids: list[int], max_new: int, stop_id: int | None) -> str:
    budget = model.config.max_seq_len - len(ids)
    if budget <= 0:
        return ""
    out = reference_decode(model, torch.tensor([ids]), min(max_new, budget), temperature=0.0, eos_id=stop_id)
    new = out[0, len(ids):].tolist()
    if stop_id is not None and stop_id in new:
        new = new[:new.index(stop_id)]
    return tok.decode(new, skip_special_tokens=True)


def _prompt(tok, record: dict, chat: bool) -> list[int]:
    user = next(m["content"] for m in record["messages"] if m["role"] == "user")
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)[0]

    # the formats the pretraining corpus uses: "Question: q\nAnswer: a" for QA, "problem\nsolution" otherwise
    text = qa_text(user, "").rstrip() if record["kind"] == "qa" else user + "\n"
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return bos + tok.encode(text)


# The scores are the eval harness's per-reply scorers (lmstack.eval.tasks.world), so a world task is scored one
# way whichever job asks; the stage only cuts the reply where the eval task's generation would have stopped.
def _qa_ok(record: dict, reply: str) -> bool:
    return qa_correct(record, reply.split("\n")[0])  # world_qa generates until "\n"


def _arith_ok(record: dict, reply: str) -> bool:
    return arithmetic_correct(record, reply)


def _instruction_ok(record: dict, reply: str) -> bool:
    return instruction_followed(record, reply.split("\n\n")[0].strip())  # world_ifeval generates until "\n\n"


# task -> (record kind, tokens to generate, scorer)
TASKS: dict[str, tuple[str, int, Callable[[dict, str], bool]]] = {
    "qa": ("qa", 32, _qa_ok),
    "arithmetic": ("arithmetic", 128, _arith_ok),
    "instruction": ("instruction", 96, _instruction_ok),
}


@torch.no_grad()
def world_task_scores(model, tok, records: list[dict], chat: bool, n_eval: int = 30,
                      tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, float]:
    """Greedy-decoding accuracy on the first n_eval test records of each task (see the module docstring)."""
    model.eval()
    stop = tok.end_of_turn_ids()[0] if chat and tok.end_of_turn_ids() else tok.eos_id
    scores = {}
    for task in tasks:
        kind, max_new, ok = TASKS[task]
        chosen = [r for r in records if r.get("kind") == kind][:n_eval]
        if not chosen:
            continue
        hits = sum(ok(r, _reply(model, tok, _prompt(tok, r, chat), max_new, stop)) for r in chosen)
        scores[task] = hits / len(chosen)
    return scores


def sft_stage(run_dir: str | Path, base_dir: str | Path, budget_s: float = 120.0, world_dir: str | Path | None = None,
              method: str = "full", seed: int = 0, n_eval: int = 30, lr: float | None = None, batch_size: int = 8,
              seq_len: int = 256, log=print, log_cfg=None, extra: dict[str, list[dict]] | None = None,
              extra_mix: dict[str, float] | None = None) -> dict[str, Any]:
    """Fine-tune base_dir on the world's chat data for budget_s seconds into run_dir/sft; score base vs SFT.
    log_cfg: a LogConfig (TensorBoard / W&B beside sft/run/metrics.jsonl). extra: more chat records per split
    ({"train": [...], "val": [...]}, each with a "kind"), mixed in with the weights of extra_mix ({kind: w}),
    e.g. the RAG stage's retrieval-formatted chats (lmstack.stages.rag).

    Returns the finetune summary plus "scores" ({"base": {...}, "sft": {...}}) and "report_md" (a table)."""

    out = Path(run_dir) / "sft"
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    mix = {**STAGE_MIX, **(extra_mix or {})}
    for split in ("train", "val"):
        rows = [r for r in _world_chat(world_dir, seed, split) if r.get("kind") in STAGE_MIX]
        rows += [r for r in (extra or {}).get(split, []) if r.get("kind") in mix]
        atomic_write_text(data_dir / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    default_lr = {"full": 3e-4, "prompt": 3e-2, "prefix": 1e-2, "ia3": 1e-2}.get(method, 2e-3)
    cfg = FinetuneConfig(
        method=method, data=str(data_dir / "train.jsonl"), val_data=str(data_dir / "val.jsonl"), model=str(base_dir),
        out=str(out / "run"), adapter=AdapterConfig(method=method, target_modules=ATTENTION),
        train=TrainConfig(steps=100_000, max_seconds=budget_s, eval_every=0, eval_batches=4, log_every=10,
                          keep_checkpoints=1, seed=seed, resume=False, restart=True),
        optim=OptimizerConfig(name="adamw", lr=lr or default_lr, weight_decay=0.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=20, min_lr_ratio=0.1),
        batch_size=batch_size, seq_len=seq_len, mix=mix)
    if log_cfg is not None:
        cfg.log = log_cfg
    summary = finetune(cfg, log=log)
    tok = load_tokenizer(base_dir)
    test = _world_chat(world_dir, seed, "test")
    base = load_model(base_dir)
    scores = {"base": world_task_scores(base, tok, test, chat=False, n_eval=n_eval),
              "base_chat": world_task_scores(base, tok, test, chat=True, n_eval=n_eval)}
    tuned = load_result(base_dir, summary["result"])  # from the files, as a user would
    scores["sft"] = world_task_scores(tuned, tok, test, chat=True, n_eval=n_eval)
    summary["scores"] = scores
    lines = ["| task (test split, greedy) | base, pretraining format | base, chat template | SFT, chat template |",
             "|---|---|---|---|"]
    for task in scores["sft"]:
        lines.append(f"| {task} | {scores['base'].get(task, float('nan')):.1%} | "
                     f"{scores['base_chat'].get(task, float('nan')):.1%} | {scores['sft'][task]:.1%} |")
    summary["report_md"] = "\n".join(lines)
    atomic_write_text(out / "scores.json", json.dumps(scores, indent=1))
    atomic_write_text(out / "report.md", f"## SFT ({method}, {summary['train_seconds']:.0f} s)\n\n"
                      + summary["report_md"] + "\n")
    log(summary["report_md"])
    return summary
