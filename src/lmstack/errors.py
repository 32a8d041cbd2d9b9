"""The one exception family lmstack raises for bad input, so the CLI can print it without a traceback.

Usage:
    from lmstack.errors import LmstackError
    raise LmstackError("tokenizer.json at x/ is not a tokenizer file: missing 'model'")
"""


class LmstackError(Exception):
    """Bad input or an unusable file. The message says what is wrong and where."""


def gguf_unsupported(path: object) -> str:
    """The one message for a .gguf model, from the CLI and from the loaders alike: lmstack writes GGUF
    (`lmstack export`) for llama.cpp but does not load it."""
    return (f"GGUF models are not supported yet: {path}; lmstack writes GGUF (lmstack export) but does not read it; "
            "give a model directory (ours, or a Hugging Face one: config.json + *.safetensors) instead")
