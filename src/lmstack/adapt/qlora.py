"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose Linears are stored in NF4 (or int8).

Every base Linear except the LM head and MoE routers (small, and sensitive to rounding) becomes a
lmstack.compress.QuantizedLinear: 4-bit NF4 codes in blocks of 64, the block constants double-quantized
(cfg.double_quant), dequantized on the fly in forward. LoRA adapters on the targets train in full
precision on top; gradients flow through the dequantized weight to the input, never into the codes.
The bytes saved are kept on the model as `model.quant_report`.

Usage:
    model = get_peft_model(model, AdapterConfig(method="qlora", quant="nf4", double_quant=True, r=8,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.quant_report   # {"layers": 14, "fp32_bytes": ..., "quantized_bytes": ..., "bytes_saved": ..., "bits_per_weight": 4.13}
"""
from __future__ import annotations

from torch import nn

from lmstack.adapt.layers import AdapterLinear
from lmstack.adapt.lora import add_lora_layers
from lmstack.adapt.registry import find_targets, register_method
from lmstack.compress.quant_storage import QuantizedLinear, quantize_model


@register_method("qlora")
def add_qlora(model: nn.Module, cfg, adapter_name: str) -> None:
    # Check the targets before quantizing, so a typo in target_modules leaves the model untouched.
    find_targets(model, cfg.target_modules, types=(nn.Linear, QuantizedLinear, AdapterLinear))
    report = quantize_model(model, kind=cfg.quant, double_quant=cfg.double_quant)
    if report["layers"]:
        model.quant_report = report
    add_lora_layers(model, cfg, adapter_name, kind="lora")
