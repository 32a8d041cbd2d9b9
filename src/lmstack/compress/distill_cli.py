"""`lmstack distill`: train a small student model from a teacher model directory (lmstack.compress.distill).

Usage:
    lmstack distill --teacher runs/x/sft/run/model --student_preset llama-tiny --data chat.jsonl \
        --method logits --temperature 2 --alpha 0.5 --topk 64 --train.steps 300 --out runs/student
    lmstack distill --teacher runs/x/sft/run/model --student runs/small/model --data chat.jsonl \
        --method sequence --max_tokens 128 --out runs/student-seq

The student is either a preset (`--student_preset llama-tiny`, fields changed with
`--student_overrides d_model=128 --student_overrides n_layers=2`), built at random init with the teacher's
vocabulary, special ids and context length, or a model directory (`--student DIR`), which must share the
teacher's vocabulary: the same number of rows and real tokens, and, when it carries a tokenizer, the same
token -> id map. Anything else is refused before training, naming both sides.

The run directory `--out` gets config.yaml, metrics.jsonl, loss.png, checkpoints/, summary.json (steps,
losses, parameter counts and FLOPs of both models, the compute spent) and model/: the student in HF layout
with the teacher's tokenizer, chat template and generation config, which lmstack.load_model, lmstack.LLM,
`lmstack eval`, `lmstack generate` and `lmstack chat` open. Sequence KD also writes teacher_answers.jsonl
(the teacher's answers as chat rows: the student's SFT targets). The teacher directory is only read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from lmstack.adapt.finetune import split_rows
from lmstack.adapt.sft import SFTObjective, encode_rows, read_chat_jsonl
from lmstack.compress.distill import LogitKD, teacher_examples, train_student
from lmstack.config import ConfigCommand, ConfigError, atomic_write_text, save_config, to_dict
from lmstack.errors import LmstackError
from lmstack.model.counting import model_stats
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.presets import preset
from lmstack.model.side_files import keep_source_files
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import check_vocab, real_vocab
from lmstack.runtime.device import resolve_device
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.core import has_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import LogConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, eval_every=0, eval_batches=8, log_every=10, keep_checkpoints=1)


@dataclass
class DistillConfig:
    teacher: str = ""
    """The teacher model directory (with its tokenizer.json); only read."""
    student: str = ""
    """A student model directory to start from (it must share the teacher's vocabulary); or use student_preset."""
    student_preset: str = ""
    """A model preset (e.g. llama-tiny) for a student built at random init with the teacher's vocabulary."""
    student_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields set on the preset student, KEY=VALUE (d_model=128, n_layers=2, n_heads=4)."""
    data: str = ""
    """SFT data (JSONL, TRL's formats): the loss covers assistant tokens (every token of `text` rows). For
    sequence KD only the prompts are used: the teacher answers them."""
    val_data: str = ""
    """Validation rows (gold answers), scored at the end (optional; otherwise val_fraction of `data`)."""
    val_fraction: float = 0.05
    """Without val_data: the share of rows held out for validation (0 = none)."""
    method: Literal["logits", "sequence"] = "logits"
    """logits: match the teacher's softened next-token distribution on the data (plus alpha-mixed CE);
    sequence: fine-tune on the teacher's own answers to the data's prompts (Kim & Rush 2016)."""
    out: str = "runs/distill"
    """Run directory; the student lands in out/model."""
    temperature: float = 2.0
    """logits: the softmax temperature T of both models in the KL (the KL is scaled by T^2)."""
    alpha: float = 0.5
    """logits: weight of the KD term; 1 - alpha weighs the cross-entropy on the data (1 = pure KD)."""
    topk: int = 0
    """logits: keep the teacher's k most likely tokens per position plus one bucket for the rest (0 = all)."""
    teacher_temperature: float = 0.0
    """sequence: 0 = the teacher answers greedily; > 0 = it samples at this temperature."""
    teacher_top_k: int = 0
    """sequence, sampled: sample from the teacher's top-k tokens only (0 = all)."""
    max_tokens: int = 128
    """sequence: the longest answer the teacher may give (tokens)."""
    train: TrainConfig = field(default_factory=_default_train)
    """The training loop (steps, max_seconds, clipping, checkpoints, seed, device, threads, ...)."""
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0))
    """The student's optimizer."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_steps=20))
    """The learning-rate schedule."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics beside metrics.jsonl: TensorBoard (--log.tensorboard true), W&B (--log.wandb true)."""
    batch_size: int = 8
    """Packed rows per step."""
    seq_len: int = 256
    """Positions per packed row; longer conversations are cut (and counted)."""

    def __post_init__(self) -> None:
        if self.method not in ("logits", "sequence"):
            raise ConfigError(f"method={self.method!r} is not allowed; choose one of logits, sequence")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha} is not allowed; it must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is not allowed; it must be > 0")
        if self.teacher_temperature < 0:
            raise ConfigError(f"teacher_temperature={self.teacher_temperature} is not allowed; it must be >= 0")
        for name in ("topk", "teacher_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed; it must be >= 0")
        for name in ("batch_size", "seq_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed; it must be an integer >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} is not allowed; it must be in [0, 1)")


# ---- the two models
def build_student(teacher: Transformer, name: str, overrides: dict[str, Any] | None = None, seed: int = 0
                  ) -> Transformer:
    """A preset student at random init (seeded) that shares the teacher's vocabulary, special ids and context."""
    tc = teacher.config
    fields = {"vocab_size": tc.vocab_size, "real_vocab_size": tc.real_vocab_size, "max_seq_len": tc.max_seq_len,
              "bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id, "pad_token_id": tc.pad_token_id}
    for key, value in (overrides or {}).items():  # KEY=VALUE flags arrive as text: read them as YAML scalars
        fields[key] = yaml.safe_load(value) if isinstance(value, str) else value
    for key in ("vocab_size", "real_vocab_size"):
        if fields[key] != getattr(tc, key):
            raise LmstackError(f"--student_overrides {key}={fields[key]}: the student must keep the teacher's "
                               f"{key} ({getattr(tc, key)}); distillation compares their distributions token by token")
    try:
        cfg = preset(name, **fields)
    except TypeError as e:
        raise ConfigError(f"--student_overrides: {e}") from None
    torch.manual_seed(seed)
    return Transformer(cfg)


def check_same_vocab(teacher: Transformer, student: Transformer, teacher_tok, student_tok=None,
                     teacher_path: Any = "teacher", student_path: Any = "student") -> None:
    """Refuse a pair that does not share one vocabulary: logits of another width, another real vocabulary,
    or a student tokenizer whose token -> id map differs from the teacher's."""
    t, s = teacher.config, student.config
    if (t.vocab_size, real_vocab(t)) != (s.vocab_size, real_vocab(s)):
        raise LmstackError(f"the teacher ({teacher_path}) has {real_vocab(t)} real tokens in {t.vocab_size} rows, "
                           f"the student ({student_path}) {real_vocab(s)} in {s.vocab_size}: distillation needs "
                           "one shared tokenizer and vocabulary")
    if student_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        differ = sorted(set(student_tok.get_vocab().items()) ^ set(teacher_tok.get_vocab().items()))[:3]
        raise LmstackError(f"the student's tokenizer ({student_path}) is not the teacher's ({teacher_path}): their "
                           f"token -> id maps differ (e.g. {differ}); distillation needs one shared tokenizer")


def flops_report(teacher: Transformer, student: Transformer, context: int) -> dict[str, Any]:
    """Parameters and forward FLOPs per token (2 x matmul params + attention at `context`) of both models."""
    ts, ss = model_stats(teacher.config, context=context), model_stats(student.config, context=context)
    return {"teacher_params": ts.total_params, "student_params": ss.total_params,
            "param_ratio": ts.total_params / ss.total_params,
            "teacher_forward_flops_per_token": ts.forward_flops_per_token,
            "student_forward_flops_per_token": ss.forward_flops_per_token,
            "flops_ratio": ts.forward_flops_per_token / ss.forward_flops_per_token, "context": context}


# ---- the run
def distill(cfg: DistillConfig, log=print) -> dict[str, Any]:
    """Distill cfg.teacher into a student (logit or sequence KD); returns the summary (also out/summary.json)."""
    if not cfg.teacher or not cfg.data:
        raise LmstackError("distill needs --teacher (a model directory) and --data (a JSONL file)")
    if bool(cfg.student) == bool(cfg.student_preset):
        raise LmstackError("give exactly one of --student DIR (a model to start from) and --student_preset NAME")
    for flag, path in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        if path and not Path(path).is_dir():
            raise LmstackError(f"{flag} directory not found: {path}")
    if not has_tokenizer(cfg.teacher):
        raise LmstackError(f"no tokenizer.json (nor tokenizer.model) in the teacher directory {cfg.teacher}")
    out = Path(cfg.out)
    if out.resolve().is_relative_to(Path(cfg.teacher).resolve()):
        raise LmstackError(f"--out {out} is inside the teacher directory {cfg.teacher}, which distill leaves untouched")

    set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    tok = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher, lazy=False).to(device)
    check_vocab(teacher, tok, model_path=cfg.teacher, tokenizer_path=cfg.teacher, what="distill")
    if cfg.student:
        student = load_model(cfg.student, lazy=False)
        student_tok = load_tokenizer(cfg.student) if has_tokenizer(cfg.student) else None
        check_same_vocab(teacher, student, tok, student_tok, cfg.teacher, cfg.student)
    else:
        student = build_student(teacher, cfg.student_preset, cfg.student_overrides, seed=cfg.train.seed)
        check_same_vocab(teacher, student, tok, None, cfg.teacher, f"preset {cfg.student_preset}")
    student = student.to(device)
    if student.config.max_seq_len < cfg.seq_len:
        raise LmstackError(f"seq_len={cfg.seq_len} exceeds the student's max_seq_len={student.config.max_seq_len}")

    out.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, restart=False)), out / "config.yaml")
    rows = read_chat_jsonl(cfg.data)
    if cfg.val_data:
        train_rows, val_rows = rows, read_chat_jsonl(cfg.val_data)
    else:
        train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.train.seed)
    val, _ = encode_rows(tok, val_rows, max_len=cfg.seq_len + 1)  # gold answers, whichever method trains
    report: dict[str, Any] = {"method": cfg.method}
    teacher_stats = model_stats(teacher.config, context=cfg.seq_len)
    if cfg.method == "sequence":
        examples, answers, stats = teacher_examples(
            teacher, tok, train_rows, max_new_tokens=cfg.max_tokens, temperature=cfg.teacher_temperature,
            top_k=cfg.teacher_top_k, seed=cfg.train.seed, max_len=cfg.seq_len + 1)
        atomic_write_text(out / "teacher_answers.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers))
        report["teacher"] = to_dict(stats)
        log(f"distill: the teacher answered {stats.answered}/{stats.rows} prompts ({stats.stopped} stopped on their "
            f"own, {stats.answer_tokens} tokens); skipped {stats.skipped_no_prompt} without a prompt and "
            f"{stats.skipped_too_long} too long")
        objective = SFTObjective()
        # with a KV cache the teacher reads every prompt token and makes every answer token once
        prompt_tokens = sum(len(e) for e in examples) - stats.answer_tokens
        teacher_flops = teacher_stats.forward_flops_per_token * (prompt_tokens + stats.answer_tokens)
    else:
        examples, stats = encode_rows(tok, train_rows, max_len=cfg.seq_len + 1)
        report["data"] = to_dict(stats)
        log(f"distill data: {stats.summary()}")
        objective = LogitKD(teacher, temperature=cfg.temperature, alpha=cfg.alpha, topk=cfg.topk)
        teacher_flops = None  # one teacher forward per training token: filled in below
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    summary = train_student(student, objective, examples, val, out, cfg.train, cfg.optim, cfg.schedule,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad_id, log=log, log_cfg=cfg.log)
    flops = flops_report(teacher, student, cfg.seq_len)
    student_train_flops = model_stats(student.config, context=cfg.seq_len).train_flops_per_token
    if teacher_flops is None:
        teacher_flops = teacher_stats.forward_flops_per_token * summary["tokens_seen"]
    summary.update(report=report, **flops, student_train_flops=student_train_flops * summary["tokens_seen"],
                   teacher_flops=teacher_flops)
    model_dir = save_model(student, out / "model", tokenizer=tok)
    keep_source_files(cfg.teacher, model_dir, student.config)  # the teacher's tokenizer, template, generation config
    summary["result"] = str(model_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    log(f"distill: student ({flops['student_params']:,} parameters, {flops['param_ratio']:.1f}x fewer than the "
        f"teacher) written to {model_dir}")
    return summary


COMMANDS = ConfigCommand(DistillConfig, distill)
