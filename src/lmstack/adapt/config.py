"""AdapterConfig: one dataclass that configures every fine-tuning method of lmstack.adapt.

Each method (a key of lmstack.adapt.METHODS) reads only the fields it needs; the rest keep their
safe defaults. Values are checked in __post_init__, and errors name the field and the allowed values.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    cfg = AdapterConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, cfg)          # base frozen, LoRA added on q_proj and v_proj
    cfg = AdapterConfig.from_dict({"method": "qlora", "quant": "nf4"})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmstack.config import ConfigError, from_dict, to_dict
from lmstack.runtime.validation import check_choice, check_int, check_number

METHOD_NAMES = ("full", "lora", "dora", "qlora", "prefix", "prompt", "adapter", "ia3", "hyper", "sparse", "fusion",
                "compacter")
QUANT_KINDS = ("int8", "nf4")


@dataclass
class AdapterConfig:
    method: str = "lora"
    """Fine-tuning method, a key of lmstack.adapt.METHODS:
    full|lora|dora|qlora|prefix|prompt|adapter|ia3|hyper|sparse|fusion|compacter."""
    r: int = 8
    """LoRA/DoRA/QLoRA rank: the inner width of the low-rank update B @ A."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input during training, in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Which Linears get adapters: a module-name suffix ("q_proj", "attn.q_proj") or a regex matched with
    re.fullmatch against the full name ("blocks\\.[01]\\.mlp\\..*"). Patterns that match nothing are an error."""
    quant: str = "nf4"
    """QLoRA base-weight storage: int8 (per-output-channel absmax) or nf4 (4-bit NormalFloat, block 64)."""
    double_quant: bool = True
    """QLoRA nf4: quantize the per-block absmax constants again (8-bit, blocks of 256) to save memory."""
    num_virtual_tokens: int = 16
    """Prefix / prompt tuning: number of learned virtual tokens."""
    prefix_projection: bool = False
    """Prefix tuning: reparameterise the prefixes through a small MLP (Li & Liang 2021)."""
    prefix_hidden: int = 128
    """Prefix tuning: hidden width of the reparameterisation MLP."""
    bottleneck_dim: int = 32
    """Houlsby and Compacter adapters: width of the bottleneck."""
    fusion_adapters: list[str] = field(default_factory=list)
    """AdapterFusion: the trained bottleneck adapters to combine (at least 2): names of adapters on the model, or
    adapter/ folders written by `lmstack finetune --method adapter`."""
    fusion_temperature: float = 1.0
    """AdapterFusion: softmax temperature of the attention over the adapters."""
    phm_dim: int = 4
    """Compacter: n, the number of Kronecker products (and the size of the shared n x n rules); divides d_model."""
    phm_rank: int = 1
    """Compacter: rank r of each per-layer factor B_i = s_i t_i."""
    layers_to_train: list[int] | None = None
    """Sparse fine-tuning: indices of the blocks to train (None = all)."""
    experts_to_train: list[int] | None = None
    """Sparse fine-tuning: indices of the MoE experts to train (None = all)."""
    freeze_first_n: int = 0
    """Adaptive layer freezing: keep the first N blocks frozen."""
    task_embedding_dim: int = 16
    """Hypernetwork adaptation: width of the learned task embedding."""
    n_tasks: int = 1
    """Hypernetwork adaptation: number of tasks the hypernetwork serves."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHOD_NAMES)
        check_choice("quant", self.quant, QUANT_KINDS)
        for name in ("r", "num_virtual_tokens", "prefix_hidden", "bottleneck_dim", "task_embedding_dim", "n_tasks",
                     "phm_dim", "phm_rank"):
            check_int(name, getattr(self, name), low=1)
        check_int("freeze_first_n", self.freeze_first_n, low=0)
        self.alpha = check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_number("fusion_temperature", self.fusion_temperature, low=0, low_open=True)
        if isinstance(self.fusion_adapters, str):
            self.fusion_adapters = [self.fusion_adapters]
        if not isinstance(self.fusion_adapters, (list, tuple)) or not all(
                isinstance(a, str) and a for a in self.fusion_adapters):
            raise ConfigError(f"fusion_adapters={self.fusion_adapters!r} is not allowed; it must be a list of adapter "
                              "names or directories")
        self.fusion_adapters = list(self.fusion_adapters)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"target_modules={self.target_modules!r} is not allowed; it must be a list of "
                              "non-empty name suffixes or regexes")
        self.target_modules = list(self.target_modules)
        for name in ("layers_to_train", "experts_to_train"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                raise ConfigError(f"{name}={value!r} is not allowed; it must be None or a list of integers >= 0")
            setattr(self, name, list(value))

    @property
    def scale(self) -> float:
        """The LoRA update's multiplier: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
