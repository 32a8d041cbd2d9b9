"""Compression: quantized weight storage (int8, NF4 with double quantization); later quantization,
pruning and distillation work extends this package.

Usage:
    from lmstack.compress import QuantizedLinear, quantize_model
    report = quantize_model(model, kind="nf4")      # {"bytes_saved": ..., "bits_per_weight": 4.13, ...}
"""
from lmstack.compress.quant_storage import (NF4, QuantizedLinear, dequantize_int8, dequantize_nf4, nf4_levels,
                                            quantize_int8, quantize_model, quantize_nf4)
from lmstack.compress.awq import AwqResult, awq_dequantize, awq_quantize
from lmstack.compress.calibration import LayerStats, collect_stats
from lmstack.compress.gptq import gptq_quantize
from lmstack.compress.prune import PruneResult, prune_magnitude, prune_sparsegpt, prune_wanda
from lmstack.compress.quantize_rtn import QuantizedWeight, dequantize, quantize_rtn
from lmstack.compress.smoothquant import quantize_w8a8, smooth_model, w8a8_linear

__all__ = ["NF4", "QuantizedLinear", "quantize_model", "quantize_nf4", "dequantize_nf4", "quantize_int8",
           "dequantize_int8", "nf4_levels",
           "QuantizedWeight", "quantize_rtn", "dequantize", "LayerStats", "collect_stats", "gptq_quantize",
           "AwqResult", "awq_quantize", "awq_dequantize", "smooth_model", "quantize_w8a8", "w8a8_linear",
           "PruneResult", "prune_magnitude", "prune_wanda", "prune_sparsegpt"]
