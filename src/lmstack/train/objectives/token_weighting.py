"""Adaptive token sampling as loss re-weighting: give rare or hard tokens more of the gradient.

Plain cross-entropy spends its gradient where the tokens are: on a Zipf-shaped corpus the few most
frequent ids dominate, and the long tail of rare ids is learned slowly. Two re-weightings (training
only; validation always reports plain CE):
- inverse_freq: weight = freq(target)^(-1/temperature), where freq comes from counts estimated
  online as an exponential moving sum over the targets seen so far (decay per step). temperature 1
  is full inverse frequency, 2 inverse square root (the usual compromise), large values approach
  uniform. Frequencies are add-one smoothed, so an id never seen gets a large but finite weight.
- focal: weight = (1 - p_target)^gamma (Lin et al. 2017): tokens the model already predicts well
  count less, whatever their frequency.
Either way the batch's weights are normalised to mean 1 (then capped at token_weight_max), so the
loss keeps the scale of plain CE and the same learning rate works. The counts are state: save
state_dict() with the checkpoint for an exact resume.

Usage:
    w = build_weighting(ObjectiveConfig(token_weighting="inverse_freq"), vocab_size=512)
    weights = w.weights(targets, ce.detach())    # (N,) mean-1 weights, or None for "none"
    loss = (weights * ce).mean()
"""
from __future__ import annotations

import torch


class NoWeighting:
    """Plain cross-entropy."""

    device = None  # no state to place

    def __init__(self, cfg=None, vocab_size: int = 0):
        pass

    def weights(self, targets: torch.Tensor, ce: torch.Tensor) -> torch.Tensor | None:
        return None

    def to(self, device) -> "NoWeighting":
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def _normalise(w: torch.Tensor, cap: float) -> torch.Tensor:
    # Mean 1 keeps the loss on plain CE's scale; the cap stops one unseen id from owning the batch.
    return (w / w.mean().clamp_min(1e-12)).clamp(max=cap)


class InverseFrequency(NoWeighting):
    """weight = freq^(-1/T), freq from an online exponential moving sum of target counts."""

    def __init__(self, cfg, vocab_size: int):
        self.temperature, self.decay = cfg.token_weight_temperature, cfg.token_freq_decay
        self.cap = cfg.token_weight_max
        self.counts = torch.zeros(vocab_size)
        self.steps = torch.zeros((), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def frequencies(self) -> torch.Tensor:
        return (self.counts + 1.0) / (self.counts.sum() + self.counts.numel())

    def weights(self, targets: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        # Weights come from the counts before this batch, then the batch is counted: the estimate is
        # purely online, so a batch never re-weights itself by its own composition.
        w = _normalise(self.frequencies()[targets].pow(-1.0 / self.temperature), self.cap)
        batch_counts = torch.bincount(targets, minlength=self.counts.numel()).to(self.counts)
        self.counts.mul_(self.decay).add_(batch_counts)
        self.steps += 1
        return w

    def to(self, device) -> "InverseFrequency":
        self.counts, self.steps = self.counts.to(device), self.steps.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.detach().cpu().clone(), "steps": self.steps.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.get("counts") is None or state["counts"].shape != self.counts.shape:
            raise ValueError(f"token weighting state needs counts of shape {tuple(self.counts.shape)}")
        self.counts = state["counts"].to(self.counts)
        self.steps = state["steps"].to(self.steps)


class Focal(NoWeighting):
    """weight = (1 - p_target)^gamma, with p_target = exp(-CE) of the current prediction."""

    def __init__(self, cfg, vocab_size: int):
        self.gamma, self.cap = cfg.focal_gamma, cfg.token_weight_max

    def weights(self, targets: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        return _normalise((1.0 - torch.exp(-ce)).clamp_min(0.0).pow(self.gamma), self.cap)


WEIGHTINGS = {"none": NoWeighting, "inverse_freq": InverseFrequency, "focal": Focal}


def build_weighting(cfg, vocab_size: int):
    return WEIGHTINGS[cfg.token_weighting](cfg, vocab_size)
