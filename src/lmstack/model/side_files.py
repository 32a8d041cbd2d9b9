"""The files of a model directory that are not weights: tokenizer, chat template, generation config.

`lmstack model convert` rewrites config.json and the safetensors; everything else a user's directory holds
about how to talk to the model must arrive unchanged, or the converted model answers differently: a dropped
tokenizer_config.json loses the chat template and the special tokens, a rebuilt generation_config.json loses
the second end-of-turn id (Qwen's <|im_end|>, Llama-3's <|eot_id|>) and the sampling defaults.

So: tokenizer and template files are copied byte for byte (each checked to be a regular file inside the
source directory, then written atomically), and generation_config.json is the source's own dict, with only
the fields the new weights force on it: the special ids when the source lacks them, and the padded rows of a
padded vocabulary added to suppress_tokens so transformers' generate never emits them.

Usage:
    from lmstack.model.side_files import copy_side_files, merged_generation_config
    copied = copy_side_files("hf_dir", "out_dir")                 # ['tokenizer.json', 'chat_template.jinja', ...]
    gen = merged_generation_config("hf_dir", model.config)        # dict for out_dir/generation_config.json
    keep_special_id_lists("hf_dir", "out_dir")                    # config.json's eos_token_id list, restored
    keep_source_files("hf_dir", "out_dir", model.config)          # all three, after save_model(model, "out_dir")

`model convert`, and finetune / align when they save a trained model, end with keep_source_files: a user's
Qwen2 that was aligned must still stop on both <|im_end|> and <|endoftext|> and keep its pad token.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.load_guard import JSON_MAX_BYTES, check_regular, read_json, resolve_inside

# What transformers, tokenizers and sentencepiece write beside a model. Weights, config.json,
# lmstack_config.json and generation_config.json are the converter's to write.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
TEMPLATE_DIR = "additional_chat_templates"  # transformers v5: named templates, one <name>.jinja each
MAX_SIDE_FILE_BYTES = JSON_MAX_BYTES["tokenizer file"]


def _copy_file(src: Path, dst: Path, what: str) -> None:
    check_regular(src, what, MAX_SIDE_FILE_BYTES)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_side_files(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and chat-template files of `src` into `out` unchanged; returns the names copied.

    Each file must resolve inside `src` (no symlink out) and be a regular file; a copy replaces any file of
    that name in `out` atomically, so an interrupted convert never leaves half a tokenizer."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        path = resolve_inside(src, name, "tokenizer file")
        if path.exists():
            _copy_file(path, out / name, "tokenizer file")
            copied.append(name)
    templates = resolve_inside(src, TEMPLATE_DIR, "chat template directory")
    if templates.is_dir():
        for entry in sorted(templates.iterdir()):
            if entry.suffix == ".jinja":
                rel = f"{TEMPLATE_DIR}/{entry.name}"
                _copy_file(resolve_inside(src, rel, "chat template"), out / rel, "chat template")
                copied.append(rel)
    return copied


def merged_generation_config(src: str | os.PathLike, cfg: Any) -> dict[str, Any]:
    """The source's generation_config.json, kept whole, with only the fields the converted model needs.

    Fields added: bos/eos/pad_token_id where the source has none (taken from the model config), and, for a
    padded vocabulary (cfg.real_vocab_size), the padded ids in suppress_tokens. Nothing the source sets is
    changed: a list-valued eos_token_id, temperature, top_p, top_k, do_sample, max_new_tokens stay as they are."""
    src = Path(src)
    gen: dict[str, Any] = {}
    if resolve_inside(src, "generation_config.json", "generation config").exists():
        gen = dict(read_json(src, "generation_config.json", "generation config", want_object=True))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and getattr(cfg, key, None) is not None:
            gen[key] = getattr(cfg, key)
    real = getattr(cfg, "real_vocab_size", None)
    if real is not None and real < cfg.vocab_size:
        kept = gen.get("suppress_tokens") or []
        if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            raise LmstackError(f"{src / 'generation_config.json'}: suppress_tokens must be a list of token ids")
        gen["suppress_tokens"] = sorted(set(kept) | set(range(real, cfg.vocab_size)))
    if not gen:
        gen["_from_model_config"] = True
    return gen


def keep_special_id_lists(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Put the source config.json's list-valued special ids back into out/config.json; returns the keys restored.

    Our ModelConfig holds one id per role (the first of a list), so a written config.json would shrink
    `eos_token_id: [151645, 151643]` to its first entry. Where the written id is that first entry, the list is
    restored; lmstack-layout configs (model_type "lmstack") are left alone."""
    src, out = Path(src), Path(out)
    theirs = read_json(src, "config.json", "model config", want_object=True)
    ours = read_json(out, "config.json", "model config", want_object=True)
    if ours.get("model_type") == "lmstack":
        return []
    restored = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = theirs.get(key)
        if isinstance(value, list) and value and value[0] == ours.get(key):
            ours[key] = value
            restored.append(key)
    if restored:
        atomic_write_text(out / "config.json", json.dumps(ours, indent=2))
    return restored


def keep_source_files(src: str | os.PathLike, out: str | os.PathLike, cfg: Any,
                      tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
    """After save_model wrote `out` from a model loaded from `src`: the tokenizer and template files of
    `tokenizer_dir` (default `src`) replace the re-saved ones unchanged, generation_config.json is the source's
    (merged_generation_config) and config.json's special-id lists are restored. Returns the names copied."""
    copied = copy_side_files(tokenizer_dir if tokenizer_dir is not None else src, out)
    atomic_write_text(Path(out) / "generation_config.json", json.dumps(merged_generation_config(src, cfg), indent=2))
    keep_special_id_lists(src, out)
    return copied
