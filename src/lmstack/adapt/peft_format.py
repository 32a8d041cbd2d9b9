"""Save and load LoRA/DoRA adapters in PEFT's file format, named for the HF-exported base model.

A directory holds adapter_config.json (PEFT's LoraConfig fields) and adapter_model.safetensors with
PEFT's keys, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (and
"...lora_magnitude_vector" for DoRA). Names refer to the HF model that lmstack.save_model exports,
so `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)` loads it;
lmstack module names ("blocks.0.attn.q_proj") are mapped through the same tables as the model export.
adapter_config.json also keeps an "lmstack" entry: the base model's name and the (out, in) shape of every
adapted module, so loading onto a different base is refused with a message naming the right base
(peft ignores the entry, with a warning about unknown keys).

Usage:
    save_adapter(model, "out/adapter", base_model_dir="out/base")   # adapter "default"
    apply_adapter(model, "out/adapter", adapter_name="math")         # onto a fresh lmstack model
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import re
import tempfile

from safetensors import SafetensorError
from safetensors.torch import save_file
import torch
from torch import nn

from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.dora import init_magnitude
from lmstack.adapt.layers import AdapterLinear
from lmstack.adapt.lora import adapter_layers, wrap_linear
from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.hf_convert import _rename
from lmstack.model.load_guard import load_safetensors, read_json, resolve_inside

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def hf_module_name(model: nn.Module, name: str) -> tuple[str, bool]:
    """(HF module path, fan_in_fan_out) of lmstack Linear `name`, as lmstack's HF export names it."""

    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "hf_model_type", None)
    if mt is None:
        raise LmstackError("the PEFT format names modules after the HF export; this model has no HF model type")
    if mt == "gpt2" and re.fullmatch(r"blocks\.\d+\.attn\.[qkv]_proj", name):
        raise LmstackError(f"{name}: gpt2 stores q, k and v fused in one c_attn layer, so a LoRA on one of them "
                           "has no PEFT name; target o_proj, up_proj or down_proj instead")
    if mt == "phi3" and re.fullmatch(r"blocks\.\d+\.(attn\.[qkv]_proj|mlp\.(gate|up)_proj)", name):
        raise LmstackError(f"{name}: phi3 stores q, k and v fused in qkv_proj and gate and up in gate_up_proj, so a "
                           "LoRA on one of them has no PEFT name; target o_proj or down_proj instead")
    renamed = _rename(mt, name + ".weight")
    if renamed is None:
        raise LmstackError(f"lmstack module {name!r} has no counterpart in a {mt} HF model")
    hf, transpose = renamed
    return hf[: -len(".weight")], transpose


def base_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "name", "") or f"{getattr(cfg, 'hf_model_type', 'lmstack')} (unnamed)"


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_dir: str | None = None) -> Path:
    """Write adapter `adapter_name` of `model` as a PEFT directory; returns the path."""
    configs = getattr(model, "adapter_configs", {})
    layers = {n: layer for n, layer in adapter_layers(model).items() if adapter_name in layer.kind}
    if not layers:
        raise LmstackError(f"the model has no LoRA/DoRA adapter named {adapter_name!r}; it has {sorted(configs)}")
    cfg = configs.get(adapter_name) or AdapterConfig()
    kinds = {layer.kind[adapter_name] for layer in layers.values()}
    tensors, shapes, targets, ranks, alphas, fan_in_fan_out = {}, {}, [], {}, {}, False
    for name, layer in layers.items():
        hf, transpose = hf_module_name(model, name)
        fan_in_fan_out |= transpose
        key = PREFIX + hf
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        tensors[key + ".lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[key + ".lora_B.weight"] = b.detach().float().contiguous().cpu()
        if layer.kind[adapter_name] == "dora":
            tensors[key + ".lora_magnitude_vector"] = layer.lora_magnitude[adapter_name].detach().float().contiguous().cpu()
        r = a.shape[0]
        alpha = layer.scaling[adapter_name] * (r ** 0.5 if cfg.use_rslora else r)
        if r != cfg.r:  # per-module rank, e.g. after add_weighted_adapter
            ranks[re.escape(hf)] = r
        if abs(alpha - cfg.alpha) > 1e-6 * max(1.0, cfg.alpha):
            alphas[re.escape(hf)] = alpha
        shapes[hf] = [layer.out_features, layer.in_features]
        targets.append(hf)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora, "use_dora": kinds == {"dora"},
        "target_modules": targets, "rank_pattern": ranks, "alpha_pattern": alphas, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": base_model_dir,
        "lmstack": {"base_model": base_name(model), "method": cfg.method, "base_shapes": shapes},
    }
    if len(kinds) > 1:
        raise LmstackError(f"adapter {adapter_name!r} mixes kinds {sorted(kinds)}; PEFT files hold one kind")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT LoRA directory; errors name the file."""

    path = Path(path)
    # an untrusted directory: its files must stay inside it, and errors quote no file bytes (issue 15)
    cfg_file = resolve_inside(path, CONFIG_FILE, "adapter config")
    weights_file = resolve_inside(path, WEIGHTS_FILE, "adapter weights")
    if not cfg_file.is_file():
        raise LmstackError(f"{path} is not a PEFT adapter directory: {CONFIG_FILE} is missing")
    config = read_json(path, CONFIG_FILE, "adapter config")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LmstackError(f"{cfg_file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                           "only LORA adapters (LoRA, rsLoRA, DoRA) can be loaded")
    if not weights_file.is_file():
        raise LmstackError(f"{path} has no {WEIGHTS_FILE} (pickled adapter_model.bin files are not read)")
    try:
        tensors = load_safetensors(path, WEIGHTS_FILE, "adapter weights")
    except LmstackError as e:
        raise LmstackError(f"{WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    except (SafetensorError, OSError) as e:
        raise LmstackError(f"{weights_file} is not a readable safetensors file: {type(e).__name__}") from None
    return config, tensors


def _pattern_value(patterns: dict, hf: str, default):
    # PEFT's rule: a pattern key matches a module whose name ends with it (at a dot boundary).
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf):
            return value
    return default


def adapter_weights(model: nn.Module, path: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """Read a PEFT adapter and map it onto `model`'s modules, checking every shape.

    Returns (config, {lmstack module name: {"A", "B", "magnitude" (or None), "scale"}})."""
    config, tensors = read_adapter(path)
    by_hf = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) or (isinstance(module, nn.Linear) and not name.endswith(".base_layer")):
            try:
                by_hf[hf_module_name(model, name)[0]] = name
            except LmstackError:
                continue
    meta = config.get("lmstack") or {}
    made_for = meta.get("base_model") or config.get("base_model_name_or_path") or "an unrecorded base model"
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if m is None:
            raise LmstackError(f"{path}: tensor {key!r} is not a LoRA weight this loader understands")
        grouped.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = t
    out = {}
    for hf, parts in grouped.items():
        if hf not in by_hf:
            raise LmstackError(f"adapter {path} was made for {made_for}: it adapts {hf!r}, which this model "
                               f"({base_name(model)}) does not have")
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LmstackError(f"{path}: {hf} lacks lora_A or lora_B")
        name = by_hf[hf]
        module = model.get_submodule(name)
        a, b = parts["lora_A"], parts["lora_B"]
        want = (module.out_features, module.in_features)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != want:
            raise LmstackError(f"adapter {path} was made for {made_for}, whose {hf} is "
                               f"{meta.get('base_shapes', {}).get(hf, [b.shape[0], a.shape[1]])} (out, in); this "
                               f"model ({base_name(model)}) has {list(want)} there: a different base model")
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), hf, config.get("lora_alpha", 8)))
        scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
        out[name] = {"A": a, "B": b, "magnitude": parts.get("lora_magnitude_vector"), "scale": scale}
    if not out:
        raise LmstackError(f"{path}/{WEIGHTS_FILE} holds no LoRA weights")
    return config, out


@torch.no_grad()
def apply_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                  is_trainable: bool = False) -> nn.Module:
    """Add the PEFT adapter at `path` to `model` as adapter `adapter_name`. As in peft, the base is frozen, and
    so is the adapter unless is_trainable. The first adapter on a model becomes active (set_adapter switches)."""
    config, weights = adapter_weights(model, path)
    if adapter_name in getattr(model, "adapter_configs", {}):
        raise LmstackError(f"the model already has an adapter named {adapter_name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    before = [n for n in getattr(model, "active_adapters", []) if n in getattr(model, "adapter_configs", {})]
    dora = bool(config.get("use_dora"))
    for name, w in weights.items():
        layer = wrap_linear(model, name)
        layer.add_lora(adapter_name, r=w["A"].shape[0], scale=w["scale"], dropout=float(config.get("lora_dropout", 0.0)),
                       kind="dora" if dora else "lora")
        ref = layer.lora_A[adapter_name].weight
        layer.lora_A[adapter_name].weight.copy_(w["A"].to(ref))
        layer.lora_B[adapter_name].weight.copy_(w["B"].to(ref))
        if dora:
            init_magnitude(layer, adapter_name)
            if w["magnitude"] is not None:
                layer.lora_magnitude[adapter_name].copy_(w["magnitude"].to(ref))
        for p in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
            p.requires_grad_(is_trainable)
        if dora:
            layer.lora_magnitude[adapter_name].requires_grad_(is_trainable)
    if before:  # keep what the model computes: a loaded adapter waits for set_adapter, like add_adapter's
        for layer in adapter_layers(model).values():
            layer.active_adapters = [n for n in before if n in layer.kind]
    else:
        model.active_adapters = [adapter_name]
    if not hasattr(model, "adapter_configs"):
        model.adapter_configs = {}
    r = int(config.get("r", 8))
    model.adapter_configs[adapter_name] = AdapterConfig(
        method="dora" if dora else "lora", r=r, alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora", False)),
        target_modules=list(weights))
    return model
