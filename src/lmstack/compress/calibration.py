"""Calibration statistics: what GPTQ, SparseGPT, AWQ, Wanda and SmoothQuant need to know about each layer's inputs.

One fp32 forward pass of the model over calibration token ids, with a forward pre-hook on every nn.Linear of
the blocks (a fused qkv_proj / gate_up_proj is one Linear, so one set of statistics). Per layer, over the n
input rows (tokens) it saw, we accumulate:

- X^T X (fp32 per batch, fp64 running total), giving the input Hessian H = 2 X^T X / n of the layer's
  squared output error (GPTQ, SparseGPT): ||(W - W') X||^2 summed over tokens is
  tr((W - W') H (W - W')^T) * n / 2;
- sum |x_j| per input channel (AWQ's mean |x|), sum x_j^2 (Wanda's ||X_j||_2), max |x_j| (SmoothQuant).

Linears that read the same tensor (q, k, v; gate, up) share one computation of it. Statistics come from the
unquantized model in one pass. GPTQ's reference code instead re-runs each block on the outputs of the
already quantized blocks before it; one pass is simpler, and whether the sequential variant buys anything
at our sizes is not measured yet.

Usage:
    from lmstack.compress.calibration import collect_stats
    stats = collect_stats(model, ids)          # ids: (N, T) LongTensor, or a list of 1-D sequences
    s = stats["blocks.0.attn.q_proj"]
    s.hessian            # (in, in) fp32, 2 X^T X / n
    s.mean_abs, s.l2_norm, s.max_abs           # (in,) each
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.errors import LmstackError

MIN_TOKENS = 32


@dataclass
class LayerStats:
    """Accumulated input statistics of one Linear."""
    in_features: int
    n: int                    # input rows (tokens) seen
    xtx: torch.Tensor | None  # (in, in) float64, X^T X; None when collected with hessian=False
    abs_sum: torch.Tensor     # (in,) float64
    sq_sum: torch.Tensor      # (in,) float64
    max_abs: torch.Tensor     # (in,) float32

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (fp32): the Hessian of the layer's mean squared output error in its weights' rows."""
        if self.xtx is None:
            raise LmstackError("these statistics were collected with hessian=False; collect them again with "
                               "hessian=True for GPTQ or SparseGPT")
        return (2.0 * self.xtx / self.n).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.n).float()

    @property
    def l2_norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()

    def add(self, parts: tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Accumulate one batch's batch_parts()."""
        n, xtx, abs_sum, sq_sum, max_abs = parts
        self.n += n
        if self.xtx is not None:
            self.xtx += xtx
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.max_abs = torch.maximum(self.max_abs, max_abs)


def batch_parts(x: torch.Tensor, hessian: bool):
    """One batch's contributions: (rows, X^T X, sum |x|, sum x^2, max |x|). The matmul runs in fp32 (2-4x
    faster than fp64 here, and one batch's sum is short); the running totals are fp64."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    xtx = (x.T @ x).double() if hessian else None
    return x.shape[0], xtx, x.abs().sum(0).double(), x.square().sum(0).double(), x.abs().amax(0)


def _sequences(calib, vocab_size: int, max_len: int) -> list[torch.Tensor]:
    """The calibration ids as a list of (B, T) batches; checks what a forward pass would otherwise fail on."""
    if calib is None:
        raise LmstackError("no calibration data: give token ids, a (N, T) tensor or a list of sequences")
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib[None]
        if calib.dim() != 2:
            raise LmstackError(f"calibration ids must be (N, T) or a list of sequences; got a tensor of shape "
                               f"{tuple(calib.shape)}")
        seqs = [calib] if calib.numel() else []
    else:
        seqs = [torch.as_tensor(s) for s in calib if len(s)]
        if any(s.dim() != 1 for s in seqs):
            raise LmstackError("a list of calibration sequences must hold 1-D sequences of token ids; got one of "
                               f"shape {next(tuple(s.shape) for s in seqs if s.dim() != 1)}")
        seqs = [s[None] for s in seqs]
    if not seqs:
        raise LmstackError("no calibration data: the calibration set is empty")
    for s in seqs:
        if s.dtype.is_floating_point or s.dtype == torch.bool:
            raise LmstackError(f"calibration ids must be integer token ids; got dtype {s.dtype}")
        if s.shape[1] > max_len:
            raise LmstackError(f"a calibration sequence has {s.shape[1]} tokens, more than the model's "
                               f"max_seq_len {max_len}; cut it into shorter sequences")
        lo, hi = int(s.min()), int(s.max())
        if lo < 0 or hi >= vocab_size:
            raise LmstackError(f"calibration ids must lie in [0, {vocab_size}) (the model's vocab_size); "
                               f"got values in [{lo}, {hi}]")
    return seqs


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside model.blocks, by its name in the model (e.g. 'blocks.0.mlp.down_proj')."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmstackError(f"{type(model).__name__} has no .blocks; calibration expects an lmstack Transformer")
    return {f"blocks.{name}": m for name, m in blocks.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def collect_stats(model: nn.Module, calib, *, min_tokens: int = MIN_TOKENS, hessian: bool = True,
                  batch_size: int = 8) -> dict[str, LayerStats]:
    """Run `model` over the calibration ids and return {linear name: LayerStats} for every Linear of its blocks.

    calib is a (N, T) integer tensor (run in batches of batch_size rows) or a list of 1-D sequences (run one
    at a time, so lengths may differ). Fewer than min_tokens tokens in all is an error: a Hessian from a
    handful of rows is singular and the methods would fit noise."""
    cfg = model.config
    seqs = _sequences(calib, cfg.vocab_size, cfg.max_seq_len)
    total = sum(s.numel() for s in seqs)
    if total < min_tokens:
        raise LmstackError(f"calibration data too short: {total} tokens, need at least {min_tokens}")
    linears = block_linears(model)
    if not linears:
        raise LmstackError("the model's blocks hold no nn.Linear to calibrate")
    device = next(model.parameters()).device
    stats: dict[str, LayerStats] = {}
    handles = []
    last: list = [None, None]  # (input, its parts): q, k and v (gate and up) read one tensor; compute once

    def parts_of(x: torch.Tensor):
        if last[0] is not x:
            last[0], last[1] = x, batch_parts(x, hessian)
        return last[1]

    for name, lin in linears.items():
        i = lin.in_features
        stats[name] = LayerStats(i, 0, torch.zeros(i, i, dtype=torch.float64, device=device) if hessian else None,
                                 torch.zeros(i, dtype=torch.float64, device=device),
                                 torch.zeros(i, dtype=torch.float64, device=device),
                                 torch.zeros(i, device=device))
        # A pre-hook sees the input exactly as the matmul does (after the norm, or the gated activation).
        handles.append(lin.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.add(parts_of(args[0]))))
    was_training = model.training
    model.eval()  # dropout off: the statistics are of the function the quantized model must reproduce
    try:
        for s in seqs:
            for start in range(0, s.shape[0], batch_size):
                model(s[start:start + batch_size].to(device=device, dtype=torch.long))
    finally:
        last.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
