"""Saving arbitrary nested training state (optimizer, RNG, loader) as safetensors + JSON, never pickle.

An optimizer's state_dict is a tree of dicts, lists and tuples whose leaves are tensors or plain
Python values (ints used as dict keys, floats, bools, strings, None). `flatten` splits such a tree
into {path: tensor} for safetensors and a JSON skeleton that records the containers, key types and
where each tensor goes; `unflatten` puts the identical tree back, so `load_state_dict` sees exactly
what `state_dict` gave.

Usage:
    tensors, skeleton = flatten(optimizer.state_dict())
    save_tree(optimizer.state_dict(), "ckpt/optimizer")       # optimizer.safetensors + optimizer.json
    optimizer.load_state_dict(load_tree("ckpt/optimizer"))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = path or "root"
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, dict):
            # keys keep their type (optimizer state is keyed by int parameter ids)
            return {"__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise LmstackError(f"cannot save a {type(node).__name__} at {path!r} in training state (tensors and plain values only)")

    return tensors, walk(tree, "")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise LmstackError("corrupt training-state skeleton: unknown container")
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_tree(tree: Any, stem: str | os.PathLike) -> list[Path]:
    """Write stem.safetensors and stem.json atomically; returns the files written."""
    stem = Path(stem)
    tensors, skeleton = flatten(tree)
    tmp = stem.with_name(stem.name + ".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, stem.with_suffix(".safetensors"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(skeleton))
    return [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]


def load_tree(stem: str | os.PathLike) -> Any:
    """The tree save_tree wrote; LmstackError naming the file (never its contents) if it cannot be rebuilt."""
    stem = Path(stem)
    try:
        skeleton = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        why = e.strerror if isinstance(e, OSError) else f"{e.msg} at line {e.lineno}" \
            if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise LmstackError(f"cannot read training state {stem.with_suffix('.json')}: {why}") from None
    try:
        tensors = load_file(str(stem.with_suffix(".safetensors")))
    except Exception as e:  # safetensors raises its own error types
        raise LmstackError(f"cannot read training state {stem.with_suffix('.safetensors')}: "
                           f"{type(e).__name__}") from None
    try:
        return unflatten(skeleton, tensors)
    except (LmstackError, KeyError, TypeError, ValueError, RecursionError) as e:  # a skeleton that does not fit
        raise LmstackError(f"corrupt training-state skeleton in {stem.with_suffix('.json')}: "
                           f"{type(e).__name__}") from None
