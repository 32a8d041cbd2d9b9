"""What every report section shares: a JSON reader that tolerates a missing or broken file, and the
number formats of the report's table cells.

Usage:
    from lmstack.eval.report.common import fmt_num, fmt_score, read_json, rel_path
    fmt_num(0.12345)            # "0.1235"; "—" for a missing, non-numeric or non-finite value
    fmt_score(123456.0)         # "1.235e+05": 4 significant digits for big scores (perplexity)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def fmt_num(x: Any, fmt: str = "{:.4f}") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return fmt.format(x)


def fmt_score(x: Any) -> str:
    """A score: 4 decimals for the usual [0, 1]-ish metrics, 4 significant digits for big ones (perplexity)."""
    return fmt_num(x, "{:.4f}" if isinstance(x, (int, float)) and abs(x) < 1000 else "{:.4g}")


def rel_path(run: Path, path: Path) -> str:
    return path.relative_to(run).as_posix()
