"""Online dataset expansion: append new sources to an existing shard set, incrementally.

`add_sources` reuses the settings the set was built with (pipeline.yaml in the output directory)
and runs only the new documents through read -> filter -> dedup -> decontaminate -> shard:
- dedup checks them against the signatures stored next to the manifest (every earlier document)
  and against each other, then the stored signatures are extended;
- decontamination uses the same eval sets;
- new shards are numbered after the existing ones and recorded as a new generation in the
  manifest; old shards, their entries and the old clean.jsonl are never read or rewritten.
Mixing weights describe the base run and are not re-applied: each new document is stored once.

Crash safety: the manifest marks the generation as pending before any work; a rerun of the same
`add` resumes it (same shard numbers, finished shards reused), and the dedup signatures switch to
the extended set only when the generation is recorded.

Usage:
    from lmstack.data.expand import add_sources
    from lmstack.data.readers.config import ReaderConfig
    report = add_sources("data/pipeline", [ReaderConfig(path="new_docs.jsonl", source="news")])
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from lmstack.config import load_config
from lmstack.data.dedup import Deduplicator
from lmstack.data.document import Report
from lmstack.data.pipeline import (SHARDS, PipelineConfig, clean_stage, finish_generation, mark_pending, repeat_docs,
                                   shard_stage)
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.report import print_report, write_report
from lmstack.data.shards import read_manifest
from lmstack.errors import LmstackError


def add_sources(out: str | Path, inputs: list[ReaderConfig], workers: int | None = None,
                progress: bool = True) -> Report:
    """Append the documents of `inputs` to the shard set in `out`; return the report of this addition."""
    out = Path(out)
    if not inputs:
        raise LmstackError("add: give at least one input")
    cfg_file = out / "pipeline.yaml"
    if not cfg_file.is_file():
        raise LmstackError(f"{out} holds no pipeline.yaml: build it with `lmstack data run` first")
    base = load_config(PipelineConfig, cfg_file)
    cfg = dataclasses.replace(base, inputs=list(inputs), workers=workers or base.workers, progress=progress)
    shard_dir = out / SHARDS
    manifest = read_manifest(shard_dir)
    if manifest is None or not manifest.get("generations"):
        raise LmstackError(f"{shard_dir} holds no finished shard set: rerun `lmstack data run` first")
    pending = manifest.get("pending")
    if pending and pending["generation"] == 0:
        raise LmstackError(f"the base run in {out} did not finish: rerun `lmstack data run` first")
    if pending:
        generation, start = pending["generation"], pending["start_index"]  # resume a killed addition
    else:
        generation = max(g["generation"] for g in manifest["generations"]) + 1
        start = max((e["index"] for e in manifest["shards"]), default=-1) + 1
        mark_pending(shard_dir, generation, start)
    t0 = time.perf_counter()
    dd = Deduplicator.load(shard_dir / manifest["dedup"])
    report = Report()
    clean_path = out / f"clean.gen{generation}.jsonl"
    cleaned = clean_stage(cfg, dd, report, clean_path)
    ones = np.ones(len(cleaned.sources), dtype=np.int64)
    shard_stage(cfg, repeat_docs(clean_path, ones), report, start_index=start, generation=generation)
    finish_generation(shard_dir, generation, start, cfg.inputs, len(ones), dd)
    report.sections["generation"] = {"generation": generation, "first_shard": start}
    report.sections["seconds"] = round(time.perf_counter() - t0, 2)
    write_report(report, out / "reports", stem=f"add_gen{generation}")
    if progress:
        print_report(report)
    return report
