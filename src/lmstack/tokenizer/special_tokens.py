"""Which BOS, EOS, PAD and UNK a Hugging Face directory means, and whether encode() adds BOS / EOS.

Four files can name special tokens. We follow transformers (5.x, `PreTrainedTokenizerBase.from_pretrained`
and `TokenizersBackend`) so that a directory gives the same tokens and ids here as there:

1. The *tokenizer's* tokens (bos_token, eos_token, pad_token, unk_token) come from the tokenizer files only:
   - tokenizer_config.json's `bos_token` etc., each a string or an AddedToken dict {"content": ...};
   - special_tokens_map.json, the legacy file, is read only when tokenizer_config.json has no
     `added_tokens_decoder` (files written before transformers 4.34); it then overrides tokenizer_config.json
     field by field. A modern tokenizer_config.json (with `added_tokens_decoder`) makes it ignored.
   - A token string that is not in the vocabulary is ignored here (transformers would grow the vocabulary
     with a new id the model has no embedding row for).
2. config.json and generation_config.json never change the tokenizer's tokens. Their ids say what the model
   was trained with and what generation stops on: generation_config.json's `eos_token_id` (one id or a list)
   first, then config.json's (`model_special_ids`). The engine stops on those ids plus the tokenizer's EOS
   and the chat template's end of turn; eval conditions an empty context on them only when the tokenizer has
   neither BOS nor EOS (eval/lm.py, a fallback lm-eval's hf backend does not have).
4. Lowest: the tokenizer class's defaults (tokenizer/class_defaults.py). A role that tokenizer_config.json
   (and special_tokens_map.json) leave out entirely gets the default of the class transformers would build
   (LlamaTokenizer "<s>"/"</s>"/"<unk>", Qwen2Tokenizer "<|endoftext|>", ...), if the vocabulary has that token.
   An explicit null stays null, as a None keyword does in transformers.
3. `add_bos_token` / `add_eos_token` in tokenizer_config.json: with a tokenizer.json they do nothing, because
   transformers 5 drops them there (`from_pretrained` pops both when a tokenizer file exists; `save_pretrained`
   bakes them into tokenizer.json's post_processor instead, as 4.x's update_post_processor also did before
   saving). So tokenizer.json's post_processor rules: none means encode(add_special_tokens=True) adds nothing.
   They count when the tokenizer is built from a SentencePiece tokenizer.model (tokenizer/sentencepiece.py):
   the post-processor becomes "[BOS] $A [EOS]" with the flagged tokens (transformers' update_post_processor);
   both default to false, as transformers 5's LlamaTokenizer has them (Llama-2's tokenizer_config.json says
   add_bos_token: true). A flag whose token is missing is dropped, as there.

Usage:
    from lmstack.tokenizer.special_tokens import resolve_tokenizer_files, model_special_ids
    spec, config = resolve_tokenizer_files(spec, config, directory)   # load_tokenizer does this
    model_special_ids("runs/model")      # {"bos": 1, "eos": [2, 32007], "pad": None} from the model's configs
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError
from lmstack.tokenizer.class_defaults import class_default_tokens

ROLES = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}


def token_content(value: Any, where: str) -> str | None:
    """A special-token entry (string, AddedToken dict or null) -> its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise LmstackError(f"{where} must be a string or an AddedToken object with a 'content' string, got {value!r:.60}")


def _read_optional(directory: Path | None, name: str) -> dict:
    if directory is None:
        return {}
    # lazy: heavy (torch), which the tokenizer package does not import at its top
    from lmstack.model.load_guard import read_json_file, resolve_inside

    f = resolve_inside(directory, name, "tokenizer config")
    return read_json_file(f, "tokenizer config", want_object=True) if f.is_file() else {}


def resolve_tokenizer_files(spec: dict, config: dict, directory: str | os.PathLike | None,
                            converted: bool = False) -> tuple[dict, dict]:
    """(tokenizer.json spec, tokenizer_config dict) as transformers would use them: the special_tokens_map.json
    roles merged in (legacy configs only); for a spec `converted` from a tokenizer.model (no tokenizer.json),
    add_bos_token / add_eos_token (both default false) made into the post-processor."""
    config = dict(config)
    directory = Path(directory) if directory is not None else None
    if "added_tokens_decoder" not in config:
        legacy = _read_optional(directory, "special_tokens_map.json")
        for key in ROLES.values():
            if legacy.get(key) is not None:
                config[key] = token_content(legacy[key], f"special_tokens_map.json: {key}")
    for key in ROLES.values():
        token_content(config.get(key), f"tokenizer_config.json: {key}")  # a clear error for a bad entry
    try:  # config.json's model_type can change the class (class_defaults.py)
        model_config = _read_optional(directory, "config.json")
    except LmstackError:
        model_config = {}  # a broken config.json is the model loader's error to report, not the tokenizer's
    for key, token in class_default_tokens(config, model_config, spec, from_tokenizer_json=not converted).items():
        if key not in config and _vocab_id(spec, token) is not None:
            config[key] = token
    if converted:
        spec = copy.deepcopy(spec)
        spec["post_processor"] = _bos_eos_processor(spec, config)
    return spec, config


def _vocab_id(spec: dict, token: str | None) -> int | None:
    if token is None:
        return None
    for t in spec.get("added_tokens") or []:
        if isinstance(t, dict) and t.get("content") == token:
            return t.get("id")
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return vocab.get(token)
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return next((i for i, v in enumerate(vocab) if v and v[0] == token), None)
    return None


def _bos_eos_processor(spec: dict, config: dict) -> dict:
    """transformers' update_post_processor: TemplateProcessing with the flagged BOS / EOS around each sequence."""
    parts: dict[str, tuple[str, int]] = {}
    for role, flag in (("bos", "add_bos_token"), ("eos", "add_eos_token")):
        value = config.get(flag, False)
        if not isinstance(value, bool):
            raise LmstackError(f"tokenizer_config.json: {flag} must be true or false, got {value!r:.40}")
        token = token_content(config.get(ROLES[role]), f"tokenizer_config.json: {ROLES[role]}")
        i = _vocab_id(spec, token)
        if value and i is not None:
            parts[role] = (token, i)

    def seq(name: str, type_id: int) -> list[dict]:
        out = [{"SpecialToken": {"id": parts["bos"][0], "type_id": type_id}}] if "bos" in parts else []
        out.append({"Sequence": {"id": name, "type_id": type_id}})
        if "eos" in parts:
            out.append({"SpecialToken": {"id": parts["eos"][0], "type_id": type_id}})
        return out

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {tok: {"id": tok, "ids": [i], "tokens": [tok]} for tok, i in parts.values()}}


def _ids(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise LmstackError(f"{where} must be a token id or a list of token ids, got {value!r:.60}")
    return items


def model_special_ids(directory: str | os.PathLike | None) -> dict[str, Any]:
    """{"bos": id, "eos": [ids], "pad": id} that the model's generation_config.json, then config.json (and
    lmstack_config.json) declare; None for what none of them names. Unreadable side files offer nothing."""
    found: dict[str, Any] = {"bos": None, "eos": None, "pad": None}
    if directory is None or not Path(directory).is_dir():
        return found
    # lazy: heavy (torch), which the tokenizer package does not import at its top
    from lmstack.model.load_guard import read_json, resolve_inside

    for name in ("generation_config.json", "config.json", "lmstack_config.json"):
        try:  # files kept inside the directory, size-capped, regular (load_guard; issue 15)
            data = read_json(directory, name, "model config") if resolve_inside(directory, name).exists() else {}
        except LmstackError:
            continue  # a broken or escaping side file is the loader's business; here it just offers no ids
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("lmstack"), dict):
            data = {**data["lmstack"], **data}
        for role in found:
            if found[role] is None:
                ids = _ids(data.get(f"{role}_token_id"), f"{Path(directory) / name}: {role}_token_id")
                if ids:
                    found[role] = ids if role == "eos" else ids[0]
    return found
