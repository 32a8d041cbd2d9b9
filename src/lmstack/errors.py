"""The one exception family lmstack raises for bad input, so the CLI can print it without a traceback.

Usage:
    from lmstack.errors import LmstackError
    raise LmstackError("tokenizer.json at x/ is not a tokenizer file: missing 'model'")
"""


class LmstackError(Exception):
    """Bad input or an unusable file. The message says what is wrong and where."""
