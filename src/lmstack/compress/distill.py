"""Knowledge distillation: a small student learns from a large teacher, on lmstack's SFT trainer.

Two methods, both over chat / SFT rows (lmstack.adapt.sft), with the loss on the tokens the data marks
(assistant tokens for chat rows, every token for `text` rows):

- logit KD (Hinton et al. 2015). The teacher runs under no_grad in the same step, on the same batch; the
  student matches its softened next-token distribution:
      loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, data)
  T^2 keeps the soft term's gradient on the scale of the hard one as T grows (the gradient of the KL
  shrinks as 1 / T^2). alpha = 1 is pure KD; alpha = 0 is plain SFT.
  With topk = k > 0 only the teacher's k most likely tokens per position are kept (their exact
  probabilities at T), and everything else becomes one more outcome, "the rest": the teacher's rest mass
  is 1 - (its top-k mass), the student's is its own mass on every other token. Both are then proper
  distributions over k + 1 outcomes and the loss is the KL between those. So the student is still pushed
  to put as little mass outside the teacher's top-k as the teacher does (renormalising both over the
  top-k alone would let the student spill mass there for free); by the data-processing inequality the
  loss is at most the full KL, and equal to it at k = vocab. The memory this saves: the teacher's
  (positions, vocab) logits are reduced to (positions, k) before the student's forward runs, so the peak
  holds one full-vocabulary tensor (the student's) instead of two.
- sequence-level KD (Kim & Rush 2016). The teacher answers every prompt of the data (greedy, or sampled
  at a temperature); the student is fine-tuned with plain cross-entropy on those answers, token for
  token the ids the teacher produced (no decode / re-encode round trip). With a fine-tuned teacher
  this is also "distillation-based fine-tuning" (V.10): its answers replace the gold ones as SFT targets.

The training loop is lmstack.adapt.finetune's SFTTrainer (the Trainer: clipping, schedule, metrics,
checkpoints, exact resume) with the objective swapped; this module adds only the losses and the
teacher's answers.

Usage:
    loss = kd_loss(student_logits, teacher_targets(teacher_logits, temperature=2.0, topk=64), temperature=2.0)
    objective = LogitKD(teacher, temperature=2.0, alpha=0.5, topk=0)     # loss(model, batch) for the Trainer
    examples, rows, stats = teacher_examples(teacher, tok, chat_rows, max_new_tokens=128)   # sequence KD
    summary = train_student(student, objective, examples, val, out_dir, train_cfg, optim_cfg, schedule_cfg)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.adapt.finetune import SFTTrainer
from lmstack.adapt.sft import SFTExample, SFTLoader, SFTObjective, pack_examples
from lmstack.data.trl_formats import sft_row
from lmstack.errors import LmstackError
from lmstack.model.reference_decode import reference_decode
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier

# Stands in for log(0) where a probability is exactly zero (the teacher's "rest" when k = vocab). Finite, like
# lmstack.model.vocab.PAD_LOGIT, so 0 * log(0) terms are 0 and never NaN, and gradients stay finite.
LOG_ZERO = -1e30


# ---- the losses
@dataclass
class TeacherTargets:
    """The teacher's distribution at temperature T, on the positions the loss counts (N positions)."""
    logp: torch.Tensor
    """(N, vocab) log-probabilities, or (N, k) for top-k targets."""
    index: torch.Tensor | None = None
    """(N, k) token ids of the top-k targets; None for the full distribution."""
    rest_logp: torch.Tensor | None = None
    """(N,) log of the teacher's mass outside its top-k (LOG_ZERO when none is left); None for full targets."""


def _rest_logp(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the mass of logp (N, V) outside the ids `index` (N, k), computed without 1 - sum cancellation."""
    return logp.scatter(-1, index, LOG_ZERO).logsumexp(-1).clamp_min(LOG_ZERO)


@torch.no_grad()
def teacher_targets(teacher_logits: torch.Tensor, temperature: float = 1.0, topk: int = 0) -> TeacherTargets:
    """Soft targets from teacher logits (N, vocab): the whole distribution (topk = 0) or its top-k plus the rest."""
    if temperature <= 0:
        raise LmstackError(f"temperature must be > 0, got {temperature}")
    if topk < 0:
        raise LmstackError(f"topk must be >= 0 (0 = the whole vocabulary), got {topk}")
    logp = (teacher_logits.float() / temperature).log_softmax(-1)
    if not topk:
        return TeacherTargets(logp)
    index = logp.topk(min(topk, logp.shape[-1]), dim=-1).indices
    return TeacherTargets(logp.gather(-1, index), index, _rest_logp(logp, index))


def kd_loss(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher_T || student_T); student_logits (N, vocab), targets from the same N
    positions. Top-k targets compare the k kept tokens plus one "rest" outcome (see the module docstring)."""
    if student_logits.shape[0] != targets.logp.shape[0]:
        raise LmstackError(f"student logits cover {student_logits.shape[0]} positions, the teacher's "
                           f"{targets.logp.shape[0]}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # nothing counted: an exact 0 still attached to the graph
    logq = (student_logits.float() / temperature).log_softmax(-1)
    if targets.index is None:
        if logq.shape[-1] != targets.logp.shape[-1]:
            raise LmstackError(f"the student scores {logq.shape[-1]} tokens, the teacher {targets.logp.shape[-1]}: "
                               "distillation needs one shared vocabulary")
        p_logp, q_logp = targets.logp, logq
    else:
        q_rest = _rest_logp(logq, targets.index)
        p_logp = torch.cat((targets.logp, targets.rest_logp[:, None]), -1)
        q_logp = torch.cat((logq.gather(-1, targets.index), q_rest[:, None]), -1)
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    return kl.mean() * temperature ** 2


class LogitKD(SFTObjective):
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE on the data, on the batch's loss-masked positions.
    The teacher runs in eval mode under no_grad inside loss(), so it is the same step and the same batch; only
    the student (the model the Trainer passes) gets gradients."""

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5, topk: int = 0,
                 use_doc_ids: bool = True):
        super().__init__(use_doc_ids=use_doc_ids)
        if not 0 <= alpha <= 1:
            raise LmstackError(f"alpha must be in [0, 1] (1 = pure KD, 0 = plain SFT), got {alpha}")
        if temperature <= 0:
            raise LmstackError(f"temperature must be > 0, got {temperature}")
        self.teacher, self.temperature, self.alpha, self.topk = teacher.eval(), temperature, alpha, topk
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["loss_mask"]
        with torch.no_grad():  # reduced to the counted positions (and to top-k) before the student's forward
            targets = teacher_targets(self.logits(self.teacher, batch)[mask], self.temperature, self.topk)
        logits = self.logits(model, batch)
        scored, gold = logits[mask].float(), batch["targets"][mask]
        n = int(gold.numel())
        if n == 0:
            return logits.sum() * 0.0, {"loss": 0.0, "ce": 0.0, "kd": 0.0, "accuracy": 0.0, "n_tokens": 0}
        kd = kd_loss(scored, targets, self.temperature)
        ce = F.cross_entropy(scored, gold)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        aux = getattr(model, "aux_loss", None)  # a student with experts keeps its load-balancing term, as in SFT
        if torch.is_tensor(aux):
            loss = loss + aux.to(loss)
        acc = float((scored.detach().argmax(-1) == gold).float().mean())
        # "ce" is the data cross-entropy alone, so the Trainer's perplexity means the same thing as in SFT
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "kd": float(kd.detach()),
                      "accuracy": acc, "n_tokens": n}


# ---- sequence-level KD: the teacher's answers as targets
@dataclass
class TeacherStats:
    rows: int = 0
    """Rows read."""
    answered: int = 0
    """Rows the teacher answered (training examples made)."""
    skipped_no_prompt: int = 0
    """Rows with nothing to answer (plain `text` rows, or a conversation that opens with the assistant)."""
    skipped_too_long: int = 0
    """Rows whose prompt leaves no room to answer within max_len / the teacher's context."""
    stopped: int = 0
    """Answers that ended with the teacher's own stop token (the rest hit max_new_tokens)."""
    answer_tokens: int = 0
    """Tokens the teacher generated, in total."""


def _prompt_ids(tok, row: dict) -> tuple[list[int], list[dict] | str | None, int | None]:
    """(prompt ids, the prompt as given, the id that ends an answer) of one SFT row; ids [] when there is
    nothing to answer. Chat rows: every turn before the last assistant turn, through the chat template with a
    generation prompt; plain prompt/completion rows: BOS + the prompt text, answers end with EOS."""
    kind, first, second = sft_row(row)
    if kind == "text":
        return [], None, None
    if kind == "prompt_completion":
        bos = [tok.bos_id] if tok.bos_id is not None else []
        return bos + tok.encode(first, allow_special=False), first, tok.eos_id
    messages = first  # "messages": the whole conversation; "chat_prompt_completion": the prompt turns
    if kind == "messages":  # the teacher takes the last assistant turn (a row without one is all prompt)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        messages = messages[:last] if last is not None else messages
    if not messages or all(m["role"] == "system" for m in messages):
        return [], None, None
    eot = tok.end_of_turn_ids()
    return tok.apply_chat_template(messages, add_generation_prompt=True)[0], messages, (eot[0] if eot else tok.eos_id)


@torch.no_grad()
def teacher_examples(teacher: nn.Module, tok, rows: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                     top_k: int = 0, seed: int = 0, max_len: int = 257, batch_size: int = 16,
                     ) -> tuple[list[SFTExample], list[dict], TeacherStats]:
    """The teacher answers each row's prompt; returns (examples whose targets are exactly the teacher's tokens,
    the same answers as readable rows {"messages": prompt + [{"role": "assistant", ...}], "kind": ...},
    counts). Greedy at temperature 0, else sampled (seeded). Prompts of equal length decode together in
    batches; an answer is cut at its first stop token, which stays in the example (the student learns to stop)."""
    if max_new_tokens < 1:
        raise LmstackError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    teacher.eval()
    stats = TeacherStats()
    prompts: dict[int, tuple[list[int], Any, int | None, dict]] = {}
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            ids, given, stop = _prompt_ids(tok, row)
        except LmstackError as e:
            raise LmstackError(f"row #{i}: {e}") from None
        if not ids:
            stats.skipped_no_prompt += 1
        elif len(ids) + 1 > min(max_len, teacher.config.max_seq_len):
            stats.skipped_too_long += 1
        else:
            prompts[i] = (ids, given, stop, row)
    by_len: dict[tuple[int, int | None], list[int]] = {}
    for i, (ids, _, stop, _) in prompts.items():
        by_len.setdefault((len(ids), stop), []).append(i)
    answers: dict[int, list[int]] = {}
    for (length, stop), members in sorted(by_len.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        budget = min(max_new_tokens, min(max_len, teacher.config.max_seq_len) - length)
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            idx = torch.tensor([prompts[i][0] for i in chunk])
            out = reference_decode(teacher, idx, budget, temperature=temperature, top_k=top_k, eos_id=stop,
                                   seed=None if temperature == 0 else seed + chunk[0])
            for i, new in zip(chunk, out[:, length:].tolist()):
                if stop is not None and stop in new:
                    new = new[:new.index(stop) + 1]
                answers[i] = new
    examples, readable = [], []
    for i in sorted(answers):
        ids, given, stop, row = prompts[i]
        new = answers[i]
        stats.answered += 1
        stats.answer_tokens += len(new)
        stats.stopped += int(bool(new) and stop is not None and new[-1] == stop)
        examples.append(SFTExample(ids + new, [0] * len(ids) + [1] * len(new), str(row.get("kind", ""))))
        text = tok.decode([t for t in new if t != stop], skip_special_tokens=True)
        readable.append({"messages": given + [{"role": "assistant", "content": text}], "kind": row.get("kind", "")}
                        if isinstance(given, list) else {"prompt": given, "completion": text,
                                                         "kind": row.get("kind", "")})
    return examples, readable, stats


# ---- the loop
def train_student(student: nn.Module, objective: SFTObjective, examples: list[SFTExample], val: list[SFTExample],
                  out: str | Path, train: TrainConfig, optim: OptimizerConfig, schedule: ScheduleConfig,
                  batch_size: int = 8, seq_len: int = 256, pad_id: int = 0, log=print, log_cfg=None) -> dict[str, Any]:
    """Train every parameter of `student` on packed `examples` with `objective` (LogitKD, or SFTObjective for
    sequence KD and the gold-answer baseline) through SFTTrainer; returns its summary (metrics.jsonl, loss.png
    and checkpoints/ land in `out`)."""
    if not examples:
        raise LmstackError("nothing to distill on: no training examples")
    too_long = [len(e) for e in examples if len(e) > seq_len + 1]
    if too_long:
        raise LmstackError(f"{len(too_long)} example(s) exceed seq_len + 1 = {seq_len + 1} tokens "
                           f"(longest {max(too_long)}); cut them or raise seq_len")
    packed = pack_examples(examples, seq_len, pad_id, strategy="best_fit")
    loader = SFTLoader(packed, batch_size, seed=train.seed)
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = build_optimizer(student, optim)
    steps = train.steps

    def lr_at(progress: float) -> float:
        return lr_multiplier(schedule, int(progress * steps), steps)

    trainer = SFTTrainer(student, objective, optimizer, lr_at, train, loader, None, out, log=log,
                         tokens_per_row=seq_len, val_examples=val, seq_len=seq_len, pad_id=pad_id, log_cfg=log_cfg)
    return trainer.fit()
