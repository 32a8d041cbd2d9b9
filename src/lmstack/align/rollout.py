"""Rollouts: sample completions of prompts from the policy through the inference engine, score them, and lay
them out as a training batch. Every online method (PPO, GRPO, RLOO, rejection sampling, self-play) starts here.

The engine is built afresh for each rollout phase from the live policy module: it packs its own copies of
the weights for fast decoding and caches prompt KV by content, so an engine kept across optimizer steps would
sample from stale weights. Building one costs a few milliseconds for the models this runs on.

A prompt comes from a record: its `prompt` field, or the last user turn of its `messages` (the synthetic
world's chat records). The record travels with every sample so verifiable rewards can check the answer.
Completion ids include the token that ended the reply (the template's end of turn or eos), so the policy is also
trained on *when* to stop; a reply cut at max_new_tokens has no such token (finished=False).

Usage:
    from lmstack.align.rollout import sample, to_batch, evaluate_policy
    ro = sample(policy, tok, records, n=8, max_new_tokens=96, temperature=1.0, seed=0)
    rewards = ro.score(build_reward("math"))                    # (N,) NaN where the reward does not apply
    batch = to_batch(ro, tok, device)                            # collate() layout, see logprobs.py
    acc = evaluate_policy(policy, tok, test_records, build_reward("math"))   # greedy: mean, stderr, n
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from lmstack.align.logprobs import _use_chat, collate, encode_prompt
from lmstack.errors import LmstackError
from lmstack.infer.llm import LLM
from lmstack.infer.sampling_params import SamplingParams


def prompt_text(record: dict) -> str:
    """The user's request in a record: `prompt`, else the last user message of `messages`."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    users = [m.get("content") for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if users and isinstance(users[-1], str) and users[-1].strip():
        return users[-1]
    raise LmstackError(f"record {record.get('id', '?')!r} has no prompt: give a 'prompt' string or 'messages' with a "
                       "user turn")


@dataclass
class PromptData:
    records: list[dict]
    path: str = ""
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def report(self) -> str:
        text = f"loaded {len(self.records)} prompts from {self.path}"
        if self.skipped:
            parts = [f"{why} {len(lines)} (lines {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''})"
                     for why, lines in self.skipped.items()]
            text += f"; skipped {self.n_skipped}: " + "; ".join(parts)
        return text


def load_prompts(path: str | Path, split: str | None = None, kind: str | None = None) -> PromptData:
    """Prompt records from JSONL (one JSON object per line with `prompt` or `messages`, plus whatever the reward
    checks: answer, checker/args, label, ...). Unparsable lines and rows without a prompt are counted and skipped;
    a file with no usable row is an error. split/kind keep only rows whose field equals it."""
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"prompt file {path} does not exist")
    data = PromptData([], str(path))
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            data.skipped.setdefault("not JSON", []).append(n)
            continue
        if not isinstance(row, dict):
            data.skipped.setdefault("not an object", []).append(n)
            continue
        if (split and row.get("split") != split) or (kind and row.get("kind") != kind):
            continue
        try:
            prompt_text(row)
        except LmstackError:
            data.skipped.setdefault("no prompt", []).append(n)
            continue
        data.records.append(row)
    if not data.records:
        raise LmstackError(f"{path} has no usable prompt row" + (f" with split={split!r}" if split else "")
                           + (f" and kind={kind!r}" if kind else "") + (f" ({data.report()})" if data.skipped else ""))
    return data


@dataclass
class Rollout:
    """N samples (n per prompt, consecutive: sample i belongs to prompt i // n)."""

    records: list[dict]
    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    n: int = 1

    def __len__(self) -> int:
        return len(self.texts)

    def score(self, reward: Callable[[str, str, dict], float]) -> torch.Tensor:
        """(N,) float rewards; NaN where the reward does not apply or failed (masked out downstream)."""
        out = []
        for p, c, r in zip(self.prompts, self.texts, self.records):
            try:
                out.append(float(reward(p, c, r)))
            except LmstackError:
                raise
            except Exception:  # a broken judge on one sample must not poison the batch: NaN masks it out
                out.append(float("nan"))
        return torch.tensor(out, dtype=torch.float32)

    def mean_length(self) -> float:
        return sum(map(len, self.completion_ids)) / max(1, len(self))


def stop_ids(tok, template: str = "auto") -> list[int]:
    """Token ids that end a reply: the chat template's end-of-turn token in chat form, eos otherwise."""

    if _use_chat(tok, template) and tok.end_of_turn_ids():
        return tok.end_of_turn_ids()
    return [tok.eos_id] if tok.eos_id is not None else []


@torch.no_grad()
def sample(policy: torch.nn.Module, tok, records: Sequence[dict], n: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_k: int = 0, seed: int = 0, template: str = "auto",
           max_num_seqs: int = 64) -> Rollout:
    """Sample n completions for each record's prompt with the engine (temperature 0 = greedy, then n must be 1).

    The policy's training mode is restored afterwards. Prompts that leave no room for a reply in
    max_seq_len are refused with their index (truncating them would change the question)."""

    if n < 1 or max_new_tokens < 1:
        raise LmstackError(f"n and max_new_tokens must be >= 1, got {n} and {max_new_tokens}")
    if temperature == 0 and n > 1:
        raise LmstackError("greedy sampling (temperature=0) gives n identical samples; use n=1 or temperature > 0")
    if not records:
        raise LmstackError("no prompts to roll out")
    prompts = [prompt_text(r) for r in records]
    ids = [encode_prompt(tok, p, template) for p in prompts]
    limit = policy.config.max_seq_len
    params = []
    for i, p in enumerate(ids):
        room = limit - len(p)
        if room < 1:
            raise LmstackError(f"prompt {i} ({len(p)} tokens) leaves no room for a reply in max_seq_len={limit}")
        params.append(SamplingParams(n=n, temperature=temperature, top_k=top_k, max_tokens=min(max_new_tokens, room),
                                     stop_token_ids=stop_ids(tok, template), skip_special_tokens=True))
    was_training = policy.training
    p0 = next(policy.parameters())
    try:
        llm = LLM(policy, tokenizer=tok, max_num_seqs=min(max_num_seqs, len(ids) * n), dtype=p0.dtype,
                  device=str(p0.device), seed=seed, max_batched_tokens=max(2048, limit))
        outs = llm.generate(ids, params)
    finally:
        policy.train(was_training)
    ro = Rollout([], [], [], [], [], [], n)
    for record, prompt, pid, out in zip(records, prompts, ids, outs):
        if len(out.outputs) != n:
            raise LmstackError(f"the engine returned {len(out.outputs)} samples for a prompt, expected {n}")
        for c in sorted(out.outputs, key=lambda c: c.index):
            ro.records.append(record)
            ro.prompts.append(prompt)
            ro.prompt_ids.append(pid)
            ro.completion_ids.append(list(c.token_ids))
            ro.texts.append(c.text)
            ro.finished.append(c.finish_reason == "stop")
    return ro


def to_batch(ro: Rollout, tok, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The rollout as a right-padded batch (input_ids, attention_mask, completion_mask; see logprobs.collate).
    Samples never exceed max_seq_len (sample() sized max_tokens to fit), so nothing is truncated."""
    return collate(list(zip(ro.prompt_ids, ro.completion_ids)), tok.pad_id, None, device)


def mean_stderr(values: torch.Tensor) -> tuple[float, float, int]:
    """Mean, standard error and count of the finite entries (NaN = not applicable)."""
    v = values[torch.isfinite(values)].double()
    n = int(v.numel())
    if n == 0:
        return float("nan"), float("nan"), 0
    sd = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), sd / math.sqrt(n), n


def evaluate_policy(policy: torch.nn.Module, tok, records: Sequence[dict], reward: Callable[[str, str, dict], float],
                    max_new_tokens: int = 128, template: str = "auto") -> dict[str, float]:
    """Greedy replies to every record, scored by `reward`: {"mean", "stderr", "n", "mean_length"}.
    With a 0/1 verifier the mean is accuracy."""
    ro = sample(policy, tok, records, n=1, max_new_tokens=max_new_tokens, temperature=0.0, template=template)
    mean, se, n = mean_stderr(ro.score(reward))
    return {"mean": mean, "stderr": se, "n": n, "mean_length": ro.mean_length()}
