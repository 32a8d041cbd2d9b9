"""How much of the speedrun SFT model's world skills a ~4x smaller student keeps, by distillation method (VIII.9, V.10).

Teacher: the speedrun's SFT model (<run>/sft/run/model; 4 layers, d_model 256, 4.0M parameters), or, with
--teacher-sft-steps N, that SFT stage's recipe (lmstack.stages.sft: full fine-tuning of the run's pretrained base,
adamw 3e-4, cosine, its task mix and data files) bounded by N steps instead of 120 seconds: on a busy machine the
stage's wall-clock budget can buy very few steps (run 20261206-232127 got 16). Student: the same llama-style
architecture at 2 layers, d_model 128 (0.89M parameters, 4.5x fewer; forward FLOPs per token 2 x matmul params
+ attention at context 256, lmstack.model.counting, 4.4x fewer). Counts are arithmetic on the configs.

Student init, shared by every row: the student pretrained from random init with plain cross-entropy on the same
world pretraining shards, batches of 16 x 256 tokens as the teacher's, for --pretrain-steps steps (default: as
many as the teacher's pretraining took), with the speedrun's optimizer and schedule (Muon, WSD). Without it a
student could not know the held-out people the QA task asks about: that knowledge is only in the biographies of
the pretraining text.

Rows, each from that init, with the same data, steps, batch, learning rate, schedule and seed (a fair fight):
  gold_sft      SFT with cross-entropy on the gold answers of the chat data (the baseline);
  logit_kd      logit KD on the same rows: alpha 0.5 * T^2 KL(teacher_T || student_T) at T = 2 plus 0.5 CE,
                the teacher run under no_grad in the same step;
  logit_kd_top32  the same with only the teacher's top-32 tokens per position (plus one "rest" bucket); only
                with --methods ...,logit_kd_top32;
  sequence_kd   sequence-level KD = V.10 distillation-based fine-tuning: the teacher answers every prompt of
                the data greedily and its answers are the SFT targets (its tokens, exactly).
The data: n_train rows of <run>/sft/data/train.jsonl (the speedrun SFT stage's own mix), in a seeded order.

Scores: the speedrun's own (lmstack.stages.sft: its prompts through the chat template, token budgets and
per-task scorers) on the first n_eval test records of each task (world QA, arithmetic, instructions), greedy,
decoded in batches of equal-length prompts (checked against world_task_scores itself first); each with n and
the binomial stderr. For each row and task: ours = the student's accuracy, baseline = the teacher's, ratio =
the fraction of the teacher's score the student keeps (its stderr by the delta method in config). Then
sequence_kd and logit_kd against gold_sft per task (V.10's comparison), and the forward-FLOPs row.
Training compute (FLOPs, 6 x params-and-attention per token for training, 2x for a forward): the student's
own steps, the teacher's forwards (logit KD: one per training token; sequence KD: prompts + generated
tokens), the shared student pretraining, beside the teacher's own pretraining + SFT.

Usage (the runs behind results/distill.json, 2026-12-07, 2 threads, quiet machine): the first built and cached
the teacher (400 SFT steps, 732 s while a CI run shared the cores) and the student init (279 pretraining steps, as
many as the teacher's, 98 s) in --work; the second reused both and wrote the JSON (~5 minutes):
    env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/distill.py --run-dir /tmp/sr7/runs/20261206-232127 \\
        --teacher-sft-steps 400 --pretrain-steps 279 --prepare-only --work /tmp/distill_bench2
    env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/distill.py --run-dir /tmp/sr7/runs/20261206-232127 \\
        --teacher-sft-steps 400 --pretrain-steps 279 --steps 300 --n-train 2000 --n-eval 100 \\
        --methods gold_sft,logit_kd,logit_kd_top32,sequence_kd --work /tmp/distill_bench2
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from _common import result, write_result

from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.adapt.sft import SFTObjective, encode_rows, read_chat_jsonl
from lmstack.compress.distill import LogitKD, teacher_examples, train_student
from lmstack.compress.distill_cli import build_student, check_same_vocab, flops_report
from lmstack.model.counting import model_stats
from lmstack.model.hf_io import load_model
from lmstack.model.reference_decode import reference_decode
from lmstack.stages.sft import STAGE_MIX, world_task_scores
from lmstack.stages.sft import TASKS as SFT_TASKS, _prompt as chat_prompt
from lmstack.tokenizer import load_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig
from lmstack.train.pretrain import DataConfig, PretrainConfig, pretrain

STUDENT = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "tie_embeddings": True}
TASKS = ("qa", "arithmetic", "instruction")


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def kept(s: float, se_s: float, t: float, se_t: float) -> tuple[float, float]:
    """s / t and its delta-method stderr (independent samples)."""
    if t == 0:
        return float("nan"), float("nan")
    r = s / t
    return r, math.sqrt((se_s / t) ** 2 + (r * se_t / t) ** 2)


@torch.no_grad()
def scores(model, tok, test, n_eval: int, batch: int = 16) -> dict[str, dict]:
    """world_task_scores' numbers (its prompts, token budgets and scorers: lmstack.stages.sft), with the greedy
    replies decoded in batches of equal-length prompts instead of one by one (the machine is shared; check_batched
    pins that the two agree)."""
    model.eval()
    stop = tok.end_of_turn_ids()[0]
    out = {}
    for task in TASKS:
        kind, max_new, ok = SFT_TASKS[task]
        chosen = [r for r in test if r.get("kind") == kind][:n_eval]
        prompts = [chat_prompt(tok, r, True) for r in chosen]
        replies = [""] * len(chosen)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        for length, members in groups.items():
            budget = min(max_new, model.config.max_seq_len - length)
            for k in range(0, len(members), batch):
                part = members[k:k + batch]
                gen = reference_decode(model, torch.tensor([prompts[i] for i in part]), budget, eos_id=stop)
                for i, new in zip(part, gen[:, length:].tolist()):
                    replies[i] = tok.decode(new[:new.index(stop)] if stop in new else new, skip_special_tokens=True)
        acc = sum(ok(r, reply) for r, reply in zip(chosen, replies)) / len(chosen)
        out[task] = {"acc": acc, "n": len(chosen), "stderr": stderr(acc, len(chosen))}
    return out


def check_batched(model, tok, test, n: int = 4) -> None:
    """The batched scorer agrees with world_task_scores itself on the first n records of each task."""
    mine = {t: v["acc"] for t, v in scores(model, tok, test, n).items()}
    theirs = world_task_scores(model, tok, test, chat=True, n_eval=n, tasks=TASKS)
    if mine != theirs:
        raise SystemExit(f"batched scoring {mine} differs from world_task_scores {theirs}")


def cached(path: Path, steps: int) -> dict | None:
    """A finished earlier phase with the same step count (its bench_summary.json), or None."""
    if (path / "bench_summary.json").is_file():
        done = json.loads((path / "bench_summary.json").read_text())
        if done.get("steps") == steps:
            return done
    return None


def sft_teacher(run: Path, steps: int, work: Path, seed: int) -> dict:
    """The speedrun's SFT stage (lmstack.stages.sft: full fine-tuning, adamw 3e-4, cosine, its task mix and data)
    from the run's pretrained base, bounded by steps instead of seconds."""
    out = work / "teacher_sft"
    done = cached(out, steps)
    if done:
        return done
    base = sorted((run / "pretrain" / "checkpoints").glob("step_*"))[-1] / "model"
    cfg = FinetuneConfig(
        method="full", data=str(run / "sft" / "data" / "train.jsonl"), val_data=str(run / "sft" / "data" / "val.jsonl"),
        model=str(base), out=str(out),
        train=TrainConfig(steps=steps, eval_every=0, eval_batches=4, log_every=10, keep_checkpoints=1, seed=seed,
                          progress=False, resume=False, restart=True, threads=2),
        optim=OptimizerConfig(name="adamw", lr=3e-4, weight_decay=0.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=20, min_lr_ratio=0.1),
        batch_size=8, seq_len=256, mix=dict(STAGE_MIX))
    summary = finetune(cfg)
    done = {"steps": summary["steps"], "tokens_seen": summary["tokens_seen"], "model": summary["result"],
            "base": str(base), "train_seconds": summary["train_seconds"]}
    (out / "bench_summary.json").write_text(json.dumps(done, indent=1))
    return done


def pretrain_student(run: Path, teacher, steps: int, work: Path, seed: int) -> dict:
    """The shared student init: CE pretraining on the teacher's own shards, the speedrun's optimizer/schedule."""
    done = cached(work / "student_pretrain", steps)
    if done:
        return done
    cfg = build_student(teacher, "llama-tiny", STUDENT, seed=seed).config
    pcfg = PretrainConfig(
        out=str(work / "student_pretrain"), model=cfg,
        train=TrainConfig(steps=steps, eval_every=0, eval_batches=8, log_every=10, keep_checkpoints=1, seed=seed,
                          progress=False, resume=False, restart=True, threads=2),
        optim=OptimizerConfig(name="muon", lr=3e-3, weight_decay=0.0),
        schedule=ScheduleConfig(name="wsd", warmup_steps=50, decay_fraction=0.3, min_lr_ratio=0.05),
        data=DataConfig(shards=str(run / "data" / "shards"), val_shards=str(run / "data" / "val_shards"),
                        tokenizer=str(run / "tokenizer"), batch_size=16, seq_len=256))
    summary = pretrain(pcfg)
    done = {"steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
            "model": str(Path(summary["checkpoint"]) / "model"), "train_seconds": summary["train_seconds"]}
    (work / "student_pretrain" / "bench_summary.json").write_text(json.dumps(done, indent=1))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a finished speedrun directory (runs/<stamp>)")
    ap.add_argument("--steps", type=int, default=200, help="student fine-tuning steps, every row")
    ap.add_argument("--lr", type=float, default=1e-3, help="student fine-tuning learning rate, every row")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=1000, help="chat rows the students train on")
    ap.add_argument("--n-eval", type=int, default=30, help="test records per task")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="student pretraining steps (0 = as many as the teacher's pretraining took)")
    ap.add_argument("--teacher-sft-steps", type=int, default=0,
                    help="0: the teacher is the run's SFT model; N: SFT the run's base for N steps, as its stage does")
    ap.add_argument("--methods", default="gold_sft,logit_kd,sequence_kd",
                    help="rows to train, of gold_sft,logit_kd,logit_kd_top32,sequence_kd (gold_sft is needed)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build (and cache in --work) the teacher and the student init, then stop")
    ap.add_argument("--work", default="/tmp/distill_bench", help="scratch directory for the runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    run, work = Path(args.run_dir), Path(args.work)
    timings = {}
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = run / "sft" / "run" / "model"
    teacher_sft_tokens = json.loads((run / "sft" / "run" / "summary.json").read_text())["tokens_seen"]
    if args.teacher_sft_steps:
        t0 = time.perf_counter()
        made = sft_teacher(run, args.teacher_sft_steps, work, args.seed)
        teacher_dir, teacher_sft_tokens = Path(made["model"]), made["tokens_seen"]
        timings["teacher_sft"] = time.perf_counter() - t0
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir, lazy=False).eval()
    test = read_chat_jsonl(run / "world" / "chat" / "test.jsonl")

    # the teacher's own training compute, from its run
    pre_metrics = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    teacher_pre_tokens = max(m.get("tokens_seen", 0) for m in pre_metrics)
    teacher_pre_steps = max(m["step"] for m in pre_metrics)
    t_stats = model_stats(teacher.config, context=256)
    teacher_compute = t_stats.train_flops_per_token * (teacher_pre_tokens + teacher_sft_tokens)

    t0 = time.perf_counter()
    pre_summary = pretrain_student(run, teacher, args.pretrain_steps or teacher_pre_steps, work, args.seed)
    init_dir = Path(pre_summary["model"])
    timings["student_pretrain"] = time.perf_counter() - t0
    if args.prepare_only:
        print(f"prepared: teacher {teacher_dir}, student init {init_dir} ({timings})")
        return

    t0 = time.perf_counter()
    check_batched(teacher, tok, test)
    teacher_scores = scores(teacher, tok, test, args.n_eval)
    timings["teacher_eval"] = time.perf_counter() - t0
    print("teacher", {k: v["acc"] for k, v in teacher_scores.items()}, flush=True)
    init = load_model(init_dir, lazy=False)
    check_same_vocab(teacher, init, tok, None, teacher_dir, init_dir)
    flops = flops_report(teacher, init, 256)
    s_stats = model_stats(init.config, context=256)
    pre_compute = s_stats.train_flops_per_token * pre_summary["tokens_seen"]

    rows = read_chat_jsonl(run / "sft" / "data" / "train.jsonl")
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.n_train]
    val_rows = read_chat_jsonl(run / "sft" / "data" / "val.jsonl")[:64]
    gold, _ = encode_rows(tok, rows, max_len=257)
    val, _ = encode_rows(tok, val_rows, max_len=257)
    t0 = time.perf_counter()
    seq, _, seq_stats = teacher_examples(teacher, tok, rows, max_new_tokens=128, max_len=257, batch_size=32)
    timings["teacher_answers"] = time.perf_counter() - t0
    seq_teacher_flops = t_stats.forward_flops_per_token * sum(len(e) for e in seq)
    print(f"teacher answered {seq_stats.answered}/{seq_stats.rows} prompts ({seq_stats.stopped} stopped), "
          f"{timings['teacher_answers']:.0f} s", flush=True)

    methods = {
        "gold_sft": (SFTObjective(), gold),
        "logit_kd": (LogitKD(teacher, temperature=2.0, alpha=0.5, topk=0), gold),
        "logit_kd_top32": (LogitKD(teacher, temperature=2.0, alpha=0.5, topk=32), gold),
        "sequence_kd": (SFTObjective(), seq),
    }
    methods = {k: v for k, v in methods.items() if k in args.methods.split(",")}
    students = {}
    for name, (objective, examples) in methods.items():
        t0 = time.perf_counter()
        student = load_model(init_dir, lazy=False)
        summary = train_student(
            student, objective, examples, val, work / name,
            TrainConfig(steps=args.steps, eval_every=0, eval_batches=8, log_every=10, keep_checkpoints=1,
                        seed=args.seed, progress=False, resume=False, restart=True),
            OptimizerConfig(name="adamw", lr=args.lr, weight_decay=0.0),
            ScheduleConfig(name="cosine", warmup_steps=20, min_lr_ratio=0.1),
            batch_size=args.batch_size, seq_len=256, pad_id=tok.pad_id if tok.pad_id is not None else 0, log=print)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc = scores(student, tok, test, args.n_eval)
        teacher_flops = (t_stats.forward_flops_per_token * summary["tokens_seen"] if name.startswith("logit")
                         else seq_teacher_flops if name == "sequence_kd" else 0.0)
        students[name] = {"scores": sc, "tokens_seen": summary["tokens_seen"], "val_ce_gold": summary.get("val_loss"),
                          "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
                          "student_train_flops": s_stats.train_flops_per_token * summary["tokens_seen"],
                          "teacher_flops": teacher_flops}
        print(name, {k: v["acc"] for k, v in sc.items()}, f"train {train_s:.0f} s", flush=True)

    common = {"teacher": str(teacher_dir), "student": {**STUDENT, "preset": "llama-tiny"}, **flops,
              "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seq_len": 256,
              "n_train_rows": len(rows), "schedule": "cosine, 20 warmup, min 0.1", "optimizer": "adamw",
              "student_pretrain_tokens": pre_summary["tokens_seen"], "student_pretrain_flops": pre_compute,
              "teacher_pretrain_tokens": teacher_pre_tokens, "teacher_sft_tokens": teacher_sft_tokens,
              "teacher_sft_steps": args.teacher_sft_steps or "the run's SFT stage",
              "teacher_training_flops": teacher_compute, "threads": torch.get_num_threads()}
    teacher_name = (f"teacher (the speedrun's SFT recipe, {args.teacher_sft_steps} steps)" if args.teacher_sft_steps
                    else "teacher (the speedrun's SFT model)")
    out = []
    for name, st in students.items():
        spent = st["student_train_flops"] + st["teacher_flops"]
        for task in TASKS:
            s, t = st["scores"][task], teacher_scores[task]
            ratio, ratio_se = kept(s["acc"], s["stderr"], t["acc"], t["stderr"])
            out.append(result("distill", f"{task}_accuracy_kept_{name}", True, s["acc"], teacher_name, t["acc"],
                              method=name, task=task, n=s["n"], stderr=s["stderr"],
                              teacher_stderr=t["stderr"], kept=ratio, kept_stderr=ratio_se,
                              val_ce_gold=st["val_ce_gold"], tokens_seen=st["tokens_seen"],
                              student_train_flops=st["student_train_flops"], teacher_flops=st["teacher_flops"],
                              flops_spent=spent, flops_spent_with_pretrain=spent + pre_compute,
                              train_seconds=st["train_seconds"], **common))
    for name in [m for m in ("sequence_kd", "logit_kd", "logit_kd_top32") if m in students]:  # V.10, KD vs gold
        for task in TASKS:
            s, g = students[name]["scores"][task], students["gold_sft"]["scores"][task]
            out.append(result("distill", f"{task}_accuracy_{name}_vs_gold_sft", True, s["acc"],
                              "student SFT on gold answers", g["acc"], method=name, task=task, n=s["n"],
                              stderr=s["stderr"],
                              baseline_stderr=g["stderr"], difference=s["acc"] - g["acc"],
                              difference_stderr=math.hypot(s["stderr"], g["stderr"]), **common))
    out.append(result("distill", "forward_flops_per_token", False, flops["student_forward_flops_per_token"],
                      "teacher", flops["teacher_forward_flops_per_token"], seed_claim=10.0, **common))
    timings["total"] = time.perf_counter() - t_start
    for r in out:
        if r["baseline"]["value"] == 0:  # result() would call any score "infinitely ahead" of a zero
            r["config"]["ratio_note"] = "the baseline scored 0: the ratio means nothing"
        r["config"]["timings_s"] = timings
        r["config"]["teacher_answers"] = {"answered": seq_stats.answered, "stopped": seq_stats.stopped,
                                          "answer_tokens": seq_stats.answer_tokens}
    write_result("distill", out)


if __name__ == "__main__":
    sys.exit(main())
