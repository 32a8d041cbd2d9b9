"""The pipeline report: a kept/dropped table per step and reason, report.json, report.md, funnel.png.

Usage:
    from lmstack.data.report import render_table, write_report
    print(render_table(report))                       # plain-text table
    write_report(report, "out/")                      # report.json + report.md + funnel.png
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.config import atomic_write_text
from lmstack.data.document import Report


def table_rows(report: Report) -> list[tuple[str, str, str, str, str]]:
    """(step, in, kept, dropped, reasons) rows; reasons sorted by count."""
    rows = []
    for s in report.steps.values():
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
        if s.modified:
            extra = ", ".join(f"{k}={n}" for k, n in sorted(s.modified.items()))
            reasons = f"{reasons}; changed: {extra}" if reasons else f"changed: {extra}"
        rows.append((s.name, f"{s.seen:,}", f"{s.kept:,}", f"{s.n_dropped:,}", reasons or "-"))
    return rows


def render_table(report: Report) -> str:
    """A plain-text table of every step."""
    header = ("step", "in", "kept", "dropped", "reasons")
    rows = [header] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [r[k].rjust(widths[k]) for k in (1, 2, 3)] + [r[4]]))
        if i == 0:
            lines.append("-" * (sum(widths) + 8 + len(header[4])))
    return "\n".join(lines)


def bad_record_lines(report: Report, limit: int = 10) -> list[str]:
    """'file:line  reason' for the first `limit` records the readers skipped, plus a line for the rest."""
    read = report.sections.get("read") or {}
    records = read.get("bad_records") or []
    total = read.get("malformed_lines", len(records))
    files = read.get("skipped_files") or {}
    if not records and not files:
        return []
    what = [f"{total:,} bad record(s)"] * bool(total) + [f"{len(files):,} file(s)"] * bool(files)
    lines = [f"skipped {' and '.join(what)} (report.json: read.bad_records, read.malformed, read.skipped_files):"]
    lines += [f"  {r['file']}:{r['line']}  {r['reason']}" for r in records[:limit]]
    if total > min(limit, len(records)):
        lines.append(f"  ... and {total - min(limit, len(records)):,} more")
    lines += [f"  {path}: whole file skipped, {why}" for path, why in list(files.items())[:limit]]
    return lines


def print_report(report: Report) -> None:
    """Print the table with rich when installed, else as plain text, then the bad records skipped."""
    bad = "\n".join(bad_record_lines(report))
    try:
        # lazy: optional extra (rich)
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_table(report))
        if bad:
            print(bad)
        return
    table = Table(title="data pipeline: documents per step")
    for name, justify in (("step", "left"), ("in", "right"), ("kept", "right"), ("dropped", "right"), ("reasons", "left")):
        table.add_column(name, justify=justify)
    for row in table_rows(report):
        table.add_row(*row)
    Console().print(table)
    if bad:
        print(bad)  # plain, so paths are never wrapped or styled


def render_markdown(report: Report) -> str:
    lines = ["# Data pipeline report", "", "| step | in | kept | dropped | reasons |", "|---|---:|---:|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in table_rows(report)]
    for name, section in report.sections.items():
        lines += ["", f"## {name}", "", "```json", json.dumps(section, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


def plot_funnel(report: Report, path: str | Path) -> None:
    """Horizontal bars: documents entering the pipeline and left after each step."""
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    funnel = report.funnel()
    labels = ["input"] + [name for name, _, _ in funnel]
    values = [funnel[0][1] if funnel else 0] + [kept for _, _, kept in funnel]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color="#4C72B0")
    top = max(values) if values else 1
    for yi, v in zip(y, values):
        ax.text(v + 0.01 * top, yi, f"{v:,}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlabel("documents")
    ax.set_xlim(0, top * 1.15 + 1)
    ax.set_title("documents kept after each step")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: Report, out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and a funnel PNG into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md",
             "png": out / ("funnel.png" if stem == "report" else f"{stem}_funnel.png")}
    atomic_write_text(paths["json"], json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    atomic_write_text(paths["md"], render_markdown(report))
    plot_funnel(report, paths["png"])
    return paths

