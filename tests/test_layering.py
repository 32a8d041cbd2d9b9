"""The layers hold, by a scan of every import in src/lmstack (top-level and inside functions, `import x`,
`from x import y`, relative imports resolved, and importlib.import_module / __import__ of a literal name):

- no library module imports a stage: only the CLI layer (lmstack.cli) and the stages themselves
  (lmstack.stages.*) may import lmstack.stages;
- nothing under lmstack.align imports lmstack.eval: the checkers both need live in lmstack.world;
- nothing under lmstack.model imports lmstack.infer: the engine brings its cache through the model's
  AttentionCache interface (model/attention_cache.py), so the model never learns an engine exists.
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The only modules allowed to import lmstack.stages, besides the stages themselves (see lmstack.cli's docstring).
CLI_LAYER = {"lmstack.cli"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _literal_import(node: ast.Call) -> str | None:
    """The module named by importlib.import_module("x") or __import__("x"), when it is a literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports(src: Path = SRC, package: str = "lmstack") -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import under src/<package>."""
    found = []
    for path in sorted((src / package).rglob("*.py")):
        name = module_name(path, src)
        # a module's own package: itself for an __init__.py, its parent otherwise
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(name, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                base = ".".join(base + ([node.module] if node.module else []))
                # `from lmstack import stages` imports lmstack.stages: name each imported member too
                found += [(name, base, node.lineno)] + [(name, f"{base}.{alias.name}", node.lineno)
                                                        for alias in node.names if alias.name != "*"]
            elif isinstance(node, ast.Call) and (target := _literal_import(node)):
                found.append((name, target, node.lineno))
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def stage_importers(found) -> list[str]:
    return sorted({f"{who} (line {line}) imports {what}" for who, what, line in found
                   if _under(what, "lmstack.stages") and not _under(who, "lmstack.stages") and who not in CLI_LAYER})


def align_eval_imports(found) -> list[str]:
    return sorted({f"{who} (line {line}) imports {what}" for who, what, line in found
                   if _under(who, "lmstack.align") and _under(what, "lmstack.eval")})


def model_infer_imports(found) -> list[str]:
    return sorted({f"{who} (line {line}) imports {what}" for who, what, line in found
                   if _under(who, "lmstack.model") and _under(what, "lmstack.infer")})


def test_the_scan_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "lmstack"
    (pkg / "align" / "rewards").mkdir(parents=True)
    (pkg / "stages").mkdir()
    for init in (pkg, pkg / "align", pkg / "align" / "rewards", pkg / "stages"):
        (init / "__init__.py").write_text("")
    (pkg / "align" / "rewards" / "safety.py").write_text(
        "import lmstack.eval.tasks\n"
        "def f():\n    from ...eval import harness\n    from ... import stages\n")
    (pkg / "align" / "__init__.py").write_text("from .. import eval\n")
    (pkg / "train.py").write_text(
        "import importlib\n"
        "def g():\n    from .stages.speedrun import speedrun\n    return importlib.import_module('lmstack.stages.sft')\n")
    (pkg / "stages" / "align.py").write_text("from lmstack.stages.sft import sft_stage\nimport lmstack.eval\n")
    (pkg / "cli.py").write_text("import lmstack.stages.speedrun\n")
    (pkg / "model").mkdir()
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "attention.py").write_text("def f():\n    from ..infer.paged_attention import PagedKVCache\n")
    found = imports(tmp_path)
    assert model_infer_imports(found) == [
        "lmstack.model.attention (line 2) imports lmstack.infer.paged_attention",
        "lmstack.model.attention (line 2) imports lmstack.infer.paged_attention.PagedKVCache",
    ]
    assert stage_importers(found) == [
        "lmstack.align.rewards.safety (line 4) imports lmstack.stages",
        "lmstack.train (line 3) imports lmstack.stages.speedrun",
        "lmstack.train (line 3) imports lmstack.stages.speedrun.speedrun",
        "lmstack.train (line 4) imports lmstack.stages.sft",
    ]
    assert align_eval_imports(found) == [
        "lmstack.align (line 1) imports lmstack.eval",
        "lmstack.align.rewards.safety (line 1) imports lmstack.eval.tasks",
        "lmstack.align.rewards.safety (line 3) imports lmstack.eval",
        "lmstack.align.rewards.safety (line 3) imports lmstack.eval.harness",
    ]


def test_the_scan_covers_the_package():
    found = imports()
    modules = {who for who, _, _ in found}
    assert {"lmstack.cli", "lmstack.stages.speedrun", "lmstack.stages.sft", "lmstack.stages.align"} <= modules
    # the speedrun chains the other stages, so the scan does see stage imports (from an allowed place)
    assert ("lmstack.stages.speedrun", "lmstack.stages.sft") in {(who, what) for who, what, _ in found}


def test_no_library_module_imports_a_stage():
    bad = stage_importers(imports())
    assert not bad, ("library modules must not import lmstack.stages (only " + ", ".join(sorted(CLI_LAYER))
                     + " and the stages may):\n  " + "\n  ".join(bad))


def test_align_does_not_import_eval():
    bad = align_eval_imports(imports())
    assert not bad, ("lmstack.align must not import lmstack.eval (shared checkers live in lmstack.world):\n  "
                     + "\n  ".join(bad))


def test_the_model_does_not_import_the_engine():
    bad = model_infer_imports(imports())
    assert not bad, ("lmstack.model must not import lmstack.infer (an engine passes its cache in as an "
                     "AttentionCache):\n  " + "\n  ".join(bad))
