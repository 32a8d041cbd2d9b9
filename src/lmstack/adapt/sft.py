"""Supervised fine-tuning data: chat rows -> token ids with an assistant-only loss mask, packed rows, batches.

A row is in one of TRL's SFT formats (lmstack.data.trl_formats): `text` (BOS? + text + EOS, every token
learned); `messages` (system / user / assistant / tool turns); `prompt`/`completion` text (plain text, no
template: BOS? + prompt + completion + EOS, the loss on the completion and EOS only); or `prompt`/`completion`
message lists (rendered together by the chat template, the loss on the completion's assistant tokens only, not
on assistant turns inside the prompt). The tokenizer's chat template (lmstack.tokenizer.chat_template) renders
messages to ids and a mask that is 1 exactly on the assistant's tokens (content, tool calls and the closing
end-of-turn token), so the model learns to answer and to stop, never to predict the user. A row without an
assistant turn teaches nothing: it is counted and skipped, not an error.

Packing lays several examples end to end in one row of `seq_len` positions. Every position carries the id of
the example it belongs to (`doc_ids`), and the model's attention mask hides keys of other examples, so an
example packed after another sees exactly what it would see alone (tests check the logits agree). Padding at
the end of a row gets a doc id of its own and no loss.

Example of n tokens -> n - 1 positions: input ids[:-1], target ids[1:], loss mask mask[1:].

Usage:
    rows = read_chat_jsonl("chat.jsonl")
    examples, stats = encode_rows(tok, rows, max_len=256)      # stats: rows, kept, skipped_no_assistant, ...
    packed = pack_examples(examples, seq_len=256, pad_id=tok.pad_id)
    loader = SFTLoader(packed, batch_size=8, seed=0)
    batch = next(loader)                                       # input_ids, targets, loss_mask, doc_ids: (B, T)
    loss, metrics = SFTObjective().loss(model, batch)          # 0 (no NaN) when nothing is counted
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.trl_formats import sft_row
from lmstack.errors import LmstackError


@dataclass
class SFTExample:
    ids: list[int]
    """Token ids of the rendered conversation (starts with <|bos|>)."""
    mask: list[int]
    """1 where the token is one the model should learn to produce (assistant tokens), else 0."""
    task: str = ""
    """The row's task / kind (for mixtures and reports)."""
    difficulty: float = 0.0
    """A difficulty score (world arithmetic: number of operations), for curricula."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_learned(self) -> int:
        """Assistant tokens that are targets (the first token is never a target)."""
        return int(sum(self.mask[1:]))


@dataclass
class SFTStats:
    rows: int = 0
    """Rows read."""
    kept: int = 0
    """Rows turned into training examples."""
    skipped_no_assistant: int = 0
    """Rows without an assistant turn (nothing to learn)."""
    truncated: int = 0
    """Rows longer than max_len tokens, cut at max_len (the cut part is lost)."""
    skipped_too_long: int = 0
    """Rows whose assistant tokens all lay past max_len."""
    learned_tokens: int = 0
    """Assistant tokens that get a loss."""
    total_tokens: int = 0
    """All tokens of the kept examples."""
    by_task: dict[str, int] = field(default_factory=dict)
    """Kept rows per task."""

    def summary(self) -> str:
        return (f"{self.kept}/{self.rows} chat rows kept; skipped {self.skipped_no_assistant} without an assistant "
                f"turn and {self.skipped_too_long} too long; truncated {self.truncated}; "
                f"{self.learned_tokens}/{self.total_tokens} tokens carry the loss")


def read_chat_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of an SFT JSONL file in one of TRL's formats; a bad line is an error naming the line and field."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"chat data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmstackError(f"{path}:{i} is not valid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise LmstackError(f"{path}:{i} must be a JSON object with 'messages', got {type(row).__name__}")
                try:
                    sft_row(row)
                except LmstackError as e:
                    raise LmstackError(f"{path}:{i}: {e}") from None
                rows.append(row)
        except UnicodeDecodeError as e:
            raise LmstackError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    if not rows:
        raise LmstackError(f"{path} holds no chat rows")
    return rows


def _encode_row(tok, kind: str, first, second) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one row that sft_row has read."""
    if kind == "messages":
        return tok.apply_chat_template(first)
    if kind == "text":  # TRL's standard language modeling: every token is a target
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(first, allow_special=False)
        ids += [tok.eos_id] if tok.eos_id is not None else []
        return ids, [1] * len(ids)
    if kind == "prompt_completion":  # TRL's standard format: plain text, no chat template
        bos = [tok.bos_id] if tok.bos_id is not None else []
        eos = [tok.eos_id] if tok.eos_id is not None else []
        prompt = bos + tok.encode(first, allow_special=False)
        completion = tok.encode(second, allow_special=False) + eos
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    prompt_ids = tok.apply_chat_template(first, add_generation_prompt=True)[0]
    ids, mask = tok.apply_chat_template(first + second)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise LmstackError("the chat template renders the prompt differently once the completion follows, so the "
                           "completion cannot be cut out; give the row as 'messages'")
    # Assistant turns inside the prompt are context here, as in TRL's completion-only loss.
    return ids, [0] * len(prompt_ids) + list(mask[len(prompt_ids):])


def _difficulty(row: dict) -> float:
    d = row.get("difficulty")
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0


def encode_rows(tok, rows: Iterable[dict], max_len: int = 512,
                task_key: str = "kind") -> tuple[list[SFTExample], SFTStats]:
    """Chat rows -> examples of at most max_len tokens, plus counts of what was kept, cut and skipped.

    A row in none of TRL's SFT formats is an error naming the row; a row whose messages hold no assistant turn
    is skipped and counted. Longer rows keep their first max_len tokens (the prompt comes first and must stay)."""
    if max_len < 2:
        raise LmstackError(f"max_len={max_len} is too short; an example needs at least 2 tokens")
    stats, out = SFTStats(), []
    for k, row in enumerate(rows):
        stats.rows += 1
        try:
            kind, first, second = sft_row(row)
            if kind == "messages" and not any(m["role"] == "assistant" for m in first):
                stats.skipped_no_assistant += 1
                continue
            ids, mask = _encode_row(tok, kind, first, second)
        except LmstackError as e:
            raise LmstackError(f"chat row #{k}: {e}") from None
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):
                stats.skipped_too_long += 1
                continue
            stats.truncated += 1
        task = str(row.get(task_key, "")) if task_key else ""
        ex = SFTExample(ids, mask, task, _difficulty(row))
        out.append(ex)
        stats.kept += 1
        stats.learned_tokens += ex.n_learned
        stats.total_tokens += len(ids)
        stats.by_task[task] = stats.by_task.get(task, 0) + 1
    return out, stats


# ---- packing
def _lay_out(groups: list[list[SFTExample]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    n = len(groups)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.bool)
    doc_ids = torch.zeros((n, seq_len), dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    for r, group in enumerate(groups):
        at = 0
        for d, ex in enumerate(group):
            m = len(ex) - 1
            ids = torch.tensor(ex.ids, dtype=torch.long)
            input_ids[r, at:at + m], targets[r, at:at + m] = ids[:-1], ids[1:]
            loss_mask[r, at:at + m] = torch.tensor(ex.mask[1:], dtype=torch.bool)
            doc_ids[r, at:at + m] = d
            at += m
        doc_ids[r, at:] = len(group)  # padding is a document of its own: it sees nothing real, nor is seen
        lengths[r] = at
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "doc_ids": doc_ids,
            "lengths": lengths}


def pack_examples(examples: list[SFTExample], seq_len: int, pad_id: int,
                  strategy: str = "greedy") -> dict[str, torch.Tensor]:
    """Pack examples into rows of seq_len positions; returns (N, seq_len) tensors input_ids, targets,
    loss_mask and doc_ids, and lengths (N,): the real (non-padding) positions of each row.

    strategy: "greedy" keeps the given order (next-fit: a new row starts when the next example does not fit;
    curricula need the order), "best_fit" places longest first into the fullest row that has room (fewer
    rows, less padding), "none" puts one example per row (the unpacked baseline)."""
    if strategy not in PACKERS:
        raise LmstackError(f"packing strategy {strategy!r} is not allowed; choose one of {', '.join(PACKERS)}")
    too_long = [len(e) for e in examples if len(e) - 1 > seq_len]
    if too_long:
        raise LmstackError(f"{len(too_long)} example(s) are longer than seq_len + 1 = {seq_len + 1} tokens "
                           f"(longest {max(too_long)}); encode them with max_len <= seq_len + 1")
    if not examples:
        raise LmstackError("nothing to pack: no examples")
    return _lay_out(PACKERS[strategy](examples, seq_len), seq_len, pad_id)


def _next_fit(examples: list[SFTExample], seq_len: int) -> list[list[SFTExample]]:
    groups, used = [[]], 0
    for ex in examples:
        if used + len(ex) - 1 > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(ex)
        used += len(ex) - 1
    return groups


def _best_fit(examples: list[SFTExample], seq_len: int) -> list[list[SFTExample]]:
    groups: list[list[SFTExample]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row) kept sorted, so the fullest row that fits is a bisect away
    for ex in sorted(examples, key=len, reverse=True):
        need = len(ex) - 1
        k = bisect.bisect_left(rooms, (need, -1))
        if k < len(rooms):
            room, row = rooms.pop(k)
            groups[row].append(ex)
            bisect.insort(rooms, (room - need, row))
        else:
            groups.append([ex])
            bisect.insort(rooms, (seq_len - need, len(groups) - 1))
    return groups


PACKERS = {"greedy": _next_fit, "best_fit": _best_fit, "none": lambda exs, seq_len: [[e] for e in exs]}


def packing_efficiency(packed: dict[str, torch.Tensor]) -> float:
    """Fraction of positions that hold real tokens (the rest is end-of-row padding)."""
    return float(packed["lengths"].sum()) / max(packed["input_ids"].numel(), 1)


# ---- batches
class SFTLoader:
    """Endless seeded batches over packed rows, reshuffled each epoch; state_dict()/load_state_dict() resume
    exactly where a checkpoint left off. shuffle=False keeps the row order (curricula)."""

    def __init__(self, packed: dict[str, torch.Tensor], batch_size: int, seed: int = 0, shuffle: bool = True):
        self.packed, self.batch_size, self.seed, self.shuffle = packed, batch_size, seed, shuffle
        self.n = packed["input_ids"].shape[0]
        if batch_size < 1:
            raise LmstackError(f"batch_size={batch_size} must be >= 1")
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        take, have = [], 0
        while have < self.batch_size:  # a batch may straddle two epochs (fewer rows than a batch, or the tail)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order()
            k = min(self.batch_size - have, self.n - self.pos)
            take.append(self._order[self.pos:self.pos + k])
            self.pos += k
            have += k
        idx = torch.cat(take)
        return {k: v[idx] for k, v in self.packed.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order()

    def batches(self):
        """One pass over every row in order, in batches (for evaluation)."""
        for i in range(0, self.n, self.batch_size):
            yield {k: v[i:i + self.batch_size] for k, v in self.packed.items()}


# ---- the loss
class SFTObjective:
    """Cross-entropy on the assistant tokens only; the Trainer calls loss(model, batch).

    The whole model forward runs through `model(input_ids, doc_ids=...)`, so any adapter method that keeps
    model(idx) -> (B, T, vocab) works unchanged. A batch with no counted token returns an exact 0 that is
    still attached to the graph (every parameter gets a zero gradient), never 0/0 = NaN."""

    def __init__(self, use_doc_ids: bool = True):
        self.use_doc_ids = use_doc_ids

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"doc_ids": batch["doc_ids"]} if self.use_doc_ids and batch.get("doc_ids") is not None else {}
        return model(batch["input_ids"], **kwargs)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(model, batch)
        mask = batch["loss_mask"]
        scored, targets = logits[mask].float(), batch["targets"][mask]
        n = int(targets.numel())
        if n == 0:
            loss = logits.sum() * 0.0
            return loss, {"loss": 0.0, "ce": 0.0, "accuracy": 0.0, "n_tokens": 0}
        loss = F.cross_entropy(scored, targets)
        aux = getattr(model, "aux_loss", None)  # MoE load balancing, when the model has experts
        if torch.is_tensor(aux):
            loss = loss + aux.to(loss)
        acc = float((scored.detach().argmax(-1) == targets).float().mean())
        return loss, {"loss": float(loss.detach()), "ce": float(loss.detach()), "accuracy": acc, "n_tokens": n}


@torch.no_grad()
def score_examples(model: nn.Module, examples: list[SFTExample], seq_len: int, pad_id: int, batch_size: int = 16,
                   objective: SFTObjective | None = None) -> dict[str, float]:
    """Teacher-forced scores of the assistant replies, one example per row.

    token_acc: fraction of assistant tokens that are the argmax; exact: fraction of examples whose every
    assistant token is the argmax -- exactly the examples greedy decoding would reproduce word for word;
    loss: mean cross-entropy per assistant token."""
    objective = objective or SFTObjective()
    was_training = model.training
    model.eval()
    right = total = exact = 0
    ce = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = min(seq_len, max(len(e) - 1 for e in chunk))
        batch = pack_examples([SFTExample(e.ids[:width + 1], e.mask[:width + 1]) for e in chunk], width, pad_id,
                              strategy="none")
        batch.pop("doc_ids")  # one example per row, padded at the end: causal attention never sees the padding
        logits = objective.logits(model, batch).float()
        ok = (logits.argmax(-1) == batch["targets"]) | ~batch["loss_mask"]
        exact += int(ok.all(dim=1).sum())
        mask = batch["loss_mask"]
        right += int((ok & mask).sum())
        total += int(mask.sum())
        ce += float(F.cross_entropy(logits[mask], batch["targets"][mask], reduction="sum")) if mask.any() else 0.0
    model.train(was_training)
    n = max(len(examples), 1)
    return {"token_acc": right / max(total, 1), "exact": exact / n, "loss": ce / max(total, 1), "n": len(examples)}


def describe(packed: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rows, positions, learned tokens and the packing efficiency of packed rows."""
    return {"rows": int(packed["input_ids"].shape[0]), "positions": int(packed["input_ids"].numel()),
            "learned_tokens": int(packed["loss_mask"].sum()), "efficiency": packing_efficiency(packed)}
