"""GPTQ for a whole model: gptq.gptq_quantize on every Linear of the blocks, one home for the loop.

Two ways to get each layer's input Hessian:

- one pass (the default): every Hessian from the unquantized model (calibration.collect_stats once);
- sequential (GPTQ's reference code): blocks in order, each block's statistics collected on the model whose
  earlier blocks are already quantized, so a block's rounding compensates the errors it is actually fed.
  That costs one calibration forward pass per block, and the model's block weights are replaced by their
  dequantized values as it goes (the forward passes need them).

Usage:
    from lmstack.compress.gptq_model import gptq_model
    codes = gptq_model(model, collect_stats(model, calib), bits=4, group_size=128, act_order=True)
    codes = gptq_model(model, None, bits=4, group_size=128, sequential=True, calib=calib)  # weights change
    codes["blocks.0.mlp.down_proj"]     # QuantizedWeight
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.compress.calibration import LayerStats, block_linears, collect_stats
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.quantize_rtn import QuantizedWeight, check_group, dequantize
from lmstack.errors import LmstackError


def _quantize(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], bits: int, group_size: int | None,
              act_order: bool, damp: float, static_groups: bool = False) -> dict[str, QuantizedWeight]:
    out = {}
    for name, lin in linears.items():
        if name not in stats:
            raise LmstackError(f"no calibration statistics for {name}; collect them from this model "
                               "(calibration.collect_stats)")
        out[name] = gptq_quantize(lin.weight.detach(), stats[name].hessian.to(lin.weight.device), bits, group_size,
                                  act_order=act_order, damp=damp, static_groups=static_groups)
    return out


@torch.no_grad()
def gptq_model(model: nn.Module, stats: dict[str, LayerStats] | None, bits: int = 4, group_size: int | None = 128,
               act_order: bool = False, *, damp: float = 0.01, sequential: bool = False,
               calib=None, static_groups: bool = False) -> dict[str, QuantizedWeight]:
    """{block Linear name: GPTQ codes}. One pass (sequential=False): from `stats`, and the model is not
    changed. sequential=True: from `calib` (token ids, as collect_stats takes them) block by block, and every
    block Linear of the model ends up holding its dequantized weight; `stats` is not used. static_groups: see
    gptq.gptq_quantize (act-order without a stored permutation)."""
    linears = block_linears(model)
    for lin in linears.values():  # a bad group size fails before any work (or any weight change)
        check_group(lin.in_features, group_size, bits)
    if not sequential:
        if stats is None:
            raise LmstackError("one-pass GPTQ needs calibration statistics (calibration.collect_stats)")
        return _quantize(linears, stats, bits, group_size, act_order, damp, static_groups)
    if calib is None:
        raise LmstackError("sequential GPTQ re-collects statistics block by block: give calib (token ids)")
    codes: dict[str, QuantizedWeight] = {}
    for b in range(len(model.blocks)):
        prefix = f"blocks.{b}."
        block = {n: lin for n, lin in linears.items() if n.startswith(prefix)}
        done = _quantize(block, collect_stats(model, calib), bits, group_size, act_order, damp, static_groups)
        for name, qw in done.items():
            block[name].weight.copy_(dequantize(qw).to(block[name].weight))
        codes.update(done)
    return codes
