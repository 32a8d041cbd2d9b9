"""load_model / save_model: HF-layout model directories in and out.

A model directory holds config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and, when a tokenizer is given, tokenizer.json. Models of the families HF
knows (llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, phi3, gpt2, bert) are written with HF names and config, so
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads them; lmstack_config.json keeps our
full config beside it. Any other config is written in lmstack's own naming (model_type "lmstack").

Loading is lazy by default: the model is built on the meta device (no memory, no init) and its
parameters become memory-mapped views of the safetensors files (see lazy_safetensors.py).

Usage:
    model = load_model("hf_dir")                   # fp32 on CPU by default
    model = load_model("hf_dir", dtype=torch.bfloat16, device="cuda")
    save_model(model, "out_dir", tokenizer=tok)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import re
import tempfile
from typing import Any

from safetensors.torch import load_file, save_file
import torch

from lmstack.config import ConfigError, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError, gguf_unsupported
from lmstack.model.config import ModelConfig
from lmstack.model.lazy_safetensors import CheckpointReader
from lmstack.model.hf_convert import (EXPORTABLE, config_from_hf, config_to_hf, hf_field_names, ignored_hf_keys,
                                      weights_from_hf, weights_to_hf)
from lmstack.model.load_guard import check_config_shapes, check_memory, read_json, resolve_inside
from lmstack.model.trainer_save import is_trainer_save, load_trainer_save
from lmstack.model.transformer import Transformer
from lmstack.runtime.device import resolve_dtype

LMSTACK_CONFIG = "lmstack_config.json"


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, bool]:
    """(config, uses HF tensor names) for a model directory.

    The directory is untrusted: config files must stay inside it (load_guard.resolve_inside), and shapes
    beyond load_guard.SHAPE_LIMITS are refused here, before anything is built."""
    return _read_config(Path(path))[:2]


def _read_config(path: Path) -> tuple[ModelConfig, bool, str, dict[str, str]]:
    """(config, HF names?, the file it came from, lmstack field -> that file's key) for messages."""
    if path.suffix.lower() == ".gguf":
        raise LmstackError(gguf_unsupported(path))
    if not path.is_dir():
        raise LmstackError(f"model directory not found: {path}")
    cfg_file = resolve_inside(path, "config.json", "model config")
    if not cfg_file.exists():
        hint = ""
        if resolve_inside(path, "model.safetensors", "weights").exists():  # what Trainer.save_model leaves
            hint = ("; transformers' Trainer saves only the weights of a model that is not a PreTrainedModel: train "
                    "HFTrainerAdapter(model) (lmstack.model.hf_trainer), whose saved weights carry the config, or "
                    "write the directory with lmstack.save_model")
        raise LmstackError(f"{path} has no config.json, so it is not a model directory{hint}")
    hf = read_json(path, "config.json", "model config", want_object=True)
    source = str(path / "config.json")
    if hf.get("model_type") == "lmstack":
        return _our_config(hf.get("lmstack"), source), False, source, {}
    if resolve_inside(path, LMSTACK_CONFIG, "model config").exists():
        # our full config (dropout, backend, ...) beside an HF config.json
        ours = str(path / LMSTACK_CONFIG)
        return _our_config(read_json(path, LMSTACK_CONFIG, "model config"), ours), True, ours, {}
    try:
        cfg = config_from_hf(hf, source=source)
    except KeyError as e:
        raise LmstackError(f"{source} lacks the field {e.args[0]!r}, which a {hf.get('model_type')} config "
                           "needs") from None
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, LmstackError):
            raise
        raise LmstackError(f"{source}: a field has the wrong type or value ({type(e).__name__}: {e})") from None
    names = hf_field_names(hf["model_type"])
    check_config_shapes(cfg, source, names)
    return cfg, True, source, names


def _our_config(data: Any, source: str) -> ModelConfig:
    try:
        cfg = from_dict(ModelConfig, data or {})
    except ConfigError as e:
        raise LmstackError(f"{source}: {e}") from None
    check_config_shapes(cfg, source)
    return cfg


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
               device: str | torch.device = "cpu", lazy: bool = True,
               max_model_gib: float | None = None) -> Transformer:
    """A Transformer from our or an HF model directory. dtype=None keeps the checkpoint's dtype.

    The dtype rule: weights become fp32 whatever the checkpoint holds (a bf16 or fp16 checkpoint is upcast;
    on CPU a bf16 matmul is ~300x slower than fp32), unless dtype says otherwise. A name ("auto", "bf16",
    "float16", ...) is resolved by runtime.device.resolve_dtype for `device`: "auto" is bf16 on CUDA, fp32
    elsewhere. Commands pass their --dtype here, so this is the one place the rule is applied.

    lazy=True builds the model on the meta device and memory-maps the weights (nothing is read until
    used, no random init); lazy=False allocates and initialises the model, reads every file fully into
    memory and copies it in, the way most loaders do.

    max_model_gib: refuse (LmstackError naming the fields) when the config needs more memory than this,
    estimated before anything is allocated; None = the process default (64 GiB, or --max_model_gib)."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    if is_trainer_save(path):  # transformers' Trainer saved only a state dict, which carries our config
        return load_trainer_save(path, dtype, device, max_model_gib)
    cfg, hf_names, source, names = _read_config(Path(path))
    check_memory(cfg, dtype, max_model_gib, source, names)
    reader = CheckpointReader(path)
    from lmstack.compress.qformat import load_quantized, quantization_config  # lazy: qformat imports hf_io
    qc = quantization_config(path)
    if qc is not None:  # codes instead of weights: QuantLinear modules (compress/qformat.py)
        return load_quantized(Path(path), cfg, hf_names, qc, reader, dtype, device)
    if lazy:
        # No allocation and no random init: parameters will be views of the memory-mapped files.
        with torch.device("meta"):
            model = Transformer(cfg)
        get, names = reader.get, reader.keys()
    else:
        model = Transformer(cfg)  # the usual way: allocate, initialise, then overwrite
        eager: dict[str, torch.Tensor] = {}
        reader.validate_all()  # our header checks first, on the files resolved inside the directory
        for f in reader.files:
            eager.update(load_file(str(f)))
        get, names = eager.__getitem__, set(eager)
    expected = {k: v for k, v in model.state_dict().items()}
    if hf_names:
        check_output_head(cfg, Path(path), names, reader)
    weights = match_checkpoint(path, cfg, hf_names, expected, get, names, dtype, device)
    if lazy:
        model.load_state_dict(weights, assign=True, strict=True)
        model.materialize_buffers(device)
    else:
        model.load_state_dict(weights, strict=True)
        model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


def match_checkpoint(path, cfg: ModelConfig, hf_names: bool, expected: dict[str, torch.Tensor], get, names: set[str],
                     dtype: torch.dtype | None, device, used_elsewhere: frozenset[str] = frozenset()
                     ) -> dict[str, torch.Tensor]:
    """The checkpoint tensor of every `expected` key (HF-renamed when hf_names), on device and in dtype; errors name
    a missing tensor, one the config does not use (besides `used_elsewhere`, e.g. a quantized model's codes) and a
    shape that does not fit. Shared by load_model and compress/qformat.load_quantized."""
    if hf_names:
        weights, used = weights_from_hf(cfg, expected, get, names)
        ignore = ignored_hf_keys(cfg)
    else:
        missing = [k for k in expected if k not in names]
        if missing:
            raise LmstackError(f"{path}: the checkpoint lacks {missing[0]!r}, which its config needs")
        weights, used, ignore = {k: get(k) for k in expected}, set(expected), []
    unexpected = sorted(k for k in names - used - used_elsewhere if not any(re.search(p, k) for p in ignore))
    if unexpected:
        raise LmstackError(f"{path}: the checkpoint has tensors this config does not use, e.g. {unexpected[0]!r:.100} "
                           f"({len(unexpected)} in all); config.json does not fit the weights")
    for k, t in weights.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise LmstackError(f"{path}: tensor for {k!r} has shape {tuple(t.shape)} but the config needs "
                               f"{tuple(expected[k].shape)}; config.json does not fit the weights")
        target = dtype or t.dtype
        if t.dtype != target or torch.device(device).type != "cpu":
            weights[k] = t.to(device=device, dtype=target)
    return weights


def check_output_head(cfg: ModelConfig, path: Path, names: set[str], reader: CheckpointReader) -> None:
    """A missing lm_head is fine when the config ties it to the embedding (transformers writes no copy);
    untied, it is an error naming the tensor, the files searched and the config field to check."""
    if cfg.tie_embeddings or cfg.head != "lm" or "lm_head.weight" in names:
        return
    files = ", ".join(f.name for f in reader.files)
    index = " (per model.safetensors.index.json)" if reader.indexed else ""
    raise LmstackError(f"{path / 'config.json'}: tie_word_embeddings is false, but tensor 'lm_head.weight' is in "
                       f"none of the weight files {files}{index}; set tie_word_embeddings to true if the "
                       "output head shares the input embedding, or add the missing tensor")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: Transformer, path: str | os.PathLike, tokenizer: Any = None,
               max_shard_bytes: int = 2 * 1024**3, state_dict: dict[str, torch.Tensor] | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> Path:
    """Write model (and tokenizer, if given) as an HF-layout directory; every file is written atomically.

    state_dict: weights to write instead of model.state_dict(), e.g. a full state gathered from FSDP shards
    or averaged weights (model then only supplies the config). extra_tensors are written as named (already in
    the checkpoint's naming) and extra_config's keys are added to config.json: compress/qformat.py writes a
    quantized model's codes and quantization_config this way."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    source = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    hf_cfg = None
    if cfg.hf_model_type in EXPORTABLE:
        try:
            hf_cfg = config_to_hf(cfg)
        except LmstackError as e:
            print(f"lmstack: saving in lmstack's own layout (transformers cannot load it): {e}")
    if hf_cfg is not None:
        tensors = weights_to_hf(cfg, state)
        config_json = hf_cfg
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        if floats:  # config_to_hf says float32; transformers' dtype="auto" reads this, so say what is written
            config_json["dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    else:
        tensors = state
        config_json = {"model_type": "lmstack", "architectures": ["LmstackTransformer"], "lmstack": to_dict(cfg)}
    if extra_tensors:
        tensors = {**tensors, **{k: v.detach().to("cpu").contiguous() for k, v in extra_tensors.items()}}
    config_json.update(extra_config or {})
    # Shard by size, keeping insertion order so layers stay together.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_safetensors(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(shard, path / name)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    atomic_write_text(path / "config.json", json.dumps(config_json, indent=2))
    if hf_cfg is not None:
        atomic_write_text(path / LMSTACK_CONFIG, json.dumps(to_dict(cfg), indent=2))
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    if cfg.real_vocab_size is not None and hf_cfg is not None:
        # transformers' generate() applies suppress_tokens as -inf logits: padded rows stay unsampled there too.
        gen["suppress_tokens"] = list(range(cfg.real_vocab_size, cfg.vocab_size))
    atomic_write_text(path / "generation_config.json", json.dumps({**gen, "_from_model_config": True}, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    return path
