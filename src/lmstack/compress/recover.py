"""Recovery fine-tuning after pruning: train LoRA adapters on every projection of the pruned model for a few
steps of next-token loss on (calibration or training) text, then merge them into the weights.

Pruning removes what scored least, not nothing; a short fine-tune lets the remaining weights take over part of
the removed work (LLM-Pruner, Ma et al. 2023, recovers with LoRA the same way). LoRA rather than full
fine-tuning: few trainable weights, so a few hundred windows of text do not overfit the whole model, and the
merged result has exactly the pruned shapes. LoRA comes from lmstack.adapt, the optimizer and the LR schedule
from lmstack.train.optim (AdamW, warmup then cosine).

For unstructured or 2:4 pruning the merged update B A is dense and would fill the zeros back in; the caller
re-applies the mask after merging (recover(..., keep_masks=...)), so the sparsity is kept.

Usage:
    from lmstack.compress.recover import RecoverConfig, recover
    model, log = recover(model, windows, RecoverConfig(steps=100))   # windows: (N, T) token ids
    log["loss_first"], log["loss_last"]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.adapt import AdapterConfig, get_peft_model, merge_and_unload
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import real_vocab
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RecoverConfig:
    steps: int = 100
    """Optimizer steps of recovery fine-tuning (0 = none)."""
    batch_size: int = 8
    """Windows of text per step."""
    lr: float = 1e-3
    """Peak learning rate of the LoRA weights (warmup over the first 10% of steps, then cosine to 10%)."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scale numerator (update scaled by alpha / r)."""
    seed: int = 0
    """Seed of the LoRA init and the order of the windows."""


def _targets(model: Transformer) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [t for t in TARGETS if t in names]


def recover(model: Transformer, windows: torch.Tensor, cfg: RecoverConfig,
            keep_masks: dict[str, torch.Tensor] | None = None) -> tuple[Transformer, dict]:
    """Fine-tune LoRA on `windows` ((N, T) ids) for cfg.steps steps, merge, and return (a plain Transformer of
    the same config, {"loss_first", "loss_last", "steps", "seconds"}). keep_masks: {parameter name: bool mask}
    re-applied after the merge. The model passed in is consumed (its Linears are wrapped, then replaced)."""
    if cfg.steps <= 0:
        raise LmstackError(f"recovery steps must be positive; got {cfg.steps}")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LmstackError(f"recovery text must be (N, T) token windows with T >= 2; got {tuple(windows.shape)}")
    config = model.config
    if windows.dtype.is_floating_point or int(windows.min()) < 0 or int(windows.max()) >= real_vocab(config):
        raise LmstackError(f"recovery text must be token ids in [0, {real_vocab(config)}) (the model's real vocabulary)")
    start = time.perf_counter()
    if config.fused_projections:
        model.unfuse_projections()  # the adapters target the separate q/k/v and gate/up Linears
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    peft = get_peft_model(model, AdapterConfig(method="lora", r=cfg.r, alpha=cfg.alpha, target_modules=_targets(model)))
    opt = build_optimizer(peft, OptimizerConfig(name="adamw", lr=cfg.lr, weight_decay=0.0))
    sched = ScheduleConfig(name="cosine", warmup_steps=max(1, cfg.steps // 10))
    vocab = real_vocab(config)
    device = next(peft.parameters()).device
    peft.train()
    losses = []
    order = torch.randperm(windows.shape[0], generator=gen)
    pos = 0
    for step in range(cfg.steps):
        if pos + cfg.batch_size > order.numel():  # a new epoch over the windows, in a new order
            order, pos = torch.randperm(windows.shape[0], generator=gen), 0
        x = windows[order[pos:pos + cfg.batch_size]].to(device)
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(sched, step, cfg.steps)
        logits = peft(x[:, :-1])[..., :vocab]
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), x[:, 1:].reshape(-1))
        if not math.isfinite(loss.item()):
            raise LmstackError(f"recovery fine-tuning diverged at step {step} (loss {loss.item()}); lower the lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    merged = merge_and_unload(peft, safe_merge=True)
    # merge_and_unload leaves plain nn.Linear modules; rebuild the model class's own layers from the weights
    fresh = Transformer(config.replace(fused_projections=False)).to(device=device,
                                                                       dtype=next(merged.parameters()).dtype)
    state = {k: v.detach() for k, v in merged.state_dict().items()}
    for name, mask in (keep_masks or {}).items():
        state[name] = state[name] * mask.to(state[name].device)
    fresh.load_state_dict(state, strict=True)
    if config.fused_projections:
        fresh.fuse_projections()
    fresh.eval()
    tail = losses[-max(1, len(losses) // 10):]  # the last 10% of steps: one step's loss is noisy
    return fresh, {"steps": cfg.steps, "loss_first": round(losses[0], 4), "loss_last": round(sum(tail) / len(tail), 4),
                   "seconds": round(time.perf_counter() - start, 2)}
