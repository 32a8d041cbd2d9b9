"""The README's layout block names exactly the tree: every package and top-level module under src/lmstack,
nothing that is not there; and tests/ mirrors the packages (one test folder per package)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lmstack"


def layout_names(readme: str) -> set[str]:
    """The entries (`name/` or `name.py`) of the code block under '## Layout'."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return set(re.findall(r"^  (\w+/|\w+\.py)\s", block, flags=re.M))


def tree_names() -> set[str]:
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    return packages | modules


def test_the_parser_reads_a_layout_block():
    text = "# x\n\n## Layout\n\ntext\n```\nsrc/lmstack/\n  a/   one\n       more\n  b.py two\n```\n## Next\n  c/ x\n"
    assert layout_names(text) == {"a/", "b.py"}


def test_readme_layout_matches_the_tree():
    named, there = layout_names((ROOT / "README.md").read_text(encoding="utf-8")), tree_names()
    assert named == there, (f"README layout names what is not in src/lmstack: {sorted(named - there)}; "
                            f"leaves out: {sorted(there - named)}")


def test_tests_mirror_the_packages():
    missing = sorted(name for name in tree_names() if name.endswith("/") and not (ROOT / "tests" / name).is_dir())
    assert not missing, f"packages without a test folder under tests/: {missing}"
