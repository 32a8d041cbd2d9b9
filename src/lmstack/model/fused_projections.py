"""Fused projections: one qkv_proj Linear for attention's q/k/v, one gate_up_proj for a gated MLP's gate/up.

Projections that read the same input can run as one matmul over their stacked weights: q rows, then k,
then v; gate rows, then up. That is Phi-3's checkpoint layout, and fewer, larger matmuls cost less per
op, which matters most when decoding one token at a time. The numbers are the same as the split layout's
(each output row is the same dot product), so ModelConfig.fused_projections is a storage choice only.

- FusedLinear is an nn.Linear that also knows its parts, [("q_proj", rows), ("k_proj", rows), ...], so a
  serving LoRA hook (infer/lora_hook.py) can apply a q_proj adapter to the q rows of the output.
- Quantized parts (compress.qlinear.QuantLinear) fuse too: their class stacks its codes by rows (cat_rows).
- fuse_module / unfuse_module convert one Attention or MLP in place, without keeping a second copy of the
  weights (Transformer.fuse_projections / unfuse_projections walk the model).
- split_fused_state and fused_key_parts map state-dict keys between the layouts (HF export and import).

Usage:
    model.fuse_projections()                  # in place; model.config.fused_projections becomes True
    state = split_fused_state(model.state_dict())   # the split layout's keys and tensors
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.linear import Linear

# fused module name -> its parts, in row order
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FusedLinear(Linear):
    """nn.Linear whose output rows are the concatenated outputs of named parts."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool = True, **kw):
        super().__init__(in_features, sum(rows for _, rows in parts), bias=bias, **kw)
        self.parts = tuple(parts)

    def split_sizes(self) -> list[int]:
        return [rows for _, rows in self.parts]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", parts=" + "+".join(f"{name}:{rows}" for name, rows in self.parts)


def _plain_linear(module: nn.Module, name: str) -> nn.Linear:
    if type(module) not in (nn.Linear, Linear):
        raise LmstackError(f"cannot fuse {name}: it is a {type(module).__name__}, not a plain nn.Linear "
                           "(fuse before quantizing or attaching adapters)")
    if module._forward_hooks or module._forward_pre_hooks:
        raise LmstackError(f"cannot fuse {name}: it has forward hooks (an adapter or a LoRA serving hook), "
                           "which would be lost; fuse before attaching them")
    return module


def _row_stackable(parts: list[nn.Module]) -> bool:
    """Quantized parts that stack by rows themselves: one class with `rows_fusable` / `cat_rows` (QuantLinear
    in compress/qlinear.py; duck-typed so the model layer does not import compress), no hooks."""
    kind = type(parts[0])
    return (all(type(p) is kind and not p._forward_hooks and not p._forward_pre_hooks for p in parts)
            and hasattr(kind, "cat_rows") and kind.rows_fusable(parts))


def fuse_module(module: nn.Module, fused_name: str, prefix: str = "") -> None:
    """Replace module's part Linears (e.g. q_proj, k_proj, v_proj) by one FusedLinear `fused_name` (or, for
    quantized parts, the one quantized layer their class stacks them into)."""
    names = FUSED_PARTS[fused_name]
    found = [getattr(module, n) for n in names]
    if type(found[0]) not in (nn.Linear, Linear) and _row_stackable(found):
        fused = type(found[0]).cat_rows(list(zip(names, found)))
        for n in names:
            setattr(module, n, None)
        setattr(module, fused_name, fused)
        return
    parts = [_plain_linear(m, f"{prefix}{n}") for n, m in zip(names, found)]
    with_bias = [p.bias is not None for p in parts]
    if len(set(with_bias)) != 1:
        raise LmstackError(f"cannot fuse {prefix}{'/'.join(names)}: some have a bias and some do not")
    first = parts[0].weight
    fused = FusedLinear(parts[0].in_features, [(n, p.out_features) for n, p in zip(names, parts)],
                        bias=with_bias[0], device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=first.requires_grad)
    if with_bias[0]:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=first.requires_grad)
    for n in names:
        setattr(module, n, None)  # the parts' tensors are freed once nothing else holds them
    setattr(module, fused_name, fused)


def unfuse_module(module: nn.Module, fused_name: str, prefix: str = "") -> None:
    """Replace module's FusedLinear `fused_name` by its part Linears (each its own storage, safetensors-safe)."""
    fused = getattr(module, fused_name)
    if not isinstance(fused, FusedLinear):
        raise LmstackError(f"cannot unfuse {prefix}{fused_name}: it is a {type(fused).__name__}, not a FusedLinear")
    w = fused.weight.detach()
    b = fused.bias.detach() if fused.bias is not None else None
    row = 0
    for name, rows in fused.parts:
        lin = Linear(fused.in_features, rows, bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w[row:row + rows].clone(), requires_grad=fused.weight.requires_grad)
        if b is not None:
            lin.bias = nn.Parameter(b[row:row + rows].clone(), requires_grad=fused.weight.requires_grad)
        setattr(module, name, lin)
        row += rows
    setattr(module, fused_name, None)


_FUSED_KEY = re.compile(r"^(.*)\.(qkv_proj|gate_up_proj)\.(weight|bias)$")


def part_rows(cfg, fused_name: str, d_ff: int | None = None) -> list[int]:
    """Rows of each part of a fused projection under config cfg (d_ff: an MLP's own width, e.g. shared experts)."""
    if fused_name == "qkv_proj":
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    f = d_ff or cfg.d_ff
    return [f, f]


def split_fused_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The split layout of a state dict: each qkv_proj / gate_up_proj tensor becomes its parts, in place
    in the key order. Other keys pass through. (A gate_up_proj always splits into two equal halves.)"""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _FUSED_KEY.match(key)
        if m is None:
            out[key] = t
            continue
        prefix, fused_name, kind = m.groups()
        rows = part_rows(cfg, fused_name, t.shape[0] // 2 if fused_name == "gate_up_proj" else None)
        if sum(rows) != t.shape[0]:
            raise LmstackError(f"{key} has {t.shape[0]} rows, but the config's sizes give {sum(rows)}")
        for name, piece in zip(FUSED_PARTS[fused_name], t.split(rows)):
            out[f"{prefix}.{name}.{kind}"] = piece
    return out


def fused_key_parts(key: str) -> list[str] | None:
    """['blocks.0.attn.q_proj.weight', ...] for a fused key 'blocks.0.attn.qkv_proj.weight'; None otherwise."""
    m = _FUSED_KEY.match(key)
    if m is None:
        return None
    prefix, fused_name, kind = m.groups()
    return [f"{prefix}.{name}.{kind}" for name in FUSED_PARTS[fused_name]]


def projections_fusable(model: nn.Module) -> bool:
    """Whether model.fuse_projections() would run: split projections that are all plain, hook-free Linears
    holding ordinary tensors (not adapted, not tensor-parallel shards), or quantized layers of one layout."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "fuse_projections") or cfg.fused_projections:
        return False
    if cfg.attention == "lsh" and cfg.lsh_shared_qk:
        return False
    for module in model.modules():
        for fused_name, names in FUSED_PARTS.items():
            parts = [getattr(module, n, None) for n in names]
            if fused_name == "gate_up_proj" and parts[0] is None:
                continue  # a plain (ungated) MLP keeps its up_proj
            if not any(p is not None for p in parts) or not hasattr(module, fused_name):
                continue
            if type(parts[0]) not in (nn.Linear, Linear) and _row_stackable(parts):
                continue  # quantized parts of one layout (QuantLinear.cat_rows)
            for p in parts:
                if (type(p) not in (nn.Linear, Linear) or p._forward_hooks or p._forward_pre_hooks
                        or type(p.weight.data) is not torch.Tensor):
                    return False
    return True
