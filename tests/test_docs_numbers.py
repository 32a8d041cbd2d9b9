"""Every number in docs/techniques.md and in the README's benchmark table traces to benchmarks/results/*.json.

Grammar of a citation (announced to every engineer):
    <number>[%|×|x][ unit] (results/<file>.json:<keypath>)
- keypath segments are separated by '.'; a segment of digits indexes a list; `field=value` picks the first list
  element whose `field` equals value; any other segment is a dict key. (A key or value that itself holds dots, such
  as `metric=ttft_s_rate0.7`, still resolves: segments are re-joined when the split reading finds nothing.)
- the number right before the citation must equal the JSON value rounded to the precision shown; a trailing %
  may show a fraction x100.

What fails:
- a citation that does not resolve, is not a number, or disagrees with the number before it (drift);
- a techniques row whose measured-effect column holds digits but no citation, no "arithmetic:" label and no
  "not built" text (and the same for the README's benchmark table);
- a cited results file that no script under benchmarks/ writes;
- a cited test (`tests/x.py::name`, `tests/x.py`, globs allowed) that does not exist;

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_docs_numbers.py
"""
from __future__ import annotations

import fnmatch
import glob
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = ROOT / "docs" / "techniques.md"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

# Rows still being rewritten by their owners. Each entry must still fail a check below: when a row becomes clean,
# the test tells you to delete its entry here (shrink-only, so the list cannot rot). Never add to it.

ROW = re.compile(r"^\| (?P<id>(?:S|[IVX]+)\.\d+) \|")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
CITATION = re.compile(r"\(results/(?P<file>[\w.\-]+?)\.json:(?P<key>[^)\s]+)\)")
# The number just before a citation: optional sign, digits with thousands commas, decimals, exponent; then an
# optional %/×/x and an optional unit word (MB, ms, nats, points, FLOPs/query ...).
NUMBER_BEFORE = re.compile(
    r"(?P<num>[-−]?\d[\d,]*(?:\.\d+)?(?:[eE][-+−]?\d+)?)\s*(?P<suffix>%|×|x)?\s*(?:[A-Za-zµ][\w/µ]{0,14})?\s*$")
TEST_REF = re.compile(r"(?P<path>tests/(?:[\w\-]+/)*[\w*\-]+\.py|(?<![\w/])[\w*\-]*test[\w*\-]*\.py)"
                      r"(?P<names>(?:::[\w*\[\]\-]+)*)")
BARE_TEST_NAME = re.compile(r"`(test_\w+)`")
ID_REFERENCE = re.compile(r"\b(?:S|[IVX]+)\.\d+(?:\s*[–-]\s*(?:(?:S|[IVX]+)\.)?\d+)?\b|issue #\d+|#\d+")


# ---------------------------------------------------------------- keypaths and numbers

def _resolve(node, segments: list[str]):
    """Walk `segments` from `node`; a failed segment is re-joined with the next ones (dots inside names)."""
    if not segments:
        return node
    for end in range(1, len(segments) + 1):
        seg = ".".join(segments[:end])
        found, child = _step(node, seg)
        if found:
            try:
                return _resolve(child, segments[end:])
            except KeyError:
                continue
    raise KeyError(".".join(segments))


def _step(node, seg: str):
    if isinstance(node, list):
        if seg.isdigit():
            i = int(seg)
            return (True, node[i]) if i < len(node) else (False, None)
        if "=" in seg:
            field, value = seg.split("=", 1)
            for item in node:
                if isinstance(item, dict) and field in item and str(item[field]) == value:
                    return True, item
        return False, None
    if isinstance(node, dict) and seg in node:
        return True, node[seg]
    return False, None


@lru_cache(maxsize=None)
def _load(file: str):
    path = RESULTS / f"{file}.json"
    if not path.is_file():
        raise FileNotFoundError(f"results/{file}.json does not exist")
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def written_by_a_script(file: str) -> bool:
    """benchmarks/<file>.py exists, or some benchmark script names the results file it writes."""
    bench = ROOT / "benchmarks"
    return (bench / f"{file}.py").is_file() or any(f'"{file}"' in p.read_text() for p in bench.glob("*.py"))


def resolve(file: str, key: str):
    """The value at results/<file>.json:<key>; KeyError/FileNotFoundError name what is missing."""
    return _resolve(_load(file), key.split("."))


def shown_matches(shown: str, suffix: str | None, value: float) -> bool:
    """True when `shown` (as written in the docs) equals `value` rounded to the precision shown."""
    text = shown.replace(",", "").replace("−", "-")
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = 10 ** (int(exponent) if exponent else 0)
    tol = 0.5 * 10 ** (-decimals) * scale
    number = float(text)
    candidates = [value]
    if suffix == "%":
        candidates.append(value * 100)
    return any(abs(number - c) <= tol * (1 + 1e-9) + 1e-12 for c in candidates)


def citation_errors(text: str) -> list[str]:
    """Every problem with the citations in `text` (empty when all resolve and agree)."""
    errors = []
    for m in CITATION.finditer(text):
        cite = m.group(0)
        try:
            value = resolve(m.group("file"), m.group("key"))
        except FileNotFoundError as e:
            errors.append(f"{cite}: {e}")
            continue
        except (KeyError, IndexError):
            errors.append(f"{cite}: key path not found in results/{m.group('file')}.json")
            continue
        if not written_by_a_script(m.group("file")):
            errors.append(f"{cite}: no script under benchmarks/ writes results/{m.group('file')}.json")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{cite}: resolves to {value!r}, not a finite number")
            continue
        before = NUMBER_BEFORE.search(text[: m.start()])
        if before is None:
            errors.append(f"{cite}: no number right before the citation (write '<number> {cite}')")
            continue
        if not shown_matches(before.group("num"), before.group("suffix"), value):
            errors.append(f"{cite}: the docs show {before.group('num')}{before.group('suffix') or ''} "
                          f"but the JSON holds {value!r} (drift)")
    return errors


# ---------------------------------------------------------------- cited tests

@lru_cache(maxsize=None)
def _defined_names(path: Path) -> frozenset[str]:
    source = path.read_text()
    return frozenset(re.findall(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", source, re.M)
                     + re.findall(r"^\s*class\s+(\w+)\b", source, re.M))


def _test_exists(path: str, names: list[str]) -> bool:
    files = [Path(p) for p in glob.glob(str(ROOT / path))]
    if not files:
        return False
    if not names:
        return True
    return any(all(fnmatch.filter(_defined_names(f), n.split("[")[0]) for n in names) for f in files)


def cited_test_errors(cell: str) -> list[str]:
    """Problems with the tests a cell cites. A bare file name is read relative to the last full path in the cell."""
    errors, last_dir = [], None
    for m in TEST_REF.finditer(cell):
        path, names = m.group("path"), [n for n in m.group("names").split("::") if n]
        if path.startswith("tests/"):
            last_dir = str(Path(path).parent)
        elif last_dir is not None:
            path = f"{last_dir}/{path}"
        else:
            errors.append(f"`{m.group(0)}`: cite tests from the repository root, as tests/path.py::test_name")
            continue
        if not _test_exists(path, names):
            errors.append(f"`{path}{m.group('names')}`: no such test")
    for name in BARE_TEST_NAME.findall(cell):
        errors.append(f"`{name}`: a test name without its file; cite it as tests/path.py::{name}")
    return errors


# ---------------------------------------------------------------- rows

def _cells(line: str) -> list[str]:
    return [c.strip() for c in CELL_SPLIT.split(line.strip())[1:-1]]


def uncited_error(effect: str) -> str | None:
    """A measured effect with digits but no citation, no 'arithmetic:' and no 'not built' is untraceable."""
    if CITATION.search(effect) or "arithmetic:" in effect or "not built" in effect:
        return None
    stripped = ID_REFERENCE.sub("", re.sub(r"`[^`]*`", "", effect))
    if re.search(r"(?<![A-Za-z_\d])\d", stripped):  # a standalone number, not the 3 of llama3 or the 32 of fp32
        return "numbers without a citation: cite each as (results/<file>.json:<keypath>) or label it 'arithmetic:'"
    return None


def technique_rows() -> dict[str, tuple[str, list[str]]]:
    rows = {}
    for line in TECHNIQUES.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group("id")] = (line, _cells(line))
    return rows


def readme_rows() -> dict[str, tuple[str, list[str]]]:
    """Rows of the README's '## Benchmarks' table, keyed 'README:<script>'."""
    rows, inside = {}, False
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Benchmarks"
        elif inside and line.startswith("| `"):
            cells = _cells(line)
            script = cells[0].strip("`").split("`")[0]
            rows[f"README:{script}"] = (line, cells)
    return rows


def row_errors(key: str, line: str, cells: list[str]) -> list[str]:
    errors = citation_errors(line)
    if key.startswith("README:"):
        if len(cells) != 3:
            errors.append(f"expected 3 columns (benchmark | baseline | result), found {len(cells)}")
            return errors
        script = key.split(":", 1)[1]
        if not (ROOT / "benchmarks" / script).is_file():
            errors.append(f"benchmarks/{script} does not exist")
        effect = cells[2]
    else:
        if len(cells) != 6:
            errors.append(f"expected 6 columns (id | technique | module | switch | test | effect), found {len(cells)}")
            return errors
        effect = cells[5]
        errors += cited_test_errors(cells[4])
    errors += cited_test_errors(effect) if "tests/" in effect else []
    problem = uncited_error(effect)
    if problem:
        errors.append(problem)
    return errors


def all_rows() -> dict[str, tuple[str, list[str]]]:
    return {**technique_rows(), **readme_rows()}


# ---------------------------------------------------------------- tests of the checker itself

def test_keypath_grammar_and_rounding():
    doc = [{"metric": "a", "ours": 0.59244, "ratio": 1.6449}, {"metric": "ttft_s_rate0.7", "ours": 1234.5}]
    assert _resolve(doc, "metric=a.ours".split(".")) == 0.59244
    assert _resolve(doc, "1.ours".split(".")) == 1234.5
    assert _resolve(doc, "metric=ttft_s_rate0.7.ours".split(".")) == 1234.5
    with pytest.raises(KeyError):
        _resolve(doc, "metric=b.ours".split("."))
    assert shown_matches("59.2", "%", 0.59244) and shown_matches("0.592", None, 0.59244)
    assert not shown_matches("58.7", "%", 0.59244) and not shown_matches("0.59", None, 0.5)
    assert shown_matches("1,235", None, 1234.5) and shown_matches("1.64", "×", 1.6449)
    assert shown_matches("2.75e9", None, 2.7512e9) and not shown_matches("2.8e9", None, 2.7e9)
    assert shown_matches("−0.15", "%", -0.0015)


def test_checker_catches_drift_missing_tests_and_uncited_numbers():
    assert uncited_error("val loss 1.57 vs 1.91") is not None
    assert uncited_error("see VI.3 and issue #2") is None
    assert uncited_error("arithmetic: 4 × 8 = 32") is None
    assert uncited_error("llama3 and qwen2 logits in fp32") is None
    assert cited_test_errors("`tests/test_docs_numbers.py::test_keypath_grammar_and_rounding`") == []
    assert cited_test_errors("`tests/test_docs_numbers.py::no_such_test`")
    assert cited_test_errors("`tests/no_such_file.py`")
    assert cited_test_errors("`test_foo_bar`")
    file, key = _first_citable()
    value = resolve(file, key)
    assert citation_errors(f"{value} (results/{file}.json:{key})") == []
    assert citation_errors(f"{value * 1.5 + 1:.3f} (results/{file}.json:{key})")
    assert citation_errors(f"(results/{file}.json:{key})")
    assert citation_errors("1.0 (results/no_such_file.json:ours)")


def _first_citable() -> tuple[str, str]:
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("ours"), float):
            return path.stem, "0.ours"
    pytest.skip("no results file with a float 'ours' value")


# ---------------------------------------------------------------- the docs

ROWS = all_rows()


@pytest.mark.parametrize("key", sorted(ROWS))
def test_row_is_traceable(key):
    line, cells = ROWS[key]
    errors = row_errors(key, line, cells)
    assert not errors, f"{key}:\n  " + "\n  ".join(errors)


def test_every_citation_outside_rows_resolves():
    """Citations in prose and in the measured tables (not id rows) must resolve and agree too."""
    errors, row_lines = [], {line for line, _ in ROWS.values()}
    for doc in (TECHNIQUES, README):
        for line in doc.read_text().splitlines():
            if line not in row_lines:
                errors += citation_errors(line)
    assert not errors, "\n".join(errors)


def test_every_techniques_row_has_six_columns_and_ids_are_unique():
    ids = [m.group("id") for m in map(ROW.match, TECHNIQUES.read_text().splitlines()) if m]
    assert len(ids) == len(set(ids)), "duplicate technique ids"
    assert len(ids) >= 150
