"""Reading back what transformers' Trainer saves for our model.

Trainer.save_model calls save_pretrained only on a PreTrainedModel; for any other nn.Module it writes
model.state_dict() to model.safetensors and nothing else, so there is no config.json. HFTrainerAdapter
(model/hf_trainer.py) therefore keeps our ModelConfig in its state dict, through PyTorch's own hook for
non-tensor state (get_extra_state): the key `_extra_state` holds the config's JSON as uint8 bytes. Such a
file describes itself, and lmstack.load_model reads it like any model directory. The weights keep our
tensor names under the adapter's `model.` prefix.

Usage:
    trainer.save_model("out")                   # Trainer(model=HFTrainerAdapter(model), ...)
    model = lmstack.load_model("out")           # goes through load_trainer_save
    # or write a full HF-layout directory instead: trainer.model.save_pretrained("out")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmstack.config import ConfigError, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.lazy_safetensors import CheckpointReader
from lmstack.model.load_guard import check_config_shapes, check_memory, resolve_inside
from lmstack.model.transformer import Transformer

CONFIG_KEY = "_extra_state"  # where nn.Module.state_dict puts get_extra_state()'s value
PREFIX = "model."            # the adapter holds our Transformer as its `model` attribute
MAX_CONFIG_BYTES = 1 << 20   # a config is a few KB; refuse to decode anything absurd


def encode_config(cfg: ModelConfig) -> torch.Tensor:
    """Our config as a uint8 tensor of its JSON, the one form safetensors can store."""
    data = json.dumps({"lmstack": to_dict(cfg)}, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_config(t: torch.Tensor, source: str) -> ModelConfig:
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_CONFIG_BYTES:
        raise LmstackError(f"{source}: tensor {CONFIG_KEY!r} is not an lmstack config (want a 1-D uint8 tensor "
                           f"of at most {MAX_CONFIG_BYTES} bytes, got {t.dtype} {tuple(t.shape)})")
    try:
        data = json.loads(bytes(t.tolist()).decode())
        return from_dict(ModelConfig, data["lmstack"])
    except (ValueError, KeyError, TypeError) as e:
        raise LmstackError(f"{source}: tensor {CONFIG_KEY!r} does not hold an lmstack config "
                           f"({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise LmstackError(f"{source}: {CONFIG_KEY}: {e}") from None


def is_trainer_save(path: str | os.PathLike) -> bool:
    """True for a directory with no config.json whose model.safetensors carries our config."""
    path = Path(path)
    if not path.is_dir() or resolve_inside(path, "config.json", "model config").exists():
        return False
    if not resolve_inside(path, "model.safetensors", "weights").exists():
        return False
    return CONFIG_KEY in CheckpointReader(path).keys()


def load_trainer_save(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                      device: str | torch.device = "cpu", max_model_gib: float | None = None) -> Transformer:
    """The Transformer in a Trainer-saved directory: built on the meta device, weights memory-mapped."""
    path = Path(path)
    source = str(path / "model.safetensors")
    reader = CheckpointReader(path)
    cfg = decode_config(reader.get(CONFIG_KEY), source)
    check_config_shapes(cfg, source)
    check_memory(cfg, dtype, max_model_gib, source)
    names = reader.keys() - {CONFIG_KEY}
    foreign = sorted(k for k in names if not k.startswith(PREFIX))
    if foreign:
        raise LmstackError(f"{source}: tensor {foreign[0]!r} is not under {PREFIX!r}, so this is not the state "
                           "dict of an HFTrainerAdapter")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    got = {k[len(PREFIX):] for k in names}
    missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the config does not use"
        raise LmstackError(f"{source}: the checkpoint {what}; its weights do not fit its own config")
    weights = {}
    for k, want in expected.items():
        t = reader.get(PREFIX + k)
        if tuple(t.shape) != tuple(want.shape):
            raise LmstackError(f"{source}: tensor {PREFIX + k!r} has shape {tuple(t.shape)} but the config "
                               f"needs {tuple(want.shape)}")
        weights[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(weights, assign=True, strict=True)
    model.materialize_buffers(device)
    return model.eval()
