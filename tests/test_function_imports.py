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
    assert len(rows) > 40  # 374 before issue 16's sweep hoisted the ones whose laziness bought nothing; 80 after
    root = Path(__file__).resolve().parents[1]
    for r in rows:
        line = (root / r.file).read_text(encoding="utf-8").splitlines()[r.line - 1]
        assert line.startswith((" ", "\t")) and "import" in line, (r, line)
        assert r.kind in KINDS and r.verdict.split(":")[0] in ("keep", "hoist"), r


# Issue 16's sweep: the function-level imports that stay, each with its reason. The lister judges each import
# alone and does not see cycles through a package's __init__, so it calls these "hoist"; each is kept on purpose.
KEPT_HOISTS = {
    ("src/lmstack/adapt/finetune.py", "lmstack.adapt"): "cycle: lmstack.adapt's __init__ imports fusion -> finetune",
    ("src/lmstack/data/pipeline.py", "lmstack.data.ray_executor"): "cycle: ray_executor imports pipeline",
    ("src/lmstack/model/fused.py", "lmstack.model"): "fused_triton imports triton, present only with CUDA",
    ("src/lmstack/align/dpo.py", "lmstack.adapt"): "an except ImportError names what is missing",
    ("src/lmstack/serve/commands.py", "lmstack.adapt"): "an except ImportError names what is missing",
    ("src/lmstack/eval/evaluator.py", "lmstack.eval.perf"): "an except ImportError falls back",
    ("src/lmstack/align/trpo.py", "torch.nn.attention"): "an except ImportError falls back on older torch",
    ("src/lmstack/eval/report/run_sections.py", "lmstack.tokenizer"): "inside a try whose except drops the section",
    ("src/lmstack/eval/report/training.py", "lmstack.config"): "inside a try whose except drops the label",
    ("src/lmstack/tokenizer/core.py", "tokenizers"): "inside a try whose except falls back to Python",
    ("src/lmstack/eval/task.py", "lmstack.eval.tasks"): "importing registers the tasks, on first use",
    ("src/lmstack/eval/lm.py", "lmstack.tokenizer"): "eval.lm stays stdlib-only for the sandbox's bare-interpreter caller",
    # these pull torch.distributed.tensor through train.optim (0.6 s), which the lister does not count as heavy
    ("src/lmstack/align/commands.py", "lmstack.align.steps"): "keeps `lmstack align --help` fast",
    ("src/lmstack/align/commands.py", "lmstack.align.rewards.spec"): "keeps `lmstack align --help` fast",
    ("src/lmstack/align/commands.py", "lmstack.align.reward_model"): "keeps `lmstack align --help` fast",
    ("src/lmstack/align/commands.py", "lmstack.align.dpo"): "keeps `lmstack align --help` fast",
    # torch.utils.cpp_extension costs ~0.3 s on top of torch and is needed only when the kernel must be built
    ("src/lmstack/kernels/build.py", "torch.utils"): "only a kernel cache miss needs the build machinery",
}


def _says_why(lines: list[str], i: int) -> bool:
    """The import on line i (0-based) has a `lazy:` comment on its line, or in the run of comment and import lines
    right above it (one comment may cover a few imports that are lazy for the same reason)."""
    if "lazy:" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("#", "import ", "from ")):
        i -= 1
        if "lazy:" in lines[i]:
            return True
    return False


def test_every_import_left_inside_a_function_says_why_it_is_lazy():
    rows = scan()
    root = Path(__file__).resolve().parents[1]
    silent = [f"{r.file}:{r.line} {r.module}" for r in rows
              if not _says_why((root / r.file).read_text(encoding="utf-8").splitlines(), r.line - 1)]
    assert not silent, "function-level imports without a '# lazy: <why>' comment:\n" + "\n".join(silent)


def test_no_function_level_import_could_simply_move_to_the_top():
    rows = scan()
    hoistable = [f"{r.file}:{r.line} {r.module} ({r.verdict})" for r in rows
                 if r.verdict.startswith("hoist") and (r.file, r.module) not in KEPT_HOISTS]
    assert not hoistable, "imports the lister says could sit at their module's top:\n" + "\n".join(hoistable)
    listed = {(r.file, r.module) for r in rows}
    assert set(KEPT_HOISTS) <= listed, f"KEPT_HOISTS names imports that are gone: {set(KEPT_HOISTS) - listed}"


# Measured before the sweep (python -c "import X; print(sorted(sys.modules))"): `import lmstack` loads none of
# these, and `import lmstack.cli` only yaml.
HEAVY_AND_MID = {"torch", "numpy", "jsonargparse", "fastapi", "uvicorn", "httpx", "matplotlib", "transformers",
                 "sklearn", "scipy", "textstat", "safetensors", "tokenizers", "yaml"}


def _loaded_after(statement: str) -> set[str]:
    import subprocess
    import sys

    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split()) & HEAVY_AND_MID


def test_import_lmstack_and_the_cli_stay_light():
    assert _loaded_after("import lmstack") == set()
    assert _loaded_after("import lmstack.cli") <= {"yaml"}
