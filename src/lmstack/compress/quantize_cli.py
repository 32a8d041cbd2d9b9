"""`lmstack quantize`: a model directory -> a quantized model directory that every lmstack command opens.

Usage:
    lmstack quantize --model runs/tiny --method int8 --out runs/tiny-int8                # per-channel, no data
    lmstack quantize --model runs/tiny --method int4 --group-size 128 --out runs/tiny-int4
    lmstack quantize --model runs/tiny --method gptq --calib text.jsonl --out runs/tiny-gptq
    lmstack quantize --model runs/tiny --method awq --calib text.jsonl --out runs/tiny-awq
    lmstack quantize --model runs/tiny --method smoothquant --calib text.jsonl --out runs/tiny-w8a8
    lmstack generate --model runs/tiny-gptq --prompt "..."      # load_model reads quantization_config

Methods (every Linear inside the blocks; the LM head is int8 per row unless --head fp32, see below):
- int8: symmetric round to nearest, one scale per output channel (or per --group-size columns);
- int4: asymmetric round to nearest, groups of --group-size (128) input columns;
- nf4: QLoRA's NormalFloat4 with double-quantized constants (quant_storage.py), blocks of 64;
- fp8 / fp8_e5m2: FP8 e4m3 / e5m2 storage with one scale per output channel;
- gptq: int4 by GPTQ (layer-wise Hessian from --calib, lazy batch updates; --act-order);
- awq: int4 by AWQ, the activation-aware scales folded into the preceding norms / projections (awq_model.py);
- smoothquant: W8A8, activation outliers migrated into the weights (folded into the norms, alpha 0.5), int8
  weights per channel and int8 activations per token at run time.

The LM head (--head int8, the default except for nf4) is int8 with one scale per vocab row, and a tied
embedding gathers rows of the same codes: at decode the head is the largest matrix a small model reads per token,
so an fp32 head caps a weight-only model's speed-up (llama-base: 32000 x 768, a fifth of its fp32 bytes).
--head fp32 keeps it as it is; nf4 always does (QLoRA's storage quantizes block Linears only).

Calibration text (--calib, gptq/awq/smoothquant): a .jsonl of {"text": ...} lines or a .txt file, tokenized with
the model's tokenizer and cut into --calib-samples windows of min(max_seq_len, 512) tokens. The input directory
is only read; the output is written under a temporary name and renamed when complete. The layout is
compressed-tensors' (qformat.py). transformers with compressed-tensors opens an int8 or smoothquant directory,
and any directory made with --head fp32; with an int8 head beside an int4 / fp8 body the file holds two config
groups of different formats ("mixed-precision"), which transformers 5.x decompresses with the first group's scheme
for every dense layer (its loader matches per-layer groups for MoE experts only), so pass --head fp32 for it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from lmstack.compress.awq_model import awq_model
from lmstack.compress.calibration import block_linears, collect_stats
from lmstack.compress.gptq_model import gptq_model
from lmstack.compress.prune_cli import (MAX_CALIB_LEN, calibration_windows, output_dir, publish_dir,
                                        read_calibration_texts)
from lmstack.compress.qformat import check_quantizable, quantization_config, quantized_modules, save_quantized
from lmstack.compress.qlinear import QuantLinear, quantize_head, quantize_linears, replace_module
from lmstack.compress.quant_storage import QuantizedLinear
from lmstack.compress.quantize_rtn import check_group
from lmstack.compress.smoothquant import quantize_w8a8, smooth_model
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.model.side_files import keep_source_files
from lmstack.tokenizer import load_tokenizer

Method = Literal["int8", "int4", "nf4", "fp8", "fp8_e5m2", "gptq", "awq", "smoothquant"]
Head = Literal["int8", "fp32"]
CALIBRATED = ("gptq", "awq", "smoothquant")


def _default_group(method: str) -> int | None:
    return 128 if method in ("int4", "gptq", "awq") else None


@torch.no_grad()
def quantize_in_place(net: torch.nn.Module, method: str, group_size: int | None, windows: torch.Tensor | None,
                      act_order: bool = False, alpha: float = 0.5) -> dict[str, Any]:
    """Replace the block Linears of `net` by their quantized form (the one place each method is applied);
    returns what was done (calibration time, AWQ's folds...)."""
    report: dict[str, Any] = {}
    if method in ("int8", "int4"):
        quantize_linears(net, 8 if method == "int8" else 4, group_size)
    elif method in ("fp8", "fp8_e5m2"):
        quantize_linears(net, fmt="fp8_e4m3" if method == "fp8" else "fp8_e5m2")
    elif method == "nf4":
        for name, lin in block_linears(net).items():
            replace_module(net, name, QuantizedLinear.from_linear(lin, "nf4", double_quant=True))
    else:
        t = time.perf_counter()
        stats = collect_stats(net, windows, hessian=method != "smoothquant")
        report["calibration_seconds"] = round(time.perf_counter() - t, 2)
        if method == "gptq":
            # act-order with static groups: no permutation to store (compressed-tensors' actorder "weight")
            codes = gptq_model(net, stats, bits=4, group_size=group_size, act_order=act_order,
                               static_groups=act_order)
        elif method == "awq":
            codes = awq_model(net, stats, bits=4, group_size=group_size)
        else:
            smooth_model(net, stats, alpha=alpha)  # 1/s folded into the norms, s into the weights
            codes = {n: quantize_w8a8(lin.weight) for n, lin in block_linears(net).items()}
        linears = block_linears(net)
        for name, qw in codes.items():
            lin = linears[name]
            fmt = "w8a8" if method == "smoothquant" else None
            replace_module(net, name, QuantLinear.from_weight(qw, lin.bias, fmt=fmt, method=method))
    left = [n for n in block_linears(net)]
    if left:
        raise LmstackError(f"{method} left {len(left)} block Linears unquantized, e.g. {left[0]}")
    return report


def quantize(model: str, out: str, method: Method = "int4", group_size: int | None = None, calib: str | None = None,
             calib_samples: int = 128, act_order: bool = False, alpha: float = 0.5,
             head: Head | None = None) -> dict[str, Any]:
    """Quantize a model directory's block Linears and write a quantized model directory.

    Args:
        model: Model directory to quantize (only read).
        out: New directory to write (must not exist, or be empty; not inside --model).
        method: int8, int4, nf4, fp8 (e4m3), fp8_e5m2, gptq (int4), awq (int4) or smoothquant (W8A8).
        group_size: Input columns per scale: int4/gptq/awq default 128, int8 default one scale per output channel.
            Must divide every Linear's in_features. nf4, fp8 and smoothquant take no group size.
        calib: Calibration text for gptq, awq and smoothquant: a .jsonl of {"text": ...} lines or a .txt file.
        calib_samples: Calibration windows of min(max_seq_len, 512) tokens.
        act_order: GPTQ only: quantize columns in order of decreasing Hessian diagonal (act-order / desc_act),
            with static groups, so the file stores no permutation (compressed-tensors' actorder "weight").
        alpha: SmoothQuant's migration strength (0: all difficulty stays on the activations, 1: all on weights).
        head: The LM head (and a tied embedding): int8 with one scale per row, or fp32 as it is. Default int8,
            except nf4, which keeps it.
    """
    start = time.perf_counter()
    if method not in Method.__args__:
        raise LmstackError(f"unknown --method {method!r}; choose one of {', '.join(Method.__args__)}")
    if group_size is not None and method in ("nf4", "fp8", "fp8_e5m2", "smoothquant"):
        raise LmstackError(f"--group-size does not apply to --method {method} (it has a fixed layout)")
    if act_order and method != "gptq":
        raise LmstackError("--act-order applies to --method gptq only")
    if calib_samples < 1:
        raise LmstackError(f"--calib-samples must be at least 1; got {calib_samples}")
    head = head or ("fp32" if method == "nf4" else "int8")
    if head not in Head.__args__:
        raise LmstackError(f"unknown --head {head!r}; choose one of {', '.join(Head.__args__)}")
    if head == "int8" and method == "nf4":
        raise LmstackError("--method nf4 keeps the LM head in float (QLoRA's storage covers block Linears); "
                           "drop --head int8")
    if not 0.0 <= alpha <= 1.0:
        raise LmstackError(f"--alpha must lie in [0, 1]; got {alpha}")
    model_dir, out_dir = Path(model), output_dir(Path(model), Path(out))
    if not model_dir.is_dir():
        raise LmstackError(f"model directory not found: {model_dir}")
    qc = quantization_config(model_dir)
    if qc is not None:
        made = (qc.get("lmstack") or {}).get("method") or qc.get("format")
        raise LmstackError(f"{model_dir} is already quantized ({made}, quantization_config in config.json); "
                           "quantize the original full-precision model instead")
    if method in CALIBRATED and calib is None:
        raise LmstackError(f"--method {method} needs calibration text: pass --calib FILE (a .jsonl of "
                           "{\"text\": ...} lines or a .txt file)")
    if method not in CALIBRATED and calib is not None:
        raise LmstackError(f"--calib is used by gptq, awq and smoothquant only; --method {method} takes no data")

    net = load_model(model_dir, lazy=False)  # eager: the weights are replaced, never a memory map of the input
    net.unfuse_projections()
    check_quantizable(net.config)
    g = group_size if group_size is not None else _default_group(method)
    bits = {"int4": 4, "gptq": 4, "awq": 4}.get(method, 8)
    for name, lin in block_linears(net).items():  # every layer checked before any work is done
        try:
            check_group(lin.in_features, g, bits)
        except LmstackError as e:
            raise LmstackError(f"--group-size for {name}: {e}") from None
    windows = None
    if method in CALIBRATED:
        try:
            tok = load_tokenizer(model_dir)
        except (LmstackError, OSError) as e:
            raise LmstackError(f"--calib text is tokenized with the model's tokenizer, which {model_dir} lacks "
                               f"({e})") from None
        length = min(net.config.max_seq_len, MAX_CALIB_LEN)
        windows = calibration_windows(tok, read_calibration_texts(calib), net.config.eos_token_id, length,
                                      calib_samples)
    report = quantize_in_place(net, method, g, windows, act_order=act_order, alpha=alpha)
    if head == "int8":
        quantize_head(net)
    mods = quantized_modules(net)
    head_mod = mods.pop("lm_head", None)  # the figures below are the block Linears'; the head's bytes apart
    quant_bytes = sum(m.storage_bytes() for m in mods.values())
    fp32_bytes = sum(m.fp32_bytes() for m in mods.values())

    def write(tmp: Path) -> None:
        save_quantized(net.eval(), tmp, method=method,
                       extra={"group_size": g, "act_order": act_order, "head": head,
                              "calib_samples": calib_samples if windows is not None else 0})
        keep_source_files(model_dir, tmp, net.config)

    publish_dir(out_dir, write)
    disk = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    written = {"out": str(out_dir), "method": method, "group_size": g, "head": head, "linears": len(mods),
               "bits_per_weight": round(8 * quant_bytes / (fp32_bytes / 4), 3), "linear_fp32_bytes": fp32_bytes,
               "linear_quantized_bytes": quant_bytes,
               "head_bytes": None if head_mod is None else head_mod.storage_bytes(), "safetensors_bytes": disk,
               "calib_tokens": 0 if windows is None else int(windows.numel()), **report,
               "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(written))
    return written


COMMANDS = quantize
