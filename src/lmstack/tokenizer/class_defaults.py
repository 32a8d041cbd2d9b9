"""Special tokens a tokenizer CLASS supplies when tokenizer_config.json leaves them out (transformers' behaviour).

transformers gives each tokenizer class `__init__` defaults: LlamaTokenizer bos "<s>", eos "</s>", unk "<unk>";
GemmaTokenizer "<bos>", "<eos>", "<pad>", "<unk>", "<mask>"; GPT2Tokenizer "<|endoftext|>" for bos/eos/unk;
Qwen2Tokenizer "<|endoftext|>" for eos/pad/unk and no bos. A directory whose tokenizer_config.json names such a
class but omits a token still has that token in transformers, so it must have it here too. This is the lowest
layer of the precedence in special_tokens.py: it fills only roles that no file named.

Which class applies is transformers 5's AutoTokenizer choice, reproduced for the families lmstack loads:
- tokenizer_config.json's `tokenizer_class` (or config.json's), with the "Fast" suffix dropped;
- but config.json's `model_type` can overrule it: mistral and phi3 register no special class (without the
  mistral_common package), so a directory of either loads as the generic backend, which has no defaults; qwen2 is
  one of the model types whose published tokenizer_class transformers distrusts, so Qwen2Tokenizer wins there;
- LlamaTokenizer over a byte-level tokenizer.json (Llama-3 style) becomes the generic backend (no defaults);
- with no tokenizer_class at all, the model type's registered class applies (gemma -> GemmaTokenizer, ...).
A class not in the table adds nothing (transformers' TokenizersBackend / PreTrainedTokenizerFast add nothing).

A default whose text is not in the vocabulary is not used: transformers would add it as a new token with an id
past the vocabulary (no embedding row in the model); here the role stays empty (see special_tokens.py).

Usage:
    from lmstack.tokenizer.class_defaults import class_default_tokens
    class_default_tokens(tokenizer_config, model_config, spec)   # {"bos_token": "<s>", ...} or {}
"""
from __future__ import annotations

import json

# The __init__ defaults of transformers 5's tokenizer classes (models/<family>/tokenization_<family>.py).
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "CodeLlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                       "mask_token": "<mask>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}

# config.json model_type -> the class transformers registers for it; "" = the generic backend (no defaults).
# Model types not listed register nothing, so the directory's own tokenizer_class decides.
MODEL_TYPE_CLASS: dict[str, str] = {
    "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "gemma3": "GemmaTokenizer",
    "gemma3_text": "GemmaTokenizer", "gpt2": "GPT2Tokenizer", "phi": "GPT2Tokenizer",
    "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "qwen3_moe": "Qwen2Tokenizer",
    "mistral": "", "phi3": "",
}
# Model types whose published tokenizer_class transformers overrides with the registered one.
DISTRUSTED_MODEL_TYPES = {"phi3", "qwen2"}


def effective_class(tokenizer_config: dict, model_config: dict, byte_level: bool) -> str:
    """The tokenizer class AutoTokenizer would build, if it is one of CLASS_DEFAULTS' ("" otherwise)."""
    declared = tokenizer_config.get("tokenizer_class") or model_config.get("tokenizer_class")
    model_type = model_config.get("model_type")
    registered = MODEL_TYPE_CLASS.get(model_type) if isinstance(model_type, str) else None
    if not isinstance(declared, str) or not declared:
        return registered or ""
    declared = declared.removesuffix("Fast")
    if declared == "LlamaTokenizer" and model_type not in DISTRUSTED_MODEL_TYPES and byte_level:
        return ""  # transformers: "tokenizer_class is LlamaTokenizer but tokenizer.json is ByteLevel"
    if registered is not None and registered != declared:
        if not registered:
            return ""
        declared = registered if model_type in DISTRUSTED_MODEL_TYPES else declared
    return declared if declared in CLASS_DEFAULTS else ""  # other classes: none of these defaults


def is_byte_level(spec: dict, from_tokenizer_json: bool) -> bool:
    """transformers' test, a search for "ByteLevel" in tokenizer.json (false when there is none). We search the
    pipeline parts only: the vocabulary holds no pipeline step, and dumping a large one on every load is slow."""
    if not from_tokenizer_json:
        return False
    return '"ByteLevel"' in json.dumps({k: v for k, v in spec.items() if k not in ("model", "added_tokens")})


def class_default_tokens(tokenizer_config: dict, model_config: dict, spec: dict,
                         from_tokenizer_json: bool = True) -> dict[str, str]:
    """{"bos_token": text, ...}: the class's defaults (all of them, whether or not the vocabulary has them)."""
    cls = effective_class(tokenizer_config, model_config, is_byte_level(spec, from_tokenizer_json))
    return dict(CLASS_DEFAULTS.get(cls, {}))
