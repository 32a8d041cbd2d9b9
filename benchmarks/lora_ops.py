"""LoRA-family operations against their baselines, on one llama-style model (d_model 256, 6 layers, vocab 8192).

1. LoRA training step (forward + backward, all seven Linear kinds, r=8), ours on the lmstack model vs
   `peft` on the same weights exported to transformers' LlamaForCausalLM. Seconds per step; baseline peft.
2. NF4 storage with double quantization: bytes of the quantized Linears vs fp32 (baseline fp32 storage).
3. QLoRA step vs LoRA step: the price of dequantizing on the fly (baseline LoRA; a ratio < 1 is a cost).
4. Merged vs unmerged LoRA inference forward (baseline unmerged): what merging buys.

Usage:
    python benchmarks/lora_ops.py          # about a minute on 2 cores
"""
from __future__ import annotations

import tempfile
import warnings

import torch
import torch.nn.functional as F

from _common import result, timeit, write_result

from lmstack.adapt import AdapterConfig, get_peft_model, merge_adapter, save_adapter
from lmstack.model import Transformer
from lmstack.model.hf_io import save_model
from lmstack.model.presets import preset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B, T, R = 4, 128, 8


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-small", max_seq_len=T))


def step_time(forward, params) -> float:
    x = torch.randint(0, 8192, (B, T), generator=torch.Generator().manual_seed(0))

    def step():
        for p in params:
            p.grad = None
        F.cross_entropy(forward(x).flatten(0, 1), x.flatten()).backward()

    return timeit(step, repeat=7, warmup=2)


def main() -> None:
    torch.set_num_threads(2)
    cfg = AdapterConfig(method="lora", r=R, alpha=16, target_modules=TARGETS)
    results = []

    base = model().train()
    t_base = step_time(base, list(base.parameters()))
    ours = get_peft_model(model(), cfg).train()
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    t_ours = step_time(ours, ours_params)
    with tempfile.TemporaryDirectory() as d:
        save_model(model(), f"{d}/base")
        import peft
        import transformers
        hf = transformers.LlamaForCausalLM.from_pretrained(f"{d}/base", torch_dtype=torch.float32).train()
        t_hf = step_time(lambda x: hf(x).logits, list(hf.parameters()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS)).train()
        t_peft = step_time(lambda x: theirs(x).logits, [p for p in theirs.parameters() if p.requires_grad])
        save_adapter(ours, f"{d}/adapter")
    common = dict(batch=B, seq=T, r=R, model="llama-small (d256, 6 layers)", trainable=sum(p.numel() for p in ours_params))
    results.append(result("lora_ops", "lora_train_step_seconds", False, t_ours, "peft LoRA on transformers Llama",
                          t_peft, goal=1.0, **common))
    # The two base models differ in speed; this row compares what the adapters add on top of each base
    # (LoRA step / full fine-tuning step of the same base model).
    results.append(result("lora_ops", "lora_step_over_full_ft_step", False, t_ours / t_base,
                          "peft: peft step / transformers full-FT step", t_peft / t_hf, goal=1.0,
                          ours_full_ft_seconds=t_base, hf_full_ft_seconds=t_hf, **common))
    q = get_peft_model(model(), AdapterConfig(method="qlora", quant="nf4", double_quant=True, r=R, alpha=16,
                                              target_modules=TARGETS)).train()
    rep = q.quant_report
    results.append(result("lora_ops", "nf4_storage_bytes", False, rep["quantized_bytes"], "fp32 storage",
                          rep["fp32_bytes"], goal=7.0, layers=rep["layers"],
                          bits_per_weight=round(rep["bits_per_weight"], 3)))
    t_q = step_time(q, [p for p in q.parameters() if p.requires_grad])
    results.append(result("lora_ops", "qlora_train_step_seconds", False, t_q, "LoRA over fp32 base (ours)", t_ours,
                          goal=None, note="the cost of dequantizing NF4 on the fly; < 1 means slower"))

    ours.eval()
    x = torch.randint(0, 8192, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_unmerged = timeit(lambda: ours(x), repeat=5, warmup=1)
        merge_adapter(ours)
        t_merged = timeit(lambda: ours(x), repeat=5, warmup=1)
    results.append(result("lora_ops", "inference_forward_seconds", False, t_merged, "unmerged LoRA", t_unmerged,
                          goal=1.0, batch=B, seq=T))
    write_result("lora_ops", results)


if __name__ == "__main__":
    main()
