"""tests/function_imports.py (the lister of imports inside functions, for issue 16's sweep) classifies what
it finds correctly: on a small made-up package every verdict is known, and on src/lmstack every row points at
a real import line."""
from pathlib import Path

from function_imports import KINDS, scan

PYPROJECT = """[project]
name = "lmstack"
dependencies = ["torch>=2", "numpy", "pyyaml"]
[project.optional-dependencies]
ray = ["ray[data]==2.60.0"]
"""

MODULES = {
    "__init__.py": "",
    "heavy.py": "import torch\n",
    "light.py": "import json\nX = 1\n",
    "b.py": "from lmstack import a\n",
    "a.py": '''from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import torch
class C:
    import re  # a class body runs at import: top-level
def f():
    import torch
def g():
    from lmstack import heavy
def h():
    from lmstack.light import X
def i():
    import ray.data
def j():
    import os
def k():
    from lmstack.b import a
def m():
    import yaml
def n():
    # needs the optional package
    import pyphen
''',
    "t.py": '''import torch
def f():
    from lmstack import heavy
def g():
    import numpy
''',
}

EXPECTED = {
    ("a.py", "f"): ("torch", "heavy third-party", "keep: lazy for speed (torch)"),
    ("a.py", "g"): ("lmstack", "lmstack", "keep: lazy for speed (torch)"),
    ("a.py", "h"): ("lmstack.light", "lmstack", "hoist: cheap"),
    ("a.py", "i"): ("ray.data", "optional extra", "keep: optional extra"),
    ("a.py", "j"): ("os", "stdlib", "hoist: cheap"),
    ("a.py", "k"): ("lmstack.b", "lmstack", "keep: breaks a cycle"),
    ("a.py", "m"): ("yaml", "light third-party", "hoist: cheap"),
    ("a.py", "n"): ("pyphen", "undeclared", "keep: optional extra"),
    ("t.py", "f"): ("lmstack", "lmstack", "hoist: importer already pulls torch"),
    ("t.py", "g"): ("numpy", "heavy third-party", "hoist: importer already pulls numpy"),
}


def test_each_kind_and_verdict_on_a_made_up_package(tmp_path):
    pkg = tmp_path / "src" / "lmstack"
    pkg.mkdir(parents=True)
    for name, text in MODULES.items():
        (pkg / name).write_text(text)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    rows = scan(tmp_path / "src", pyproject=tmp_path / "pyproject.toml")
    got = {(Path(r.file).name, r.function): (r.module, r.kind, r.verdict) for r in rows}
    assert got == EXPECTED  # the TYPE_CHECKING and class-body imports are top-level, so not listed
    assert {(Path(r.file).name, r.function) for r in rows if r.commented} == {("a.py", "n")}


def test_every_row_on_the_real_tree_is_an_import_inside_a_function():
    rows = scan()
    assert len(rows) > 100
    root = Path(__file__).resolve().parents[1]
    for r in rows:
        line = (root / r.file).read_text(encoding="utf-8").splitlines()[r.line - 1]
        assert line.startswith((" ", "\t")) and "import" in line, (r, line)
        assert r.kind in KINDS and r.verdict.split(":")[0] in ("keep", "hoist"), r
