"""Stage tests build on the fixtures of the packages a stage chains: the align stage's tests use tests/align's
tiny world, tokenizer and policy (fixtures `world`, `tok`, the autouse `one_thread`; helper `align_helpers`),
the SFT stage's test the tiny base model of tests/adapt (helper `_sft_tiny`).

tests/ has no __init__.py files, so a helper module is importable only from its own folder: put that folder on
sys.path, and load tests/align/conftest.py under its own name (two modules called `conftest` would clash).
"""
import importlib.util
import sys
from pathlib import Path

_ALIGN = Path(__file__).resolve().parents[1] / "align"
for _helpers in (_ALIGN, _ALIGN.parent / "adapt"):
    if str(_helpers) not in sys.path:
        sys.path.insert(0, str(_helpers))

_spec = importlib.util.spec_from_file_location("align_fixtures", _ALIGN / "conftest.py")
_align = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_align)

one_thread, tok, world = _align.one_thread, _align.tok, _align.world
