"""AdapterFusion (Pfeiffer et al. 2021): learn to combine several trained, frozen bottleneck adapters per layer.

After each attention and each MLP sublayer, every source adapter i turns the sublayer output h into its own
output z_i = adapter_i(h) (a Houlsby adapter: h + up(gelu(down(h)))). A small attention then mixes them per
token: the query comes from h, the keys and values from the z_i,
    a = softmax((h Wq) . (z_i Wk) / temperature over i),   out = sum_i a_i (z_i Wv).
Only Wq, Wk, Wv (with biases) train; the source adapters and the base stay frozen. As in the paper, Wv starts
at the identity (so out is a convex mix of the adapters' outputs) and Wq, Wk start small, so training starts
from the uniform average of the source adapters.

The source adapters are named in `AdapterConfig.fusion_adapters`, each either
- the name of a bottleneck adapter already on the model (added with method "adapter"), or
- a directory written by `lmstack finetune --method adapter` (its adapter/ folder), loaded here.
The fusion becomes a named adapter like any other: set_adapter(model, "fusion") runs it (the source adapters
then do not also run on their own); `slot.force` pins the attention (e.g. one-hot) for ablations.

Trainable parameters per fusion: 2 * n_layers * 3 * (d_model^2 + d_model).

Usage:
    from lmstack.adapt import AdapterConfig, add_adapter, get_peft_model
    model = get_peft_model(base, AdapterConfig(method="fusion", fusion_adapters=["runs/qa/adapter", "runs/ar/adapter"]))
    lmstack finetune --method fusion --adapter.fusion_adapters '[runs/qa/adapter, runs/ar/adapter]' --data ... --model ...
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmstack.adapt.bottleneck import AdapterSlot, add_bottleneck
from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.finetune import TRAINABLE_CONFIG, TRAINABLE_WEIGHTS
from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError
from lmstack.model.load_guard import load_safetensors, read_json, resolve_inside


class Fusion(nn.Module):
    """The attention over adapter outputs of one sublayer."""

    def __init__(self, d_model: int, sources: list[str], temperature: float = 1.0):
        super().__init__()
        self.sources = list(sources)
        self.temperature = temperature
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)  # near-uniform attention at the start
            nn.init.zeros_(lin.bias)
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def attention(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(..., N) weights over the N adapter outputs z (..., N, d) for the sublayer output h (..., d)."""
        q = self.query(h).unsqueeze(-2)                        # (..., 1, d)
        scores = (q * self.key(z)).sum(-1) / self.temperature  # (..., N)
        return torch.softmax(scores, dim=-1)

    def forward(self, h: torch.Tensor, z: torch.Tensor, force: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(h, z) if force is None else force.to(h.dtype).expand(*h.shape[:-1], -1)
        return (a.unsqueeze(-1) * self.value(z)).sum(-2)


class FusionSlot(Switchable):
    """The named fusions behind one sublayer; it reads the source adapters from the AdapterSlot beside it."""

    store_name = "fusions"

    def __init__(self, adapters: AdapterSlot):
        super().__init__()
        self.fusions = nn.ModuleDict()
        object.__setattr__(self, "_adapters", adapters)  # a reference, not a second owner of those weights
        self.force: torch.Tensor | None = None
        self.last_attention: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        names = self.acting()
        if not names:
            return None
        for name in names:
            fusion = self.fusions[name]
            z = torch.stack([self._adapters.adapters[s](out) for s in fusion.sources], dim=-2)
            if self.force is None and not self.training:
                self.last_attention = fusion.attention(out, z).detach()  # for inspection: which adapter is used
            out = fusion(out, z, self.force)
        return out


def _load_source(model: nn.Module, path: Path, name: str) -> int:
    """Add the bottleneck adapter saved in `path` (lmstack finetune --method adapter) as `name`; its width."""

    meta_path = resolve_inside(path, TRAINABLE_CONFIG, "adapter config")  # stays inside the folder (issue 15)
    if not meta_path.is_file():
        raise LmstackError(f"fusion_adapters: {path} holds no {TRAINABLE_CONFIG}; give the adapter/ folder of a "
                           "`lmstack finetune --method adapter` run, or the name of an adapter on the model")
    meta = read_json(path, TRAINABLE_CONFIG, "adapter config")
    if not isinstance(meta, dict):
        raise LmstackError(f"fusion_adapters: {meta_path} must hold a JSON object")
    if meta.get("method") != "adapter":
        raise LmstackError(f"fusion_adapters: {path} holds a {meta.get('method')!r} adapter; fusion combines "
                           "bottleneck adapters (method 'adapter') only")
    src = AdapterConfig(**meta["adapter"])
    add_bottleneck(model, src, name)
    saved = load_safetensors(path, TRAINABLE_WEIGHTS, "adapter weights")
    mine = {n: p for n, p in model.named_parameters() if f".adapters.{name}." in n}
    renamed = {}
    for key, tensor in saved.items():
        parts = key.split(".")
        if "adapters" not in parts:
            raise LmstackError(f"fusion_adapters: unexpected tensor {key!r} in {path}")
        i = parts.index("adapters")
        parts[i + 1] = name
        renamed[".".join(parts)] = tensor
    if set(renamed) != set(mine) or any(renamed[k].shape != mine[k].shape for k in mine):
        raise LmstackError(f"fusion_adapters: the adapter in {path} does not fit this model "
                           f"(made for {meta.get('base_model_name_or_path')!r})")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(renamed[k])
    model.adapter_configs[name] = src
    return src.bottleneck_dim


@register_method("fusion")
def add_fusion(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a fusion named `adapter_name` over cfg.fusion_adapters after every attention and MLP sublayer."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmstackError("AdapterFusion needs an lmstack Transformer (with .blocks)")
    if len(cfg.fusion_adapters) < 2:
        raise LmstackError(f"fusion_adapters must name at least 2 bottleneck adapters, got {cfg.fusion_adapters}")
    ensure_sync(model)
    configs = model.adapter_configs
    sources = []
    for i, entry in enumerate(cfg.fusion_adapters):
        if entry in configs:
            if configs[entry].method != "adapter":
                raise LmstackError(f"fusion_adapters: {entry!r} is a {configs[entry].method!r} adapter; fusion "
                                   "combines bottleneck adapters (method 'adapter') only")
            sources.append(entry)
        elif Path(entry).is_dir():
            name = f"{adapter_name}_src{i}"
            _load_source(model, Path(entry), name)
            sources.append(name)
        else:
            raise LmstackError(f"fusion_adapters: {entry!r} is neither an adapter on the model "
                               f"({sorted(configs) or 'none'}) nor a directory")
    ref = next(model.parameters())
    d_model = model.config.d_model
    for block in blocks:
        for attr, sublayer in (("adapters_attn", block.attn), ("adapters_mlp", block.mlp)):
            adapters = getattr(block, attr)
            for s in sources:
                for p in adapters.adapters[s].parameters():
                    p.requires_grad_(False)  # the source adapters stay as they were trained
            fattr = "fusion_" + attr.split("_")[1]
            slot = getattr(block, fattr, None)
            if slot is None:
                slot = FusionSlot(adapters)
                setattr(block, fattr, slot)
                sublayer.register_forward_hook(slot.hook)  # after the AdapterSlot's hook
            slot.fusions[adapter_name] = Fusion(d_model, sources, cfg.fusion_temperature).to(
                device=ref.device, dtype=ref.dtype)


def fusion_slots(model: nn.Module) -> list[FusionSlot]:
    return [m for m in model.modules() if isinstance(m, FusionSlot)]


def count_fusion_params(d_model: int, n_layers: int) -> int:
    """Trainable parameters of one fusion: three d x d projections with biases per sublayer, two per block."""
    return 2 * n_layers * 3 * (d_model * d_model + d_model)
