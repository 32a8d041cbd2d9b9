"""CPU kernels the engine's decode step can call; compiled on first use (build.py), each falls back to torch.

Usage:
    from lmstack.kernels import skinny_linear, available, info, MAX_ROWS
    y = skinny_linear(x, weight, bias)   # F.linear for decode-sized fp32 x (skinny.py)
    from lmstack.kernels import decode_ops
    y = decode_ops.rms_norm(x, w, eps)   # RMSNorm, RoPE, paged decode attention (decode_ops.py)
    from lmstack.kernels import int8_linear, int4_linear, w8a8_linear
    y = int4_linear(x, codes, scales, zeros, group_size, bias)   # F.linear on packed int4/int8 codes (quant.py)
"""
from lmstack.kernels import decode_ops
from lmstack.kernels.build import available, info
from lmstack.kernels.quant import int4_linear, int8_linear, w8a8_linear
from lmstack.kernels.skinny import MAX_ROWS, skinny_linear

__all__ = ["MAX_ROWS", "available", "decode_ops", "info", "int4_linear", "int8_linear", "skinny_linear", "w8a8_linear"]
