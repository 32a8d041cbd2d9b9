"""A single-line document of tens of MB through the data pipeline: peak memory and seconds, before/after.

Before = the package at commit BEFORE (issue 15: a 50 MB one-line document peaked at 2.8 GB and took
27 s in the quality filter). After = this working tree, where the readers cut documents over
max_doc_chars (1M characters) into parts at paragraph/line/space boundaries and the quality filter
checks length first in bounded memory. Each measurement runs in a fresh subprocess that reads
its peak RSS (reset after the imports through /proc/self/clear_refs, so `extra_mb` = peak minus the
RSS at start is what the workload added); before and after alternate, and we take medians.

Measured, for a JSONL file holding one long single-line document:
- quality stage: read_documents + QualityFilter (defaults: the document is too long to keep);
- full stats: the same with max_words=10**9, so every measurement is computed (parts in the after case);
- pipeline: `run_pipeline` (workers=1) on the long document plus 200 ordinary documents.

Usage:
    python benchmarks/data_long_document.py            # 50 MB, plus 12.5 and 25 MB for linearity
    python benchmarks/data_long_document.py --quick    # 8 MB only
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import result, write_result

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "1e39711"  # last commit before the issue-15 data fixes
WORDS = ("the river farmer village market teacher garden bridge storm harbour library mountain school doctor "
         "kitchen of and to with that have be crossed visited repaired painted described watched").split()

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
mode, path, out = sys.argv[2], sys.argv[3], sys.argv[4]
from lmstack.data.readers import batched, read_documents
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import ReadStats
from lmstack.data.filters.quality import QualityConfig, QualityFilter
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.data.shards import ShardConfig
# Reset the peak-RSS mark to the current RSS, so the peak measures this workload, not the imports.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
t0 = time.perf_counter()
info = {}
if mode in ("quality", "full_stats"):
    qf = QualityFilter(QualityConfig(max_words=10**9) if mode == "full_stats" else QualityConfig())
    stats, kept, reasons, docs = ReadStats(), 0, {}, 0
    for batch in batched(read_documents(ReaderConfig(path=path), stats), 256):
        res = qf(batch)
        docs += len(batch)
        kept += len(res.kept)
        for r, n in res.reasons().items():
            reasons[r] = reasons.get(r, 0) + n
    info = {"docs": docs, "kept": kept, "dropped": reasons}
else:
    rep = run_pipeline(PipelineConfig(inputs=[ReaderConfig(path=path)], out=out, workers=1, progress=False,
                                      shards=ShardConfig(docs_per_shard=64)))
    info = {"steps": {s.name: [s.seen, s.kept] for s in rep.steps.values()}}
secs = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter also remembers the RSS of the forked parent before exec.
peak_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"seconds": secs, "peak_mb": peak_kb / 1024, "start_mb": start_kb / 1024,
                  "extra_mb": (peak_kb - start_kb) / 1024, **info}))
"""


def make_doc_file(path: Path, mb: float, n_good: int = 0, seed: int = 0) -> int:
    """A JSONL file: n_good ordinary documents, then one single-line document of `mb` MB. Returns its bytes."""
    rng = random.Random(seed)
    target = int(mb * 1_000_000)
    sentences, size = [], 0
    while size < target:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
        sentences.append(s)
        size += len(s) + 1
    text = " ".join(sentences)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_good):
            body = " ".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(8))
            f.write(json.dumps({"text": body, "id": f"good{i}"}) + "\n")
        f.write(json.dumps({"text": text, "id": "long"}) + "\n")
    return len(text)


def run_child(src: Path, mode: str, path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), mode, str(path), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(srcs: dict[str, Path], mode: str, path: Path, tmp: Path, repeat: int) -> dict[str, list[dict]]:
    """Alternate before/after `repeat` times so contention on the shared machine hits both alike."""
    runs: dict[str, list[dict]] = {k: [] for k in srcs}
    for r in range(repeat):
        for name, src in srcs.items():
            runs[name].append(run_child(src, mode, path, tmp / f"out_{name}_{mode}_{r}"))
            print(f"  {mode} {name} #{r}: {runs[name][-1]['seconds']:.2f}s, +{runs[name][-1]['extra_mb']:.0f} MB")
    return runs


def med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sizes = [8.0] if args.quick else [12.5, 25.0, 50.0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        srcs = {"before": old / "src", "after": ROOT / "src"}
        cfg = {"machine": "2 cores, shared", "before_commit": BEFORE, "repeat": args.repeat,
               "method": "fresh subprocess per run; peak RSS mark reset after imports; extra = peak - start RSS; "
                         "before/after alternate; median"}
        results = []
        big = sizes[-1]
        for mb in sizes:
            path = tmp / f"long_{mb}.jsonl"
            chars = make_doc_file(path, mb)
            runs = measure(srcs, "quality", path, tmp, args.repeat)
            b, a = runs["before"], runs["after"]
            assert a[0]["dropped"] and b[0]["dropped"], "the long document should be dropped as too long"
            tag = f"{mb:g}mb".replace(".", "_")  # no dots: result keypaths split on them
            results.append(result("data_long_document", f"quality_seconds_{tag}", False, med(a, "seconds"),
                                  f"before ({BEFORE})", med(b, "seconds"), doc_chars=chars, **cfg))
            results.append(result("data_long_document", f"quality_extra_mb_{tag}", False, med(a, "extra_mb"),
                                  f"before ({BEFORE})", med(b, "extra_mb"), doc_chars=chars,
                                  extra_over_doc_after=round(med(a, "extra_mb") * 2**20 / chars, 2),
                                  extra_over_doc_before=round(med(b, "extra_mb") * 2**20 / chars, 2),
                                  peak_mb_after=med(a, "peak_mb"), peak_mb_before=med(b, "peak_mb"),
                                  after_dropped=a[0]["dropped"], before_dropped=b[0]["dropped"], **cfg))
        path = tmp / f"long_{big}.jsonl"
        chars = make_doc_file(path, big)
        runs = measure(srcs, "full_stats", path, tmp, 1)
        b, a = runs["before"], runs["after"]
        tag = f"{big:g}mb".replace(".", "_")
        results.append(result("data_long_document", f"full_stats_seconds_{tag}", False, med(a, "seconds"),
                              f"before ({BEFORE})", med(b, "seconds"), doc_chars=chars, after_docs=a[0]["docs"],
                              note="max_words=1e9: every measurement computed (after: on 1M-char parts)", **cfg))
        results.append(result("data_long_document", f"full_stats_extra_mb_{tag}", False, med(a, "extra_mb"),
                              f"before ({BEFORE})", med(b, "extra_mb"), doc_chars=chars,
                              extra_over_doc_after=round(med(a, "extra_mb") * 2**20 / chars, 2), **cfg))
        path = tmp / f"pipe_{big}.jsonl"
        chars = make_doc_file(path, big, n_good=200)
        runs = measure(srcs, "pipeline", path, tmp, 1)
        b, a = runs["before"], runs["after"]
        results.append(result("data_long_document", f"pipeline_seconds_{tag}", False, med(a, "seconds"),
                              f"before ({BEFORE})", med(b, "seconds"), doc_chars=chars, good_docs=200,
                              steps_after=a[0]["steps"], steps_before=b[0]["steps"], **cfg))
        results.append(result("data_long_document", f"pipeline_extra_mb_{tag}", False, med(a, "extra_mb"),
                              f"before ({BEFORE})", med(b, "extra_mb"), doc_chars=chars,
                              extra_over_doc_after=round(med(a, "extra_mb") * 2**20 / chars, 2), **cfg))
    write_result("data_long_document" + ("_quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
