"""Compression: quantized weight storage (int8, NF4 with double quantization); later quantization,
pruning and distillation work extends this package.

Usage:
    from lmstack.compress import QuantizedLinear, quantize_model
    report = quantize_model(model, kind="nf4")      # {"bytes_saved": ..., "bits_per_weight": 4.13, ...}
"""
from lmstack.compress.quant_storage import (NF4, QuantizedLinear, dequantize_int8, dequantize_nf4, nf4_levels,
                                            quantize_int8, quantize_model, quantize_nf4)

__all__ = ["NF4", "QuantizedLinear", "quantize_model", "quantize_nf4", "dequantize_nf4", "quantize_int8",
           "dequantize_int8", "nf4_levels"]
