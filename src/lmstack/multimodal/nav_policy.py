"""A vision-language navigation policy (issue 25 §2 navigation, XII.13): picture + instruction + past actions ->
the next action; behaviour cloning on gold paths, then GRPO on success.

The policy: a ViT (vit.py) reads the egocentric observation (nav_world.py: one patch per cell); its tokens pass a
linear map into the policy's width and sit between the instruction's token embeddings (a BPE tokenizer trained on
the training instructions) and the last `history` actions (one embedding per action, "none" before the start); a
learned query token goes last. The ONE lmstack Transformer (ModelConfig(causal=False, head="none")) reads the whole
sequence bidirectionally, with learned slot positions and a segment embedding per part; the query's output -> 4
action logits. mask_instruction=True (the instruction-blind baseline) hides every instruction key from attention.

Training:
- behaviour_clone: teacher forcing on every (observation, history, gold action) step of the training episodes;
  the observations are rendered on the fly from the gold path (nav_world.NavEnv.view), cross-entropy on the action.
- grpo: per update, `episodes` training episodes x `group_size` rollouts sampled from the policy (temperature 1);
  reward = success x (1 - step_cost x actions taken): the small efficiency term rides on success only, since a
  cost on every rollout pays a failing one for stopping early (a first version did that, and learned to give up);
  advantages normalised within each episode's group (align.rl_math.group_advantages); loss = -A x mean over the
  rollout's steps of log pi(a_t | s_t) + kl_coef x mean k3 KL to the frozen BC policy (rl_math.kl_k3). One gradient
  step per batch of rollouts (on-policy, so the PPO ratio is 1 and clipping would never act).
- rollout / evaluate: batched episodes in NavEnv, greedy (argmax), sampled, or uniformly random actions; success
  rate and SPL (success x gold / max(gold, taken)) with n and stderr.

Files: save_policy writes config.json ({"model_type": "lmstack_nav_policy", "policy": {...}}, last),
model.safetensors and tokenizer.json; load_policy reads them back and refuses a mismatch by name.

Usage:
    from lmstack.multimodal.nav_policy import (NavPolicy, NavPolicyConfig, BCConfig, GRPOConfig, nav_tokenizer,
        behaviour_clone, grpo, evaluate, save_policy, load_policy)
    tok = nav_tokenizer(train_records)
    policy = NavPolicy(NavPolicyConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id))
    behaviour_clone(policy, tok, train_records, BCConfig(steps=1000))
    grpo(policy, tok, train_records, GRPOConfig(updates=40))
    evaluate(policy, tok, test_records)        # {"success", "success_stderr", "spl", "spl_stderr", "n", ...}
    save_policy(policy, tok, "runs/nav"); policy, tok = load_policy("runs/nav")
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from lmstack.align.rl_math import group_advantages, kl_k3
from lmstack.config import atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.load_guard import load_state_checked
from lmstack.multimodal.nav_world import ACTIONS, NavEnv, window_side
from lmstack.multimodal.vit import ViT, VisionConfig
from lmstack.runtime.validation import need
from lmstack.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

MODEL_TYPE = "lmstack_nav_policy"
NO_ACTION = len(ACTIONS)  # the history slot before the first action


def _vision() -> VisionConfig:
    return VisionConfig(image_size=90, patch_size=10, d_model=64, n_layers=1, n_heads=4)


@dataclass
class NavPolicyConfig:
    vision: VisionConfig = field(default_factory=_vision)
    """The ViT over the observation (patch_size = the world's cell: one patch per cell)."""
    vocab_size: int = 384
    """The instruction tokenizer's vocabulary size."""
    pad_id: int = 0
    """The tokenizer's padding id (never attended to)."""
    d_model: int = 64
    """Width of the policy Transformer."""
    n_layers: int = 2
    """Blocks of the policy Transformer."""
    n_heads: int = 4
    """Attention heads of the policy Transformer."""
    max_instr: int = 48
    """Instruction slots in tokens (a batch uses as many as its longest instruction); a longer one is refused."""
    history: int = 6
    """How many past actions the policy sees."""
    mask_instruction: bool = False
    """Hide the instruction from attention (the instruction-blind baseline)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_instr", "history"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(0 <= self.pad_id < self.vocab_size, f"pad_id={self.pad_id} must be in 0..{self.vocab_size - 1}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    @property
    def seq_len(self) -> int:
        return self.max_instr + 1 + self.vision.n_patches + self.history + 1

    @classmethod
    def from_dict(cls, data: dict) -> "NavPolicyConfig":
        return from_dict(cls, data)


class NavPolicy(nn.Module):
    def __init__(self, cfg: NavPolicyConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.vision = ViT(cfg.vision)
        self.proj = nn.Linear(cfg.vision.d_model, d)
        self.core = Transformer(ModelConfig(vocab_size=cfg.vocab_size, d_model=d, n_layers=cfg.n_layers,
                                            n_heads=cfg.n_heads, max_seq_len=cfg.seq_len, position="none",
                                            causal=False, head="none", norm="layernorm", mlp="gelu"))
        self.act_emb = nn.Embedding(len(ACTIONS) + 1, d)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, d) * 0.02)
        self.segment = nn.Parameter(torch.randn(4, d) * 0.02)  # instruction, image, history, query
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.out = nn.Linear(d, len(ACTIONS))
        n_img = 1 + cfg.vision.n_patches
        self.register_buffer("segment_ids", torch.tensor([0] * cfg.max_instr + [1] * n_img + [2] * cfg.history + [3]),
                             persistent=False)

    def forward(self, pixels: torch.Tensor, instr: torch.Tensor, instr_mask: torch.Tensor,
                history: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) in [-1, 1], instr (B, L <= max_instr) ids, instr_mask (B, L) 1 = real token,
        history (B, history) action ids (NO_ACTION = none) -> action logits (B, 4)."""
        cfg = self.config
        b, n = pixels.shape[0], instr.shape[-1]
        if (instr.dim() != 2 or instr.shape[0] != b or n > cfg.max_instr or instr_mask.shape != instr.shape
                or history.shape != (b, cfg.history)):
            raise LmstackError(f"instr and instr_mask must be ({b}, L <= {cfg.max_instr}) and history ({b}, "
                               f"{cfg.history}); got {tuple(instr.shape)}, {tuple(instr_mask.shape)}, "
                               f"{tuple(history.shape)}")
        x = torch.cat([self.proj(self.vision(pixels)), self.act_emb(history), self.query.expand(b, 1, -1)], dim=1)
        x = x + self.pos[cfg.max_instr:] + self.segment[self.segment_ids[cfg.max_instr:]]
        if cfg.mask_instruction:
            # every instruction key hidden: the rest of the sequence computes exactly what it would with the
            # masked slots present, so they are left out (the instruction-blind baseline costs less, nothing else)
            return self.out(self.core(inputs_embeds=x)[:, -1])
        # columns past the batch's last real token are left out: they are masked keys, so nothing else changes
        used = instr_mask.bool().any(0).nonzero()
        n = int(used.max()) + 1 if used.numel() else 0
        instr, instr_mask = instr[:, :n], instr_mask[:, :n]
        words = self.core.tok_emb(instr) + self.pos[:n] + self.segment[0]
        keys = torch.cat([instr_mask.bool(), torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
        return self.out(self.core(inputs_embeds=torch.cat([words, x], dim=1), attention_mask=keys)[:, -1])


# ---- inputs
def nav_tokenizer(records: list[dict], vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE trained on the TRAINING split's instructions only (held-out phrasings stay unseen)."""
    texts = [r["instruction"] for r in records if r.get("split", "train") == "train"]
    if not texts:
        raise LmstackError("nav_tokenizer needs training records (split 'train') with instructions")
    return train_tokenizer(type="bpe", vocab_size=vocab_size, texts=texts, show_progress=False)


def encode_instructions(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, max_len), right-padded with the tokenizer's pad id; too long an instruction is refused."""
    pad = tok.pad_id if tok.pad_id is not None else 0
    ids = torch.full((len(texts), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for i, text in enumerate(texts):
        row = tok.encode(text)
        if len(row) > max_len:
            raise LmstackError(f"instruction of {len(row)} tokens is longer than max_instr={max_len}: {text!r}")
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def to_pixels(obs: list[np.ndarray]) -> torch.Tensor:
    """uint8 (S, S, 3) observations -> (N, 3, S, S) float32 in [-1, 1] (images.to_pixels' scale)."""
    return torch.from_numpy(np.stack(obs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def history_ids(actions: list[int], n: int) -> list[int]:
    """The last n actions, left-filled with NO_ACTION."""
    last = list(actions[-n:]) if n else []
    return [NO_ACTION] * (n - len(last)) + last


def _check_fit(policy: NavPolicy, records: list[dict]) -> None:
    size = policy.config.vision.image_size
    for r in records[:1]:
        if window_side(r["grid"], r["cell"]) != size:
            raise LmstackError(f"the world's pictures are {window_side(r['grid'], r['cell'])}px but the policy's ViT "
                               f"takes {size}px (set vision.image_size = (2 grid - 1) x cell, patch_size = cell)")


# ---- behaviour cloning
@dataclass
class BCConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """(observation, action) pairs per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup: int = 50
    """Warmup steps."""
    seed: int = 0
    """Batch order seed."""


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def gold_batch(policy: NavPolicy, envs: list[NavEnv], instr, pairs: list[tuple[int, int]]):
    """Teacher-forcing inputs for (episode, step) pairs: the observation after the gold prefix, the history, the
    gold action; instr = encode_instructions' (ids, mask) for the episodes."""
    obs, hist, target, rows = [], [], [], []
    for e, t in pairs:
        env = envs[e]
        gold = env.record["gold_actions"]
        states = env.gold_states
        row, col, heading = states[t]
        obs.append(env.view(row, col, heading, {s[:2] for s in states[:t + 1]}))
        hist.append(history_ids(gold[:t], policy.config.history))
        target.append(gold[t])
        rows.append(e)
    rows_t = torch.tensor(rows)
    return to_pixels(obs), instr[0][rows_t], instr[1][rows_t], torch.tensor(hist), torch.tensor(target)


def behaviour_clone(policy: NavPolicy, tok: Tokenizer, records: list[dict], cfg: BCConfig | None = None,
                    log_every: int = 0) -> dict:
    """Teacher-forced cross-entropy on every gold step of `records`; returns {"losses", "seconds", "pairs"}."""
    cfg = cfg or BCConfig()
    if not records:
        raise LmstackError("behaviour_clone needs at least one episode")
    _check_fit(policy, records)
    envs = [NavEnv(r) for r in records]
    instr = encode_instructions(tok, [r["instruction"] for r in records], policy.config.max_instr)
    pairs = [(e, t) for e, env in enumerate(envs) for t in range(len(env.record["gold_actions"]))]
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    policy.train()
    losses, order, start = [], [], time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(pairs, len(pairs))
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        pixels, ids, mask, hist, target = gold_batch(policy, envs, instr, batch)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.steps, cfg.lr, cfg.warmup)
        loss = F.cross_entropy(policy(pixels, ids, mask, hist), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"bc step {step + 1}/{cfg.steps}: loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    policy.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "pairs": len(pairs)}


# ---- rollouts and metrics
@torch.no_grad()
def rollout(policy: NavPolicy | None, tok: Tokenizer | None, records: list[dict], mode: str = "greedy",
            temperature: float = 1.0, seed: int = 0, keep: bool = False) -> list[dict]:
    """Run every episode to its end in NavEnv, all episodes batched per step. mode: greedy (argmax), sample
    (softmax at `temperature`) or random (uniform actions; policy and tok may be None). keep=True also returns
    each step's observation and history, for a gradient pass (grpo)."""
    if mode not in ("greedy", "sample", "random"):
        raise LmstackError(f"unknown rollout mode {mode!r}; allowed: greedy, sample, random")
    gen = torch.Generator().manual_seed(seed)
    envs = [NavEnv(r) for r in records]
    obs = [env.reset() for env in envs]
    kept = [{"obs": [], "hist": []} for _ in envs]
    if mode != "random":
        _check_fit(policy, records)
        policy.eval()
        instr = encode_instructions(tok, [r["instruction"] for r in records], policy.config.max_instr)
    n_hist = policy.config.history if policy is not None else 0
    active = list(range(len(envs)))
    while active:
        if mode == "random":
            actions = torch.randint(len(ACTIONS), (len(active),), generator=gen).tolist()
        else:
            idx = torch.tensor(active)
            hist = [history_ids(envs[i].actions, n_hist) for i in active]
            logits = policy(to_pixels([obs[i] for i in active]), instr[0][idx], instr[1][idx], torch.tensor(hist))
            if mode == "greedy":
                actions = logits.argmax(-1).tolist()
            else:
                probs = torch.softmax(logits / max(temperature, 1e-6), -1)
                actions = torch.multinomial(probs, 1, generator=gen).squeeze(-1).tolist()
            if keep:
                for i, h in zip(active, hist):
                    kept[i]["obs"].append(obs[i])
                    kept[i]["hist"].append(h)
        for i, a in zip(active, actions):
            obs[i], _, _ = envs[i].step(a)
        active = [i for i in active if not envs[i].done]
    out = []
    for env, k in zip(envs, kept):
        res = {"id": env.record["id"], "success": bool(env.success), "spl": env.spl, "steps": len(env.actions),
               "gold_len": env.record["gold_len"], "actions": list(env.actions)}
        out.append(dict(res, **k) if keep else res)
    return out


def metrics(results: list[dict]) -> dict:
    """Success rate and SPL with n and stderr (binomial for success, sample std / sqrt(n) for SPL)."""
    n = len(results)
    if n == 0:
        raise LmstackError("no episodes to score")
    s = np.array([r["success"] for r in results], dtype=float)
    spl = np.array([r["spl"] for r in results], dtype=float)
    return {"success": float(s.mean()), "success_stderr": float(math.sqrt(s.mean() * (1 - s.mean()) / n)),
            "spl": float(spl.mean()), "spl_stderr": float(spl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "n": n, "mean_steps": float(np.mean([r["steps"] for r in results]))}


def evaluate(policy: NavPolicy | None, tok: Tokenizer | None, records: list[dict], mode: str = "greedy",
             seed: int = 0) -> dict:
    """metrics() of one rollout of each episode."""
    return metrics(rollout(policy, tok, records, mode=mode, seed=seed))


# ---- GRPO
@dataclass
class GRPOConfig:
    updates: int = 40
    """Policy updates (one gradient step per batch of rollouts)."""
    episodes: int = 4
    """Training episodes per update."""
    group_size: int = 8
    """Rollouts per episode (the group whose rewards are normalised)."""
    lr: float = 2e-4
    """AdamW learning rate (constant)."""
    kl_coef: float = 0.05
    """Weight of the k3 KL to the frozen BC policy."""
    step_cost: float = 0.01
    """Reward = success x (1 - step_cost x actions taken); a failure scores 0 however long it took."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    seed: int = 0
    """Episode choice and sampling seed."""

    def __post_init__(self) -> None:
        need(self.updates >= 0, f"updates must be >= 0, got {self.updates}")
        need(self.episodes >= 1 and self.group_size >= 2,
             f"episodes must be >= 1 and group_size >= 2 (a group needs a baseline), got {self.episodes}, "
             f"{self.group_size}")


def grpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, rows: torch.Tensor,
              kl_coef: float) -> torch.Tensor:
    """GRPO's loss over flattened steps: logp / ref_logp (S,) of the taken actions, rows (S,) each step's rollout,
    adv (R,) per rollout. Each rollout's steps are averaged, then the rollouts: mean_r [mean_t (-A_r log pi +
    kl_coef k3)]. On-policy with one step per batch the PPO ratio is 1, so -A log pi has the clipped loss' gradient."""
    n = adv.shape[0]
    steps = torch.bincount(rows, minlength=n).to(logp.dtype)
    per_step = (-adv[rows] * logp + kl_coef * kl_k3(logp, ref_logp)) / steps[rows]
    return per_step.sum() / n


def grpo(policy: NavPolicy, tok: Tokenizer, records: list[dict], cfg: GRPOConfig | None = None,
         log_every: int = 0) -> dict:
    """GRPO on success from the current (BC) policy, KL-tied to a frozen copy of it; returns per-update stats."""
    cfg = cfg or GRPOConfig()
    _check_fit(policy, records)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    stats, start = [], time.perf_counter()
    for update in range(cfg.updates):
        chosen = rng.sample(records, min(cfg.episodes, len(records)))
        group = [r for r in chosen for _ in range(cfg.group_size)]
        runs = rollout(policy, tok, group, mode="sample", temperature=cfg.temperature,
                       seed=cfg.seed * 100003 + update, keep=True)
        rewards = torch.tensor([float(r["success"]) * (1.0 - cfg.step_cost * r["steps"]) for r in runs])
        adv, _ = group_advantages(rewards, cfg.group_size)
        instr = encode_instructions(tok, [r["instruction"] for r in group], policy.config.max_instr)
        rows = torch.tensor([i for i, r in enumerate(runs) for _ in r["actions"]])
        pixels = to_pixels([o for r in runs for o in r["obs"]])
        hist = torch.tensor([h for r in runs for h in r["hist"]])
        taken = torch.tensor([a for r in runs for a in r["actions"]])
        inputs = (pixels, instr[0][rows], instr[1][rows], hist)
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref(*inputs), -1).gather(-1, taken[:, None]).squeeze(-1)
        policy.train()
        logp = torch.log_softmax(policy(*inputs), -1).gather(-1, taken[:, None]).squeeze(-1)
        loss = grpo_loss(logp, ref_logp, adv, rows, cfg.kl_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        policy.eval()
        stats.append({"update": update, "loss": float(loss.detach()),
                      "success": float(np.mean([r["success"] for r in runs])),
                      "reward": float(rewards.mean()), "kl": float(kl_k3(logp.detach(), ref_logp).mean()),
                      "steps": int(len(taken))})
        if log_every and (update + 1) % log_every == 0:
            recent = stats[-log_every:]
            print(f"grpo update {update + 1}/{cfg.updates}: sampled success "
                  f"{np.mean([s['success'] for s in recent]):.3f}, kl {recent[-1]['kl']:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"stats": stats, "seconds": time.perf_counter() - start, "updates": cfg.updates}


# ---- files
def save_policy(policy: NavPolicy, tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write model.safetensors, tokenizer.json and config.json (last, so a directory with it is whole)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmstackError(f"cannot save a navigation policy to {path}: it is a file, not a directory")
    if tok.vocab_size != policy.config.vocab_size:
        raise LmstackError(f"the tokenizer has {tok.vocab_size} tokens but the policy's vocab_size is "
                           f"{policy.config.vocab_size}")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in policy.state_dict().items()}
    atomic_write_bytes(path / "model.safetensors", save(state, metadata={"format": "pt"}))
    tok.save(path)
    config = {"model_type": MODEL_TYPE, "policy": to_dict(policy.config)}
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    return path


def load_policy(path: str | os.PathLike) -> tuple[NavPolicy, Tokenizer]:
    """(policy in eval mode, tokenizer) from a save_policy directory; a wrong or damaged directory is named."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise LmstackError(f"{path} has no config.json, so it is not a navigation policy (save one with save_policy)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE or "policy" not in data:
        raise LmstackError(f"{file} is not a navigation policy config (model_type must be {MODEL_TYPE!r})")
    policy = NavPolicy(NavPolicyConfig.from_dict(data["policy"]))
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own types for a missing, truncated or corrupt file
        raise LmstackError(f"{path / 'model.safetensors'} cannot be read ({type(e).__name__}: {e})") from None
    load_state_checked(policy, state, str(path / "model.safetensors"))
    return policy.eval(), load_tokenizer(path)


__all__ = ["NavPolicyConfig", "NavPolicy", "BCConfig", "GRPOConfig", "nav_tokenizer", "encode_instructions",
           "to_pixels", "history_ids", "gold_batch", "behaviour_clone", "rollout", "metrics", "evaluate", "grpo",
           "grpo_loss", "save_policy", "load_policy", "NO_ACTION", "MODEL_TYPE"]
