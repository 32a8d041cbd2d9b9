"""Log-probabilities of completions given prompts: the quantity every alignment method is built on.

DPO compares log π(chosen|x) with log π(rejected|x), PPO and GRPO take ratios of per-token
log-probs, KL penalties subtract the reference's. So one place turns (prompt, completion) texts into
padded id batches and a model into per-token and per-sequence log-probs, and everyone uses it.

Layout of a batch (right padding, so under causal attention no real token ever sees a pad):
    input_ids        (B, T)  prompt ids, then completion ids, then pad
    attention_mask   (B, T)  1 on real tokens
    completion_mask  (B, T)  1 on completion tokens: the positions whose log-prob counts
Position t of the model predicts token t + 1, so per-token log-probs have shape (B, T - 1) and
`logps[:, t]` is log p(input_ids[:, t + 1] | input_ids[:, :t + 1]).

Prompts are rendered with the tokenizer's chat template when it has one (user turn, then the
assistant's reply up to and including the template's end-of-turn token), else as plain "prompt\\n" + completion + eos.
A prompt may also be a Conversation (lmstack.data.trl_formats: TRL's conversational preference rows); it is
rendered as its own turns, and needs the chat template.

A policy and a reference with different tokenizers would give log-probs of different token
sequences, so their ratio means nothing: `check_same_tokenizer` refuses such a pair, naming both.

Usage:
    from lmstack.align.logprobs import encode_pair, collate, token_logprobs, sequence_logprobs
    rows = [encode_pair(tok, "2 + 2?", "4"), encode_pair(tok, "Hi", "Hello!")]
    batch = collate(rows, pad_id=tok.pad_id)
    per_token = token_logprobs(model, batch)          # (B, T-1), zero off the completion
    per_seq = sequence_logprobs(model, batch)         # (B,) sums; average=True for per-token means
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from lmstack.data.trl_formats import Conversation, to_messages
from lmstack.errors import LmstackError
from lmstack.train.objectives.base import scored_logits, unwrap

Template = Literal["auto", "chat", "plain"]


def has_chat_template(tok) -> bool:
    """The tokenizer has a chat template: lmstack's own or the model's Jinja one (tok.chat_template)."""
    return tok.chat_template is not None


def _prompt_messages(prompt: str | Conversation) -> list[dict]:
    """A text prompt is one user turn; a Conversation (TRL's conversational rows) is its own messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_messages(prompt)


def encode_prompt(tok, prompt: str | Conversation, template: Template = "auto") -> list[int]:
    """The ids a model is given before it writes its reply (ends with <|assistant_start|> in chat form)."""
    if _use_chat(tok, template):
        return tok.apply_chat_template(_prompt_messages(prompt), add_generation_prompt=True)[0]
    if not isinstance(prompt, str):
        raise LmstackError("a conversational prompt (a message list) needs a chat template; this tokenizer has "
                           "none, or template='plain' was asked for")
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return bos + tok.encode(prompt + "\n", allow_special=False)


def encode_pair(tok, prompt: str | Conversation, completion: str,
                template: Template = "auto") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids); the completion ends with the token that closes the reply."""
    if not isinstance(prompt, (str, tuple)) or not isinstance(completion, str):
        raise LmstackError(f"prompt and completion must be strings (the prompt may be a Conversation), got "
                           f"{type(prompt).__name__} and {type(completion).__name__}")
    prompt_ids = encode_prompt(tok, prompt, template)
    if _use_chat(tok, template):
        full = tok.apply_chat_template(_prompt_messages(prompt) + [{"role": "assistant", "content": completion}])[0]
        # A template that is a concatenation of turns makes the prompt's ids a prefix of the full ids.
        if full[:len(prompt_ids)] != prompt_ids:
            origin = getattr(tok.chat_template, "origin", "the chat template")
            raise LmstackError(f"{origin}: the prompt's ids are not a prefix of the prompt + reply ids, so the "
                               "reply cannot be cut out; use template='plain'")
        return prompt_ids, full[len(prompt_ids):]
    end = [tok.eos_id] if tok.eos_id is not None else []
    return prompt_ids, tok.encode(completion, allow_special=False) + end


def _use_chat(tok, template: Template) -> bool:
    if template == "plain":
        return False
    chat = has_chat_template(tok)
    if template == "chat" and not chat:
        raise LmstackError("template='chat' needs a tokenizer with a chat template (lmstack's <|bos|>, "
                           "<|user_start|>/<|assistant_start|>/<|assistant_end|> tokens, or a chat_template in "
                           "tokenizer_config.json / chat_template.jinja); use template='plain' or 'auto'")
    if template not in ("auto", "chat", "plain"):
        raise LmstackError(f"template={template!r} is not allowed; choose 'auto', 'chat' or 'plain'")
    return chat


def truncate(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Fit a pair into max_len tokens: drop the prompt's *start* first (its end leads into the reply),
    then the completion's end. Returns the pieces and whether anything was cut."""
    if len(prompt_ids) + len(completion_ids) <= max_len:
        return prompt_ids, completion_ids, False
    completion_ids = completion_ids[:max_len - 1]  # keep >= 1 prompt token: it predicts the first reply token
    keep = max_len - len(completion_ids)
    return prompt_ids[-keep:], completion_ids, True


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int | None, max_len: int | None = None,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch of (prompt ids, completion ids) rows; see the module docstring for the keys.

    "n_truncated" counts rows cut to max_len."""
    if not rows:
        raise LmstackError("cannot collate an empty batch")
    fitted, cut = [], 0
    for p, c in rows:
        if not p or not c:
            raise LmstackError("every row needs at least one prompt token and one completion token")
        if max_len is not None:
            p, c, was_cut = truncate(p, c, max_len)
            cut += was_cut
        fitted.append((p, c))
    t = max(len(p) + len(c) for p, c in fitted)
    fill = 0 if pad_id is None else pad_id
    input_ids = torch.full((len(rows), t), fill, dtype=torch.long)
    attention = torch.zeros((len(rows), t), dtype=torch.long)
    completion = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (p, c) in enumerate(fitted):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        completion[i, len(p):n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
            "completion_mask": completion.to(device), "n_truncated": torch.tensor(cut)}


def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap(model)


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1) log-prob of each completion token under `model`, 0 elsewhere (differentiable).

    Only completion positions go through the LM head (the d_model x vocab matmul dominates for short
    completions), the same trick as the training objectives' scored_logits. temperature divides the
    logits first, as a sampler with that temperature would (rollout log-probs must match the sampler)."""

    ids, comp = batch["input_ids"], batch["completion_mask"].bool()
    targets = ids[:, 1:]
    scored = torch.zeros_like(comp)
    scored[:, :-1] = comp[:, 1:]  # position t is scored when token t + 1 is a completion token
    logits = scored_logits(model, ids, scored, {}).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets[scored[:, :-1]].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    out = logits.new_zeros(targets.shape)
    out[scored[:, :-1]] = picked
    return out


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """(B,) summed (or, with average=True, per-token mean) log-prob of each row's completion."""
    logps = token_logprobs(model, batch)
    if not average:
        return logps.sum(-1)
    n = batch["completion_mask"][:, 1:].sum(-1).clamp(min=1)
    return logps.sum(-1) / n


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (right padding)."""
    return attention_mask.long().sum(-1).clamp(min=1) - 1


# ---- tokenizer compatibility -------------------------------------------------------------------------
def tokenizer_fingerprint(tok) -> str:
    """A short hash of what decides ids: the vocabulary (token -> id), the special tokens and the type."""
    data = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
            "special": sorted(getattr(tok, "special_tokens", {}).items()), "type": getattr(tok, "type", "")}
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_tokenizer(policy_tok, reference_tok, policy_name: str = "policy",
                         reference_name: str = "reference") -> None:
    """Raise LmstackError when two tokenizers would map text to different ids, naming both and a difference."""
    a, b = tokenizer_fingerprint(policy_tok), tokenizer_fingerprint(reference_tok)
    if a == b:
        return
    va, vb = policy_tok.get_vocab(), reference_tok.get_vocab()
    if len(va) != len(vb):
        detail = f"vocabulary sizes differ ({len(va)} vs {len(vb)})"
    else:
        token = next((t for t in sorted(va) if vb.get(t) != va[t]), None)
        detail = (f"token {token!r} has id {va[token]} vs {vb.get(token)}" if token is not None
                  else "special tokens or tokenizer type differ")
    raise LmstackError(
        f"{policy_name} tokenizer ({getattr(policy_tok, 'source', '?')}, fingerprint {a}) and {reference_name} "
        f"tokenizer ({getattr(reference_tok, 'source', '?')}, fingerprint {b}) differ: {detail}. Log-prob "
        f"ratios between them are meaningless; use the {reference_name} the {policy_name} was trained from")


def check_same_vocab(policy: nn.Module, reference: nn.Module, policy_name: str = "policy",
                     reference_name: str = "reference") -> None:
    """Refuse two models whose embedding tables have different sizes (a cheap check when no tokenizer is at hand)."""
    na = getattr(_unwrap(policy).config, "vocab_size", None)
    nb = getattr(_unwrap(reference).config, "vocab_size", None)
    if na != nb:
        raise LmstackError(f"{policy_name} model has vocab_size={na} but {reference_name} model has vocab_size={nb}; "
                           "they cannot share a tokenizer")


def kl_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(π || π_ref) from full logits (..., V): for tests of the sampled estimators."""
    lp, lq = F.log_softmax(policy_logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
