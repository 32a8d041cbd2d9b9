"""AlignConfig: one run of `lmstack align` (reward model or offline preference optimisation).

Only the methods that are built are allowed values of `method`; the online methods of issue 9
(ppo, grpo, rloo, rft) are refused with the list of what works, never accepted silently.

Usage:
    from lmstack.align.config import AlignConfig
    cfg = AlignConfig(method="dpo", policy="runs/sft/model", data="prefs.jsonl", out="runs/dpo", beta=0.1)
    AlignConfig(method="grpo")      # ConfigError: method='grpo' is not allowed; choose one of 'rm', 'dpo', ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmstack.train.optim.config import check_choices, need

Method = Literal["rm", "dpo", "cdpo", "ipo", "kto"]
METHOD_LOSS = {"dpo": "dpo", "cdpo": "cdpo", "ipo": "ipo"}  # paired methods -> losses.PAIR_LOSSES name


@dataclass
class AlignConfig:
    method: Method = "dpo"
    """rm (Bradley-Terry reward model), dpo (sigmoid), cdpo (DPO + label smoothing), ipo, kto (unpaired)."""
    policy: str = ""
    """Model directory to start from (the SFT checkpoint; must hold tokenizer.json too)."""
    data: str = ""
    """Preference JSONL: prompt, chosen, rejected [, confidence] (kto also takes prompt, completion, label)."""
    out: str = "runs/align"
    """Output directory: the trained model (or reward model), metrics.jsonl, summary.json, config.yaml."""
    val_data: str = ""
    """Held-out preference JSONL for accuracy/margins; empty = hold out val_fraction of `data`."""
    split: str = ""
    """Read only rows whose `split` field equals this (e.g. 'train' for a world file); empty = all rows."""
    val_fraction: float = 0.1
    """Share of `data` held out for evaluation when val_data is empty."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """How prompts are rendered: the tokenizer's chat template (auto when it has one) or plain text."""
    # ---- preference optimisation
    beta: float = 0.1
    """Strength of the KL anchor to the reference (TRL's default 0.1); implicit rewards are β·log-ratios."""
    label_smoothing: float = 0.0
    """cDPO: probability that a pair's label is flipped, in [0, 0.5); cdpo needs it > 0."""
    confidence_as: Literal["weight", "smoothing", "ignore"] = "weight"
    """Per-pair `confidence` c: weight the pair's loss by c, or smooth its label by ε = 1 - c, or ignore it."""
    ipo_average: bool = True
    """IPO on per-token mean log-probs (TRL's choice; keeps 1/(2β) meaningful across lengths)."""
    kto_desirable_weight: float = 1.0
    """KTO λ_D: weight of desirable completions' losses."""
    kto_undesirable_weight: float = 1.0
    """KTO λ_U: weight of undesirable completions' losses."""
    reference: Literal["copy", "precomputed", "adapters"] = "copy"
    """Reference policy: a frozen copy, log-probs precomputed once (no copy kept in memory), or the policy
    itself with its adapters disabled (LoRA training; needs lmstack.adapt.disable_adapters)."""
    reference_path: str = ""
    """A different reference model directory (empty = the policy's starting weights); its tokenizer must match."""
    # ---- reward model
    margin: float = 0.0
    """Bradley-Terry margin m in -log σ(r_c - r_r - m); a row's own `margin` field overrides it."""
    center_coef: float = 0.0
    """Reward centering: adds center_coef · mean((r_c + r_r)²) (TRL suggests 0.01)."""
    # ---- optimisation
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Pairs (or KTO rows) per step."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to 10%."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    max_len: int = 256
    """Longest prompt + completion in tokens; longer rows lose the prompt's start first."""
    eval_every: int = 50
    """Evaluate on the held-out pairs every this many steps (0 = only at the end)."""
    log_every: int = 10
    """Write metrics every this many steps."""
    seed: int = 0
    """Seed for data order, the validation split and head initialisation."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu or cuda."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_choices(self)
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        need(self.method != "cdpo" or self.label_smoothing > 0,
             "method='cdpo' needs label_smoothing in (0, 0.5) (label_smoothing=0 is plain dpo)")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.kto_desirable_weight > 0 and self.kto_undesirable_weight > 0,
             "kto_desirable_weight and kto_undesirable_weight must be > 0")
        need(self.center_coef >= 0, f"center_coef must be >= 0, got {self.center_coef}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}")
        need(self.warmup_steps >= 0 and self.eval_every >= 0 and self.log_every >= 1,
             "warmup_steps and eval_every must be >= 0 and log_every >= 1")
        need(self.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        need(not (self.method == "kto" and self.reference == "precomputed"),
             "reference='precomputed' does not fit kto: its mismatched KL pairs change every batch; use 'copy'")
        need(self.method == "rm" or self.reference != "adapters" or not self.reference_path,
             "reference='adapters' uses the policy itself; leave reference_path empty")
