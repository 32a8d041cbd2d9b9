"""Reward model: the LM's hidden state at the last real token, through a scalar head, trained Bradley-Terry.

    r(x, y) = w · h_last(x ⊕ y) + b
    loss    = -log σ(r(x, y_c) - r(x, y_r) - m) + c · mean((r_c + r_r)²)      (losses.bradley_terry_loss)

The last real token of a chat-rendered pair is the template's end of turn (`<|assistant_end|>` in ours), whose hidden state has read
the whole prompt and reply. The LM's own head is kept (unused) so the backbone directory stays a
loadable language model. Held-out pairwise accuracy (how often r_c > r_r) is the metric.

On disk a reward model is a model directory (HF layout, with the tokenizer) plus
`reward_head.safetensors` and `reward_model.json` (pooling, template, format version).

Usage:
    from lmstack.align.reward_model import RewardModel, train_reward_model, pairwise_accuracy, load_reward_model
    rm = RewardModel(lmstack.load_model("runs/sft/model", lazy=False))
    cfg = AlignConfig(method="rm", optim={"lr": 1e-4}, train={"steps": 300})
    summary = train_reward_model(rm, tok, train_pairs, val_pairs, cfg)
    pairwise_accuracy(rm, tok, test_pairs)["accuracy"]
    rm.save("runs/rm", tok); rm, tok = load_reward_model("runs/rm")
    scorer = RewardModelScorer(rm, tok); scorer("prompt", "reply")     # a Reward for mixtures and RL
"""
from __future__ import annotations

from collections import defaultdict
import json
from pathlib import Path
import time
from typing import Any, Callable, Sequence

from safetensors.torch import save_file
import torch
from torch import nn

from lmstack.align.config import AlignConfig
from lmstack.align.logprobs import collate, encode_pair, last_token_index
from lmstack.align.losses import bradley_terry_loss
from lmstack.align.preference_data import Pair
from lmstack.align.rewards.base import Reward
from lmstack.align.steps import Stepper, batches, chunks
from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.load_guard import load_safetensors, read_json, resolve_inside
from lmstack.progress import BudgetBar
from lmstack.tokenizer import load_tokenizer
from lmstack.train.metrics import MetricsLogger

FORMAT = "lmstack-reward-model/1"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, seed: int = 0):
        super().__init__()
        cfg = getattr(backbone, "config", None)
        if cfg is None or not getattr(cfg, "causal", True):
            raise LmstackError("a reward model needs a causal lmstack Transformer as its backbone")
        self.backbone = backbone
        device = next(backbone.parameters()).device
        self.score = nn.Linear(cfg.d_model, 1, device=device)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # small init: rewards start near 0, so early gradients are balanced
            self.score.weight.copy_(torch.randn(1, cfg.d_model, generator=g) / cfg.d_model)
            self.score.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B,) rewards read at each row's last real token."""
        hidden = self.backbone(input_ids, return_hidden=True)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.score(last.float()).squeeze(-1)

    @torch.no_grad()
    def rewards(self, tok, prompts: Sequence[str], completions: Sequence[str], template: str = "auto",
                max_len: int | None = None, batch_size: int = 32) -> torch.Tensor:
        """(N,) rewards of texts, in batches, in eval mode."""
        was = self.training
        self.eval()
        device = self.score.weight.device
        max_len = max_len or self.backbone.config.max_seq_len
        out = []
        rows = [encode_pair(tok, p, c, template) for p, c in zip(prompts, completions)]
        for part in chunks(rows, batch_size):
            b = collate(part, tok.pad_id, max_len, device)
            out.append(self(b["input_ids"], b["attention_mask"]).cpu())
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def save(self, path: str | Path, tokenizer=None, template: str = "auto") -> Path:
        path = Path(path)
        save_model(self.backbone, path, tokenizer=tokenizer)
        tmp = path / ".reward_head.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.score.state_dict().items()}, str(tmp))
        tmp.replace(path / "reward_head.safetensors")
        atomic_write_text(path / "reward_model.json", json.dumps(
            {"format": FORMAT, "pooling": "last_token", "template": template}, indent=2) + "\n")
        return path


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(RewardModel, tokenizer) from a directory written by RewardModel.save."""

    path = Path(path)
    # an untrusted directory: both side files must stay inside it (issue 15)
    meta_file = resolve_inside(path, "reward_model.json", "reward model config")
    head_file = resolve_inside(path, "reward_head.safetensors", "reward head")
    if not meta_file.is_file() or not head_file.is_file():
        raise LmstackError(f"{path} is not a reward model directory (needs reward_model.json and "
                           "reward_head.safetensors next to the model files)")
    meta = read_json(path, "reward_model.json", "reward model config", want_object=True)
    if meta.get("format") != FORMAT:
        raise LmstackError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    rm = RewardModel(load_model(path, lazy=False, device=device))
    head = load_safetensors(path, "reward_head.safetensors", "reward head")
    try:
        rm.score.load_state_dict({k: v.to(device) for k, v in head.items()})
    except RuntimeError as e:
        raise LmstackError(f"{head_file} does not fit the backbone: {e}") from None
    return rm, load_tokenizer(path)


# ---- training ---------------------------------------------------------------------------------------
def _pair_batch(tok, pairs: Sequence[Pair], cfg: AlignConfig, device, cache: dict) -> dict[str, torch.Tensor]:
    rows = []
    for which in ("chosen", "rejected"):
        for p in pairs:
            key = (p.prompt, getattr(p, which))
            if key not in cache:
                cache[key] = encode_pair(tok, *key, cfg.template)
            rows.append(cache[key])
    return collate(rows, tok.pad_id, cfg.max_len, device)


def _rm_loss(rm: RewardModel, tok, pairs: Sequence[Pair], cfg: AlignConfig, device, cache) -> dict:
    b = _pair_batch(tok, pairs, cfg, device, cache)
    r = rm(b["input_ids"], b["attention_mask"])
    n = len(pairs)
    margin = torch.tensor([float(p.meta.get("margin", cfg.margin)) for p in pairs], device=device)
    weights = torch.tensor([p.confidence for p in pairs], device=device) if cfg.confidence_as == "weight" else None
    return bradley_terry_loss(r[:n], r[n:], margin, cfg.center_coef, weights)


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, tok, pairs: Sequence[Pair], template: str = "auto",
                      max_len: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Share of pairs with r(chosen) > r(rejected) (ties count as wrong), overall and per `kind` in meta."""
    if not pairs:
        raise LmstackError("pairwise_accuracy needs at least one pair")
    rc = rm.rewards(tok, [p.prompt for p in pairs], [p.chosen for p in pairs], template, max_len, batch_size)
    rr = rm.rewards(tok, [p.prompt for p in pairs], [p.rejected for p in pairs], template, max_len, batch_size)
    right = (rc > rr).float()
    out = {"accuracy": float(right.mean()), "margin": float((rc - rr).mean()),
           "reward_mean": float(torch.cat([rc, rr]).mean()), "n_pairs": len(pairs)}
    kinds: dict[str, list[float]] = defaultdict(list)
    for p, ok in zip(pairs, right.tolist()):
        if "kind" in p.meta:
            kinds[str(p.meta["kind"])].append(ok)
    out.update({f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(kinds.items())})
    return out


def train_reward_model(rm: RewardModel, tok, train: Sequence[Pair], val: Sequence[Pair], cfg: AlignConfig,
                       out_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bradley-Terry training for cfg.train.steps steps; returns the summary (held-out accuracy before and after)."""

    if cfg.method != "rm":
        raise LmstackError(f"train_reward_model needs method='rm', got {cfg.method!r}")
    device = rm.score.weight.device
    stepper = Stepper.from_config(rm, cfg)
    metrics = MetricsLogger(out_dir, log=cfg.log, model=rm) if out_dir else None
    cache: dict = {}
    evaluate = (lambda: pairwise_accuracy(rm, tok, val, cfg.template, cfg.max_len)) if val else (lambda: {})
    before = evaluate()
    history, bar, start = [], None, time.perf_counter()
    if cfg.train.progress:  # total and ETA follow whichever of steps / max_seconds ends the run

        bar = BudgetBar(cfg.train.steps, max_seconds=cfg.train.max_seconds, desc="rm")
    rm.train()
    done = 0
    for step, pairs in zip(range(cfg.train.steps), batches(train, cfg.batch_size, cfg.train.seed)):
        if cfg.train.max_seconds and time.perf_counter() - start > cfg.train.max_seconds:
            log(f"rm: time budget of {cfg.train.max_seconds:.0f} s reached after {step} steps")
            break
        done = step + 1
        out = _rm_loss(rm, tok, pairs, cfg, device, cache)
        stats = stepper.step(out["loss"], step)
        row = {"loss": float(out["loss"].detach()), "accuracy": float(out["accuracy"]),
               "margin": float(out["margins"].mean()), **stats}
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            history.append({"step": step + 1, **row})
            if metrics:
                metrics.log(step + 1, row)
        every = cfg.train.eval_every
        if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps and val:
            ev = {f"val_{k}": v for k, v in evaluate().items()}
            rm.train()
            if metrics:
                metrics.log(step + 1, ev)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
    if bar is not None:
        bar.close()
    after = evaluate()
    if metrics:
        metrics.log(done, {f"val_{k}": v for k, v in after.items()})
        metrics.close()
    summary = {"method": "rm", "steps": done, "train_seconds": time.perf_counter() - start,
               "train_pairs": len(train), "val_pairs": len(val), "val_before": before, "val_after": after,
               "history": history}
    if val:
        log(f"reward model: held-out pairwise accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
            f"on {len(val)} pairs")
    return summary


class RewardModelScorer(Reward):
    """A trained reward model as a Reward (for mixtures, best-of-n and RL). Scores one text at a time;
    use RewardModel.rewards for batches."""

    name = "reward_model"

    def __init__(self, rm: RewardModel, tokenizer, template: str = "auto"):
        self.rm, self.tok, self.template = rm, tokenizer, template

    def score(self, prompt: str, completion: str, record: dict) -> float:
        return float(self.rm.rewards(self.tok, [prompt], [completion], self.template)[0])
