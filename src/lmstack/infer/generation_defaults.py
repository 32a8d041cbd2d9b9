"""A model directory's generation_config.json -> the default sampling settings of generate, serve and chat.

One place reads the defaults a checkpoint ships with; every front end merges what the user gave over them:
`lmstack generate` flags, the server's request fields (/v1/completions and /v1/chat/completions) and
`lmstack chat` flags win whenever they are given, the model's defaults fill the rest, and SamplingParams'
own defaults fill what neither names.

Fields read (transformers' GenerationConfig names -> SamplingParams names):
    temperature -> temperature, top_p -> top_p, top_k -> top_k, repetition_penalty -> repetition_penalty,
    max_new_tokens -> max_tokens, do_sample: false -> temperature 0 (greedy, whatever temperature says).
A missing do_sample does not mean greedy here (it does in transformers' generate): like vLLM we take the
sampling fields the file states, because a file that names a temperature means it. Stop ids
(eos_token_id, possibly a list) are the engine's business (engine._eos_ids), not a sampling default.
A value of the wrong type or out of range is an error naming the file and the field.

Usage:
    from lmstack.infer.generation_defaults import load_generation_defaults, merge_sampling
    defaults = load_generation_defaults("runs/model")     # {} when the directory has no generation_config.json
    params = SamplingParams(**merge_sampling(defaults, {"temperature": None, "max_tokens": 8}))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError
from lmstack.infer.sampling_params import SamplingParams
from lmstack.model.load_guard import read_json, resolve_inside

# generation_config.json field -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
NAME = "generation_config.json"


def load_generation_defaults(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The SamplingParams keywords that model_dir/generation_config.json sets ({} without the file)."""
    if model_dir is None or not Path(model_dir).is_dir() or not resolve_inside(model_dir, NAME).exists():
        return {}
    data = read_json(model_dir, NAME, "generation config", want_object=True)
    return defaults_from_dict(data, source=str(Path(model_dir) / NAME))


def defaults_from_dict(data: dict, source: str = NAME) -> dict[str, Any]:
    """A generation_config dict -> SamplingParams keywords, validated by SamplingParams itself."""
    out: dict[str, Any] = {}
    for hf_name, name in FIELDS.items():
        value = data.get(hf_name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name in ("top_k", "max_tokens"):
            ok = ok and float(value) == int(value)
            value = int(value) if ok else value
        if not ok:
            raise LmstackError(f"{source}: {hf_name}={value!r:.40} must be a number")
        out[name] = value
    do_sample = data.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise LmstackError(f"{source}: do_sample={do_sample!r:.40} must be true or false")
    if do_sample is False:  # transformers' greedy search: the sampling knobs do nothing
        out["temperature"] = 0.0
        out.pop("top_p", None), out.pop("top_k", None)
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise LmstackError(f"{source}: {e}") from None
    return out


def merge_sampling(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """defaults, then every field of `given` that is not None on top (what the user said wins)."""
    merged = dict(defaults)
    merged.update({k: v for k, v in given.items() if v is not None})
    return merged
