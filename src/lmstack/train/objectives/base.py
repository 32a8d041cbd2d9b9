"""The Objective interface and the pieces every objective shares.

An objective turns a packed batch of token ids into model inputs and targets (`prepare`), and a model
plus that batch into a scalar loss (`loss`). `prepare` runs on the CPU with the trainer's seeded
generator, so every random choice (masks, spans, split points, samples) is reproducible and resumes
bit-exactly; `loss` does no random draws of its own.

Batches are dicts of tensors: always "input_ids", "targets" and "loss_mask" (all (B, T)), plus any of
"doc_ids", "prefix_len", "attention_mask", "lengths" and objective-specific keys. The loss is the mean
over counted tokens (loss_mask) plus the model's MoE auxiliary loss. A batch with no counted tokens
gives a loss of exactly 0 (still attached to the graph, so every parameter gets a zero gradient) and
n_tokens = 0, never NaN.

Usage:
    obj = build_objective(ObjectiveConfig(name="clm"), model.config)
    batch = obj.prepare(tokens, torch.Generator().manual_seed(0))     # tokens: (B, T+1)
    loss, metrics = obj.loss(model, batch)                            # metrics: loss, ce, accuracy, n_tokens
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model.fused_ce import fused_linear_cross_entropy
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import real_vocab
from lmstack.train.objectives.token_weighting import build_weighting

# Batch keys the model's forward understands, passed through when an objective's batch has them.
MODEL_KEYS = ("doc_ids", "prefix_len", "attention_mask", "token_type_ids")


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside DDP (.module) or torch.compile (._orig_mod) wrappers."""
    while True:
        inner = next((m for m in (getattr(model, a, None) for a in ("module", "_orig_mod"))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}


def aux_loss(model: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The MoE load-balancing / z-loss the model left after its last forward (0 for dense models)."""
    aux = getattr(unwrap(model), "aux_loss", None)
    return aux.to(like) if torch.is_tensor(aux) else like.new_zeros(())


def scored_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                  kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (N, vocab) at the N positions where mask is True, in row-major order.

    A plain lmstack Transformer runs its LM head on those positions only: MLM scores 15% of them and
    prefix LM about half, so most of the head's work (a d_model x vocab matmul per token) would be
    thrown away. Wrapped models (DDP, FSDP, torch.compile) compute every position's logits through
    their own forward and the selection happens after."""
    if type(model) is Transformer and model.config.head != "none":
        hidden = model(input_ids, return_hidden=True, **kwargs)
        return model.head(hidden[mask])
    return model(input_ids, **kwargs)[mask]


def fused_lm_loss(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                  kwargs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """objective.fused_ce: the LM head and mean cross-entropy at the scored positions, chunk by chunk
    (model/fused_ce.py), so the (N, vocab) logits never exist. Padded vocabulary rows are masked as in
    Transformer.head. Needs a plain (or DDP / torch.compile wrapped) Transformer with head='lm'."""
    core = unwrap(model)
    if type(core) is not Transformer or core.config.head != "lm":
        what = type(core).__name__ if type(core) is not Transformer else f"head={core.config.head!r}"
        raise LmstackError(f"objective.fused_ce needs an lmstack Transformer with head='lm' (got {what}); "
                           "set objective.fused_ce=false")
    cfg = core.config
    hidden = model(input_ids, return_hidden=True, **kwargs)[mask]
    weight = core.head_weight()
    n = targets.numel()
    if n == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0, {"ce": 0.0, "accuracy": 0.0, "n_tokens": 0}
    loss, correct = fused_linear_cross_entropy(hidden, weight, targets, n_real=real_vocab(cfg),
                                               softcap=cfg.final_logit_softcap, return_correct=True)
    return loss, {"ce": float(loss.detach()), "accuracy": int(correct) / n, "n_tokens": n}


def check_tokens(tokens: torch.Tensor, vocab_size: int, min_len: int = 2) -> torch.Tensor:
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
        raise LmstackError(f"objective.prepare needs a (batch, T+1) integer tensor of token ids, got {shape}")
    if tokens.shape[1] < min_len:
        raise LmstackError(f"rows of {tokens.shape[1]} tokens are too short for this objective; it needs >= {min_len}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise LmstackError(f"token ids must lie in [0, vocab_size={vocab_size}); got ids in "
                           f"[{int(tokens.min())}, {int(tokens.max())}]")
    return tokens.long()


def input_doc_ids(doc_ids: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The loader's doc ids cover the T inputs; accept (B, T+1) too and drop the last column."""
    if doc_ids is None:
        return None
    return doc_ids[:, :t] if doc_ids.shape[1] > t else doc_ids


def pack_rows(rows: list[tuple[torch.Tensor, int]], t: int, fill: int) -> dict[str, torch.Tensor]:
    """Lay out prefix-LM rows as next-token batches of width t.

    Each row is (full sequence of length <= t + 1, prefix length p). The model reads full[:-1] with
    prefix_len = p; position i predicts full[i + 1]. Positions before p - 1 are excluded from the loss,
    because their bidirectional attention already sees the token they would predict; position p - 1
    (the last prefix token) predicts the first token after the prefix and does count. Rows shorter than
    t + 1 are padded at the end with `fill` and loss_mask 0; under causal attention padding at the end
    is invisible to every real token, so no attention mask is needed."""
    b = len(rows)
    input_ids = torch.full((b, t), fill, dtype=torch.long)
    targets = torch.full((b, t), fill, dtype=torch.long)
    loss_mask = torch.zeros((b, t), dtype=torch.bool)
    prefix_len = torch.zeros(b, dtype=torch.long)
    lengths = torch.zeros(b, dtype=torch.long)
    for i, (full, p) in enumerate(rows):
        n = full.shape[0] - 1
        if n > t or not 1 <= p <= n:
            raise ValueError(f"row {i}: a sequence of {n + 1} tokens with prefix {p} does not fit width {t}")
        input_ids[i, :n], targets[i, :n] = full[:-1], full[1:]
        loss_mask[i, p - 1:n] = True
        prefix_len[i], lengths[i] = p, n
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "prefix_len": prefix_len,
            "lengths": lengths}


@contextlib.contextmanager
def seeded(seed: int):
    """Initialise the objective's own modules from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Objective(abc.ABC):
    """Base class. Subclasses set `name` and `attention`, implement `_prepare`, and override `loss` when
    plain cross-entropy on the scored positions is not the whole story."""

    name = "base"
    attention = "causal"
    """What the model must be: 'causal' (decoders, prefix-LM), 'bidirectional' (encoders) or 'any'."""
    prefix_safe = True
    """Whether hidden states at positions before the split (prefix_len or contrastive_split) never see later
    tokens, which the contrastive auxiliary loss needs."""
    min_len = 2
    """Shortest loader row (T+1 tokens) the objective can work with."""

    def __init__(self, cfg, model_cfg, pad_id: int | None = None):
        self.cfg, self.model_cfg, self.pad_id = cfg, model_cfg, pad_id
        self.vocab_size = model_cfg.vocab_size
        self.mask_id = model_cfg.vocab_size - 1 if cfg.mask_token_id is None else cfg.mask_token_id
        if self.mask_id >= self.vocab_size:
            raise ConfigError(f"objective.mask_token_id={self.mask_id} must be below vocab_size={self.vocab_size}")
        self.bos_id = model_cfg.bos_token_id
        self.reserved: list[int] = []  # ids the objective writes into inputs; real data must not contain them
        self.extra = nn.ModuleDict()  # trainable modules the objective owns (ELECTRA generator, heads)
        self.weighting = build_weighting(cfg, model_cfg.vocab_size)
        self._check_model()

    def _check_model(self) -> None:
        causal = self.model_cfg.causal
        if self.attention == "causal" and not causal:
            raise ConfigError(f"objective {self.name!r} needs a causal model (it predicts the next token); "
                              "set model.causal=true")
        if self.attention == "bidirectional" and causal:
            raise ConfigError(f"objective {self.name!r} needs a bidirectional encoder; set model.causal=false "
                              "(got causal=True)")

    # ---- the interface the trainer calls
    def prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                doc_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, T+1) packed token ids -> model inputs, targets and loss mask, all (B, T)."""
        tokens = check_tokens(tokens, self.vocab_size, self.min_len)
        self._check_reserved(tokens)
        batch = self._prepare(tokens.cpu(), generator, input_doc_ids(doc_ids, tokens.shape[1] - 1))
        if self.pad_id is not None:
            batch["loss_mask"] = batch["loss_mask"] & (batch["targets"] != self.pad_id)
        return batch

    def _check_reserved(self, tokens: torch.Tensor) -> None:
        if not self.reserved:
            return
        lo, hi = min(self.reserved), max(self.reserved)
        hit = (tokens >= lo) & (tokens <= hi)  # a cheap range test first; usually nothing is in range
        if bool(hit.any()):
            clash = torch.isin(tokens[hit], torch.tensor(self.reserved))
            if self.pad_id is not None:
                clash &= tokens[hit] != self.pad_id
            if bool(clash.any()):
                bad = int(tokens[hit][clash][0])
                raise LmstackError(
                    f"the data contains id {bad}, which objective {self.name!r} reserves for its mask/sentinel/mode "
                    f"tokens (ids {lo}..{hi}); the inputs would be ambiguous. Reserve these ids in the tokenizer, or "
                    "point objective.mask_token_id / first_sentinel_id at ids it never produces")

    @abc.abstractmethod
    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Checked CPU tokens (B, T+1) and input doc ids (B, T) or None -> the batch dict."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["loss_mask"]
        if getattr(self.cfg, "fused_ce", False):
            return self.finish(model, *fused_lm_loss(model, batch["input_ids"], mask, batch["targets"][mask],
                                                     model_inputs(batch)))
        logits = scored_logits(model, batch["input_ids"], mask, model_inputs(batch))
        loss, metrics = self.lm_loss(logits, batch["targets"][mask], model.training)
        return self.finish(model, loss, metrics)

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters the optimizer must also update ([] for most objectives)."""
        return list(self.extra.parameters())

    # ---- device and state (the trainer saves state_dict() next to the model for an exact resume)
    def to(self, device: torch.device | str) -> "Objective":
        self.extra.to(device)
        self.weighting.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"extra.{k}": v for k, v in self.extra.state_dict().items()}
        state.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
        weighting = {k[len("weighting."):]: v for k, v in state.items() if k.startswith("weighting.")}
        unknown = [k for k in state if not k.startswith(("extra.", "weighting."))]
        if unknown:
            raise LmstackError(f"objective state has unknown entry {unknown[0]!r}")
        try:
            self.extra.load_state_dict(extra, strict=True)
        except RuntimeError as e:
            raise LmstackError(f"objective {self.name!r}: saved state does not fit: {e}") from None
        self.weighting.load_state_dict(weighting)

    def _place(self, like: torch.Tensor) -> None:
        """Move the objective's own modules to the model's device on first use."""
        p, w = next(self.extra.parameters(), None), self.weighting.device
        if (p is not None and p.device != like.device) or (w is not None and w != like.device):
            self.to(like.device)

    # ---- shared loss pieces
    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of (N, V) scored logits against (N,) targets (token-weighted while training)."""
        self._place(logits)
        n = targets.numel()
        if n == 0:
            return logits.sum() * 0.0, {"ce": 0.0, "accuracy": 0.0, "n_tokens": 0}
        logits = logits.float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        weights = self.weighting.weights(targets, ce.detach()) if training else None
        loss = ce.mean() if weights is None else (weights * ce).mean()
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return loss, {"ce": float(ce.detach().mean()), "accuracy": float(acc), "n_tokens": n}

    def finish(self, model: nn.Module, loss: torch.Tensor, metrics: dict[str, float],
               *extra_models: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        """Add the MoE auxiliary losses of the model (and any extra models the objective ran)."""
        aux = aux_loss(model, loss)
        for m in extra_models:
            aux = aux + aux_loss(m, loss)
        loss = loss + aux
        metrics["aux_loss"] = float(aux.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics
