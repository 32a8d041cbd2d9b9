"""Test files need unique basenames: tests/ has no __init__.py files, so pytest imports each test file as a
top-level module by its name, and a second `test_fusion.py` anywhere stops the whole run at collection."""
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_file_basename_is_unique():
    where = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name.startswith("test_") or path.name.endswith("_helpers.py"):
            where[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not clashes, f"rename one of each (pytest cannot import both): {clashes}"
