"""Feed-forward blocks: plain (GELU, ReLU, ReLU², SiLU) and gated (SwiGLU, GeGLU, Shazeer 2020).

A gated MLP computes down(act(gate(x)) * up(x)); a plain one down(act(up(x))). The activation
registry is shared with the MoE experts.

With cfg.fused_kernels and mlp=swiglu, the product silu(gate) * up runs as fused.swiglu. With
cfg.fused_projections a gated MLP holds one `gate_up_proj` Linear (gate rows, then up; Phi-3's layout,
fused_projections.py): one matmul instead of two, the same numbers.

Usage:
    mlp = MLP(cfg)              # cfg.mlp picks the kind
    y = mlp(x)                  # (B, T, d_model)
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from lmstack.model.fused import swiglu
from lmstack.model.fused_projections import FusedLinear
from lmstack.model.linear import Linear


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# mlp kind -> activation applied to the (gate) projection
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "relu2": relu_squared,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": gelu_tanh,  # Gemma's gelu_pytorch_tanh on the gate
}


class MLP(nn.Module):
    def __init__(self, cfg, d_ff: int | None = None):
        super().__init__()
        d_ff = self.d_ff = d_ff or cfg.d_ff
        self.act = ACTIVATIONS[cfg.mlp]
        self.gated = cfg.gated
        self.gate_proj = self.up_proj = self.gate_up_proj = None
        if self.gated and cfg.fused_projections:
            self.gate_up_proj = FusedLinear(cfg.d_model, [("gate_proj", d_ff), ("up_proj", d_ff)], bias=cfg.mlp_bias)
        else:
            self.gate_proj = Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias) if self.gated else None
            self.up_proj = Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down_proj = Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        # fused SwiGLU product (fused.py): silu(gate) * up in one kernel that keeps only gate and up
        self.fused = bool(getattr(cfg, "fused_kernels", False)) and cfg.mlp == "swiglu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        fused = self.gate_up_proj  # (a submodule read goes through nn.Module.__getattr__: read it once)
        if fused is not None:
            gate, up = fused(x).chunk(2, dim=-1)  # chunk: no Python wrapper, unlike split
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fused:
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(self.act(gate) * up)
