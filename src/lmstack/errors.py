"""The one exception family lmstack raises for bad input, so the CLI can print it without a traceback.

Usage:
    from lmstack.errors import LmstackError
    raise LmstackError("tokenizer.json at x/ is not a tokenizer file: missing 'model'")
"""


class LmstackError(Exception):
    """Bad input or an unusable file. The message says what is wrong and where."""


def gguf_unsupported(path: object) -> str:
    """The one message for a .gguf model, from the CLI and from the loaders alike: no loader reads GGUF until
    the compression stage exports it."""
    return (f"GGUF models are not supported yet: {path}; give a model directory (ours, or a Hugging Face one: "
            "config.json + *.safetensors) instead")
