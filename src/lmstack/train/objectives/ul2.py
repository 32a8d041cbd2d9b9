"""UL2's mixture of denoisers (Tay et al. 2022): one decoder-only model trained on several objectives at once.

Three paradigms, drawn per row (or once per batch) with weights ul2_weights:
- R (regular): T5 span corruption with short spans and 15% noise, e.g. (mean 3, 15%) and (8, 15%);
- S (sequential): prefix LM, a bidirectional prefix and a causal continuation;
- X (extreme): long spans or dense noise, e.g. (3, 50%), (8, 50%), (64, 15%), (64, 50%).
Within R or X one (mean_span, noise_density) pair is drawn uniformly. All three produce the same
batch layout ([inputs ; targets] with prefix_len, see span.py and prefix_lm.py), so rows of different
paradigms share a batch. With ul2_mode_tokens each row starts with a mode token ([R], [S] or [X], the
three ids below the sentinels), which lets the model be told at inference time which task to do.
This is the objective-level half of multi-task pretraining; mixing task datasets by weight is the
data mixer's job (lmstack.data.mixing).

Usage:
    obj = UL2(ObjectiveConfig(name="ul2", ul2_weights=[0.4, 0.2, 0.4], ul2_mode_tokens=True), model_cfg)
    batch = obj.prepare(tokens, generator)      # + "mode": (B,) 0=R, 1=S, 2=X
    loss, metrics = obj.loss(model, batch)      # metrics include ce_R, ce_S, ce_X
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.train.objectives.base import Objective, model_inputs, pack_rows, scored_logits
from lmstack.train.objectives.prefix_lm import prefix_row
from lmstack.train.objectives.span import sentinel_ids, span_row

MODES = ("R", "S", "X")


class UL2(Objective):
    name = "ul2"
    attention = "causal"
    min_len = 6

    def __init__(self, cfg, model_cfg, pad_id: int | None = None):
        super().__init__(cfg, model_cfg, pad_id)
        self.sentinels = sentinel_ids(cfg, self.mask_id, self.vocab_size)
        self.mode_ids: list[int] | None = None
        if cfg.ul2_mode_tokens:
            below = self.sentinels[-1] - 1
            if below - len(MODES) + 1 < 0:
                raise ConfigError(f"objective.ul2_mode_tokens needs {len(MODES)} ids below the sentinels "
                                  f"(the lowest sentinel is {self.sentinels[-1]})")
            self.mode_ids = [below - j for j in range(len(MODES))]
        self.reserved = [*self.sentinels, *(self.mode_ids or [])]
        self.mode_weights = torch.tensor(cfg.ul2_weights, dtype=torch.float)
        self.fill = pad_id if pad_id is not None else 0

    def _draw(self, generator: torch.Generator) -> tuple[int, tuple[float, float] | None]:
        mode = int(torch.multinomial(self.mode_weights, 1, generator=generator))
        if MODES[mode] == "S":
            return mode, None
        specs = self.cfg.ul2_r_denoisers if MODES[mode] == "R" else self.cfg.ul2_x_denoisers
        mean, density = specs[int(torch.randint(len(specs), (1,), generator=generator))]
        return mode, (float(mean), float(density))

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        shared = None if self.cfg.ul2_per_row else self._draw(generator)
        rows, modes = [], []
        for row in tokens:
            mode, spec = shared or self._draw(generator)
            lead = [self.mode_ids[mode]] if self.mode_ids else []
            if spec is None:
                rows.append(prefix_row(row, generator, lead))
            else:
                rows.append(span_row(row, spec[1], spec[0], generator, self.sentinels, lead, self.pad_id))
            modes.append(mode)
        batch = pack_rows(rows, tokens.shape[1] - 1, self.fill)
        batch["mode"] = torch.tensor(modes, dtype=torch.long)
        return batch

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["loss_mask"]
        logits = scored_logits(model, batch["input_ids"], mask, model_inputs(batch))
        targets = batch["targets"][mask]
        loss, metrics = self.lm_loss(logits, targets, model.training)
        with torch.no_grad():  # per-paradigm CE, to watch each denoiser's progress
            ce = F.cross_entropy(logits.float(), targets, reduction="none")
            row_mode = batch["mode"][:, None].expand_as(mask)[mask]
            for j, m in enumerate(MODES):
                if bool((row_mode == j).any()):
                    metrics[f"ce_{m}"] = float(ce[row_mode == j].mean())
        return self.finish(model, loss, metrics)
