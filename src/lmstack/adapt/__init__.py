"""Fine-tuning (issue 8): parameter-efficient methods, adapter operations, PEFT files, SFT.

Every method registers itself in METHODS when its module is imported; this package imports them
all, skipping any that is not there yet, so `METHODS` lists what is available.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model, trainable_report, merge_adapter, save_adapter
    model = get_peft_model(model, AdapterConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"]))
    ... train with the ordinary loop ...
    save_adapter(model, "out/adapter", base_model_dir="base/")   # PEFT files
    apply_adapter(fresh, "out/adapter")                          # onto another copy of the base
    served = load_serving_adapter(base, "out/adapter")          # for LLM(base, lora_adapters={...})
    merge_adapter(model)                                          # fold B A into the base weights
"""
from __future__ import annotations

import importlib

from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.registry import METHODS, add_adapter, find_targets, get_peft_model, register_method, trainable_report

# Method modules register themselves on import. A module another helper has not written yet is skipped;
# an error inside an existing module is not hidden.
for _name in ("lora", "dora", "qlora", "prefix", "prompt", "bottleneck", "ia3", "hyper", "sparse", "meta",
              "fusion", "compacter"):
    try:
        importlib.import_module(f"lmstack.adapt.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"lmstack.adapt.{_name}":
            raise

from lmstack.adapt.merge import merge_adapter, merge_and_unload, unmerge_adapter  # noqa: E402
from lmstack.adapt.multi import (add_weighted_adapter, delete_adapter, disable_adapters,  # noqa: E402
                                 set_adapter)
from lmstack.adapt.peft_format import apply_adapter, save_adapter  # noqa: E402
from lmstack.adapt.serving import load_serving_adapter  # noqa: E402

__all__ = [
    "AdapterConfig", "METHODS", "register_method", "add_adapter", "get_peft_model", "find_targets",
    "trainable_report", "merge_adapter", "unmerge_adapter", "merge_and_unload", "set_adapter",
    "disable_adapters", "delete_adapter", "add_weighted_adapter", "save_adapter", "apply_adapter",
    "load_serving_adapter",
]
