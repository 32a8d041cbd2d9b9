"""Online dataset expansion (I.7): `add_sources` on a world corpus with planted duplicates and contamination.

The small world's pretraining split goes through the pipeline (quality rules off, so that planted copies reach
dedup; dedup, decontamination against the world's held-out QA and arithmetic test items, shards). Then expansion batch 1 (n documents: 70% new, 10% exact copies of stored
documents, 10% near copies, 10% quoting held-out eval items, as `planted` says) is appended with `add_sources`.
Measured: what each step dropped next to what was planted, whether every old shard file stayed byte-identical, and
the seconds the append took.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_expansion.py    (under a minute)
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import result, write_result

from lmstack.data.expand import add_sources  # noqa: E402
from lmstack.data.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from lmstack.data.readers.config import ReaderConfig  # noqa: E402

N = 500


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    from lmstack.world import World, generate_world, write_expansion_batch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_world(root / "world", size="small", seed=0)
        evals = [str(root / "world" / "qa" / "test.jsonl"), str(root / "world" / "arithmetic" / "test.jsonl")]
        cfg = PipelineConfig(inputs=[ReaderConfig(path=str(root / "world" / "pretrain" / "train.jsonl"),
                                                  source="world")],
                             out=str(root / "out"), workers=1, progress=False)
        cfg.filters.langid.enabled = False  # English by construction; langdetect is the slow step
        # Off so the planted copies reach dedup and decontamination (arithmetic text fails Gopher's alpha
        # fraction): the subject here is what the append does with duplicates and leaks, not quality rules.
        cfg.filters.quality.enabled = False
        cfg.decontam.paths = evals
        run_pipeline(cfg)
        shard_dir = root / "out" / "shards"
        before = {p.name: sha(p) for p in shard_dir.glob("shard_*")}

        batch = root / "batch_001.jsonl"
        write_expansion_batch(World(seed=0, size="small"), str(batch), batch=1, n=N)
        records = [json.loads(line) for line in batch.read_text().splitlines() if line.strip()]
        planted = Counter(r["planted"] for r in records)
        # Per document, which planted kinds the decontaminator flags (the append's report counts only totals).
        from lmstack.data.decontaminate import DecontamConfig, Decontaminator
        dec = Decontaminator(DecontamConfig(paths=evals))
        flagged = Counter(r["planted"] for r in records if dec.hits(r["text"])[0])
        t0 = time.perf_counter()
        report = add_sources(root / "out", [ReaderConfig(path=str(batch), source="news")], progress=False)
        seconds = time.perf_counter() - t0
        after = {p.name: sha(p) for p in shard_dir.glob("shard_*") if p.name in before}
        dedup = dict(report.steps["dedup"].dropped)
        decontam = dict(report.steps["decontaminate"].dropped)
        every_step = {name: dict(step.dropped) for name, step in report.steps.items() if step.dropped}

    same = sum(after.get(k) == v for k, v in before.items())
    cfg_out = dict(batch_docs=N, planted=dict(planted), dropped_by_step=every_step,
                   decontam_flags_by_planted_kind=dict(flagged),
                   old_shards=len(before), old_shards_byte_identical=same, seconds=round(seconds, 2),
                   world="seed 0, small", machine="2 cores, shared")
    exact = dedup.get("exact_duplicate", 0)
    near = sum(v for k, v in dedup.items() if k != "exact_duplicate")
    leaks = sum(decontam.values())
    result_flagged = result("data_expansion", "clean_new_docs_flagged_as_contaminated", False, flagged["new"],
                            "new documents in the batch", planted["new"], **cfg_out)
    write_result("data_expansion", [
        result("data_expansion", "exact_copies_dropped", True, exact, "exact copies planted", planted["exact_dup"],
               **cfg_out),
        result("data_expansion", "near_copies_dropped", True, near, "near copies planted", planted["near_dup"],
               **cfg_out),
        result("data_expansion", "contaminated_dropped", True, leaks, "contaminated docs planted",
               planted["contaminated"], **cfg_out),
        result("data_expansion", "planted_leaks_flagged", True, flagged["contaminated"], "contaminated docs planted",
               planted["contaminated"], **cfg_out),
        result_flagged,
    ])


if __name__ == "__main__":
    main()
