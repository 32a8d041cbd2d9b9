"""CPU kernels the engine's decode step can call; each is compiled on first use and falls back to torch.

Usage:
    from lmstack.kernels import skinny_linear, available, info, MAX_ROWS
    y = skinny_linear(x, weight, bias)   # F.linear for decode-sized fp32 x (skinny.py)
"""
from lmstack.kernels.skinny import MAX_ROWS, available, info, skinny_linear

__all__ = ["MAX_ROWS", "available", "info", "skinny_linear"]
