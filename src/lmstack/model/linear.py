"""Linear: nn.Linear whose decode-time forward can run lmstack.kernels' skinny GEMM, inside decode_kernels().

A decode step multiplies one to a few rows by every weight matrix, so it is bound by reading the weights. MKL's
small-M path streams them at a fraction of the machine's bandwidth and pays again per extra row
(benchmarks/cpu_gemv.py); the kernel reads each weight once per call whatever the number of rows, and row m of
its result never depends on the other rows, so batching requests never changes a request's numbers.

The kernel is switched on per thread by a scope, not per model: the inference engine runs its steps inside
`decode_kernels()`, and everything else (training, `generate`, eval, tests that compare a model with itself
bitwise) keeps F.linear's exact numbers. Inside the scope, skinny_linear still falls back to F.linear for anything
that is not a few fp32 CPU rows without autograd (prefill chunks, other dtypes, CUDA). The same scope switches the
decode step's small ops (RMSNorm, RoPE, paged decode attention) to
lmstack.kernels.decode_ops; kernels_on() reads it.

Usage:
    proj = Linear(768, 2304, bias=False)     # a drop-in nn.Linear: same parameters and state-dict keys
    with decode_kernels(kernels.available()):
        logits = model(ids, cache=cache)     # every Linear (and the LM head) of the model uses the kernel
    y = linear(x, weight, bias)              # the same switch for a bare weight (the tied LM head)
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels import skinny_linear

_scope = threading.local()


@contextlib.contextmanager
def decode_kernels(on: bool = True):
    """Within this block (on this thread), Linear layers and linear() use the skinny kernel where it applies."""
    before = getattr(_scope, "on", False)
    _scope.on = bool(on)
    try:
        yield
    finally:
        _scope.on = before


def kernels_on() -> bool:
    """Whether this thread is inside decode_kernels(True): the model's norms, RoPE, gate product and the paged
    cache's decode attention switch to lmstack.kernels.decode_ops there too."""
    return getattr(_scope, "on", False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the skinny kernel inside decode_kernels()."""
    if getattr(_scope, "on", False):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that honours decode_kernels(); identical to nn.Linear outside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
