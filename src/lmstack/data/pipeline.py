"""The data pipeline runner: read -> filter -> dedup -> decontaminate -> (augment) -> mix -> shard.

Three stages, each streaming so memory stays flat:
1. clean: readers feed batches to a multiprocessing Pool; each worker runs the enabled filters,
   computes dedup signatures and marks eval-set overlaps (all pure, per batch). The main process
   then applies dedup (one index, in document order), the decontamination verdict and augmentation,
   and appends survivors to clean.jsonl.
2. mix: per-document copy counts from source weights, language temperature and topic balance.
3. shard: clean.jsonl, with each document repeated by its copy count, is tokenized by the pool
   into token shards (resumable; see shards.py). Dedup signatures are saved next to the manifest,
   so `lmstack data add` can extend the set later without touching old data.

Every step's kept/dropped counts per reason land in a Report, written as report.json, report.md
and funnel.png into `out`.

No single record stops a run: the readers count and skip bad records, naming file and line
(report.json: read.bad_records, also printed under the table), and a filter that raises on one
document drops that document alone as 'error:<ExceptionType>' (see `Isolated`).

Usage:
    from lmstack.data.pipeline import PipelineConfig, run_pipeline
    from lmstack.config import load_config
    cfg = load_config(PipelineConfig, "pipeline.yaml")
    report = run_pipeline(cfg)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import datetime as _dt
import json
import os
from pathlib import Path
import random
import tempfile
import time
from typing import Any, Callable, Iterator, Literal

import numpy as np
from tqdm import tqdm

from lmstack.config import save_config
from lmstack.data.augment import AugmentConfig, Augmenter
from lmstack.data.decontaminate import DecontamConfig, Decontaminator, contamination_report, decontam_verdict
from lmstack.data.dedup import DedupConfig, Deduplicator
from lmstack.data.document import Doc, Report, StepResult, run_steps
from lmstack.data.filters import FILTERS, FiltersConfig, build_filters
from lmstack.data.mixing import MixConfig, achieved_shares, mixture_copies
from lmstack.data.parallel import parallel_map
from lmstack.data.readers import batched, expand_paths, read_all, source_name
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import ReadStats
from lmstack.data.report import print_report, write_report
from lmstack.data.shards import ShardConfig, read_manifest, write_manifest, write_shards
from lmstack.data.topics import TopicModel
from lmstack.errors import LmstackError

CLEAN = "clean.jsonl"
SHARDS = "shards"
DEDUP = "dedup"  # signatures live in shards/dedup.gen<N>/, next to manifest.json


@dataclass
class PipelineConfig:
    """A whole data-pipeline run: inputs, each step's settings, and where the results go."""

    inputs: list[ReaderConfig] = field(default_factory=list)
    """Sources to read (each: path, format, source name, fields...)."""
    out: str = "data/pipeline"
    """Output directory: clean.jsonl, shards/, report.json/.md, funnel.png, pipeline.yaml."""
    workers: int = 2
    """Worker processes for filtering and tokenizing (1 = everything in this process)."""
    batch_size: int = 256
    """Documents per batch handed to a worker."""
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    """Filters, each with its own switch."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near-duplicate removal."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Eval sets to protect (n-gram overlap)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Counterfactual and noise augmentation (off by default)."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Source weights, language temperature, topic balance."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Tokenizer and shard layout."""
    progress: bool = True
    """Show progress bars."""
    executor: Literal["local", "ray"] = "local"
    """local: a multiprocessing Pool on this machine; ray: Ray Data on a Ray instance (see ray_executor.py)."""
    ray_address: str = ""
    """executor=ray: '' starts a private local Ray instance with `workers` CPUs; 'auto' joins the cluster
    `ray start --head` made on this machine; 'host:6379' or 'ray://host:10001' a remote cluster."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"workers={self.workers} and batch_size={self.batch_size} must be >= 1")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor={self.executor!r}: choose one of 'local', 'ray'")


def decontam_active(cfg: DecontamConfig) -> bool:
    return cfg.enabled and bool(cfg.paths or cfg.strings)


def check_config(cfg: PipelineConfig) -> None:
    """Fail before any work on problems a long run would only hit at the end."""
    if not cfg.inputs:
        raise LmstackError("pipeline has no inputs: give inputs: [{path: corpus.jsonl}, ...] (for the built-in "
                           "corpus: `lmstack data synth --out data/world`, then path: data/world/pretrain/train.jsonl)")
    for reader in cfg.inputs:
        expand_paths(reader.path)  # a missing input fails now, not after hours of work on the others
    for path in cfg.decontam.paths if cfg.decontam.enabled else []:
        if not Path(path).exists():
            raise LmstackError(f"decontam.paths: {path} does not exist")
    sources = {source_name(r) for r in cfg.inputs}
    if cfg.mix.enabled and cfg.mix.weights:
        missing, unknown = sources - set(cfg.mix.weights), set(cfg.mix.weights) - sources
        if missing or unknown:
            raise LmstackError(f"mix.weights must name exactly the sources {sorted(sources)}; "
                               f"missing {sorted(missing)}, unknown {sorted(unknown)}")


# ---- stage 1: clean (workers) --------------------------------------------------------------------
_STAGE: dict[str, Any] = {}


class Isolated:
    """A filter step that one document cannot break: if the step raises on a batch, it is rerun one
    document at a time, and each document it still raises on is dropped as 'error:<ExceptionType>'.

    A setup problem (LmstackError), or a failure on every document of a batch of several, is not a
    bad record but a broken step, so it is raised as before."""

    def __init__(self, step: Callable[[list[Doc]], StepResult]) -> None:
        self.step = step

    def __call__(self, batch: list[Doc]) -> StepResult:
        try:
            return self.step(batch)
        except LmstackError:
            raise
        except Exception as first:  # noqa: BLE001 - find the document(s) at fault below
            out = StepResult(kept=[], dropped=[])
            failed = 0
            for doc in batch:
                try:
                    res = self.step([doc])
                except LmstackError:
                    raise
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    out.dropped.append((doc, f"error:{type(e).__name__}"))
                    continue
                out.kept.extend(res.kept)
                out.dropped.extend(res.dropped)
                out.modified.update(res.modified)
            if failed == len(batch) > 1:
                raise first
            return out


def _init_stage(cfg: PipelineConfig) -> None:
    """Build the per-worker steps once: filters, a signer for dedup, the eval n-gram index."""
    _STAGE.clear()
    try:
        _STAGE["filters"] = [(name, Isolated(step)) for name, step in build_filters(cfg.filters)]
        _STAGE["dedup"] = Deduplicator(cfg.dedup)
        _STAGE["decontam"] = Decontaminator(cfg.decontam) if decontam_active(cfg.decontam) else None
    except Exception as e:  # noqa: BLE001 - an initializer that raises makes Pool respawn workers forever
        _STAGE["error"] = e


def _process_batch(batch: list[Doc]) -> tuple[int, list[Doc], dict[str, dict], dict[str, np.ndarray]]:
    """Pure per-batch work: filters, dedup signatures, eval-overlap annotations."""
    if "error" in _STAGE:
        raise _STAGE["error"]
    kept, summaries = run_steps(_STAGE["filters"], batch)
    sigs = _STAGE["dedup"].signatures(kept)
    if _STAGE["decontam"] is not None:
        t0 = time.perf_counter()
        kept = _STAGE["decontam"].annotate(kept)
        summaries["_decontam_seconds"] = {"seconds": time.perf_counter() - t0}
    return len(batch), kept, summaries, sigs


@dataclass
class Cleaned:
    """What stage 1 leaves for mixing: per kept document its source and language, plus a text sample."""

    sources: list[str] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)
    hits: list[list[str]] = field(default_factory=list)

    def add(self, doc: Doc, rng: random.Random, cap: int) -> None:
        """Note one kept document (in clean.jsonl order), keeping a reservoir sample of texts."""
        self.sources.append(doc["source"])
        self.langs.append(doc["meta"].get("lang", "unknown"))
        seen = len(self.sources)
        # Reservoir sample (algorithm R) of texts for fitting the topic model.
        if len(self.sample) < cap:
            self.sample.append(doc["text"])
        elif (j := rng.randrange(seen)) < cap:
            self.sample[j] = doc["text"]


def declare_steps(cfg: PipelineConfig, report: Report) -> tuple[bool, Augmenter]:
    """Fix the report table's step order before counts arrive; (decontamination on?, the augmenter)."""
    for name in ["read"] + [n for n in FILTERS if getattr(cfg.filters, n).enabled] + ["dedup"]:
        report.step(name)
    dec_on = decontam_active(cfg.decontam)
    if dec_on:
        report.step("decontaminate")
    augmenter = Augmenter(cfg.augment)
    if augmenter.enabled:
        report.step("augment")
    return dec_on, augmenter


def finish_clean(report: Report, stats: ReadStats, out: Cleaned, dd: Deduplicator, dec_on: bool) -> None:
    """The clean stage's report sections: read counts, languages, dedup clusters, contamination."""
    report.step("read").add(stats.docs, stats.dropped(), stats.modified())
    report.sections["read"] = stats.to_dict()
    report.sections["languages"] = dict(sorted(_count(out.langs).items(), key=lambda kv: -kv[1]))
    report.sections["dedup"] = dd.clusters()
    if dec_on:
        report.sections["contamination"] = contamination_report(out.hits)


def write_clean_batch(kept: list[Doc], cfg: PipelineConfig, dec_on: bool, augmenter, report: Report, out: Cleaned,
                      f, rng: random.Random, cap: int, dec_seconds: float = 0.0) -> int:
    """The clean stage's tail for one deduplicated batch, shared by both executors: decontaminate, augment,
    write each survivor to clean.jsonl and note it for the topic mix. Returns how many were written."""
    if dec_on:
        res = decontam_verdict(kept, cfg.decontam.action)
        report.record("decontaminate", res, dec_seconds)
        out.hits.extend(d["meta"]["contamination"] for d in kept if d["meta"].get("contamination"))
        kept = res.kept
    if augmenter.enabled:
        res = augmenter(kept)
        report.add_summary("augment", {"kept": len(kept), "dropped": {}, "modified": dict(res.modified)})
        kept = res.kept
    for doc in kept:
        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        out.add(doc, rng, cap)
    return len(kept)


def clean_stage(cfg: PipelineConfig, dd: Deduplicator, report: Report, clean_path: Path) -> Cleaned:
    """Read, filter, dedup, decontaminate and augment; write survivors to `clean_path` atomically."""
    stats = ReadStats()
    dec_on, augmenter = declare_steps(cfg, report)
    out = Cleaned()
    rng = random.Random(cfg.mix.topics.seed)
    cap = cfg.mix.topics.max_fit_docs
    seen = 0
    bar = None
    if cfg.progress:
        bar = tqdm(desc="clean", unit="doc")
    clean_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=clean_path.parent, prefix=f".{clean_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            batches = batched(read_all(cfg.inputs, stats), cfg.batch_size)
            for n_in, kept, summaries, sigs in parallel_map(_process_batch, batches, cfg.workers, _init_stage, (cfg,)):
                dec_seconds = summaries.pop("_decontam_seconds", {}).get("seconds", 0.0)
                for name, s in summaries.items():
                    report.add_summary(name, s, s["seconds"])
                t0 = time.perf_counter()
                res = dd.apply(kept, sigs)
                report.record("dedup", res, time.perf_counter() - t0)
                seen += write_clean_batch(res.kept, cfg, dec_on, augmenter, report, out, f, rng, cap, dec_seconds)
                if bar is not None:
                    bar.update(n_in)
                    bar.set_postfix(kept=seen)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, clean_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    finish_clean(report, stats, out, dd, dec_on)
    return out


def _count(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return counts


def iter_clean(path: Path) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# ---- stage 2: mix --------------------------------------------------------------------------------
def mix_stage(cfg: PipelineConfig, cleaned: Cleaned, clean_path: Path, report: Report) -> np.ndarray:
    """Copy count per clean document, and the mixing section of the report."""
    n = len(cleaned.sources)
    groups: dict[str, list] = {"source": cleaned.sources, "lang": cleaned.langs}
    info: dict[str, Any] = {}
    topics_cfg = cfg.mix.topics
    if cfg.mix.enabled and topics_cfg.enabled and n >= topics_cfg.n_topics:
        model = TopicModel(topics_cfg).fit(cleaned.sample)
        labels = []
        for batch in batched(iter_clean(clean_path), 2048):
            labels.extend(model.predict([d["text"] for d in batch]).tolist())
        groups["topic"] = labels
        info["topic_terms"] = {str(k): terms for k, terms in enumerate(model.top_terms(8))}
    t0 = time.perf_counter()
    copies = mixture_copies(groups, cfg.mix) if cfg.mix.enabled else np.ones(n, dtype=np.int64)
    report.step("mix").add(int((copies > 0).sum()), {"downsampled": int((copies == 0).sum())},
                           {"extra_copies": int(np.clip(copies - 1, 0, None).sum())}, seconds=time.perf_counter() - t0)
    ones = np.ones(n, dtype=np.int64)
    for rule, keys in groups.items():
        info[rule] = {"before": achieved_shares(keys, ones), "after": achieved_shares(keys, copies)}
    if cfg.mix.weights:
        total = sum(cfg.mix.weights.values())
        info["source"]["target"] = {k: round(v / total, 4) for k, v in sorted(cfg.mix.weights.items())}
    report.sections["mixing"] = info
    return copies


def repeat_docs(clean_path: Path, copies: np.ndarray) -> Iterator[Doc]:
    """The clean documents, each as many times as its copy count (repeats get '#rep<k>' ids)."""
    for doc, c in zip(iter_clean(clean_path), copies.tolist()):
        for k in range(c):
            yield doc if k == 0 else {**doc, "id": f"{doc['id']}#rep{k}"}


# ---- stage 3: shard, and the whole run -------------------------------------------------------------
def shard_stage(cfg: PipelineConfig, docs: Iterator[Doc], report: Report, start_index: int = 0,
                generation: int = 0, map_fn: Callable = parallel_map) -> dict[str, Any]:
    out = Path(cfg.out) / SHARDS
    t0 = time.perf_counter()
    manifest = write_shards(docs, out, cfg.shards, cfg.workers, start_index, generation, progress=cfg.progress,
                            map_fn=map_fn)
    mine = [e for e in manifest["shards"] if e["index"] >= start_index]
    n_docs = sum(e["n_docs"] for e in mine)
    report.step("shard").add(n_docs, {}, seconds=time.perf_counter() - t0)
    raw, stored = sum(e["raw_bytes"] for e in mine), sum(e["bytes"] for e in mine)
    report.sections["shards"] = {
        "dir": str(out), "shards": len(mine), "docs": n_docs, "tokens": sum(e["n_tokens"] for e in mine),
        "dtype": manifest["dtype"], "compression": manifest["compression"], "raw_bytes": raw, "bytes": stored,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "resumed": manifest["resumed"], "written": manifest["written"],
        "total_tokens_in_set": manifest["total_tokens"]}
    return manifest


def mark_pending(out: Path, generation: int, start_index: int) -> None:
    """Note in the manifest (if any) that a generation is being written; cleared by finish_generation."""
    manifest = read_manifest(out)
    if manifest is not None:
        manifest["pending"] = {"generation": generation, "start_index": start_index}
        write_manifest(out, manifest)


def finish_generation(out: Path, generation: int, start_index: int, inputs: list[ReaderConfig], n_docs: int,
                      dd: Deduplicator) -> None:
    """Save dedup signatures and record the finished generation in the manifest, crash-safely.

    Signatures go to a fresh directory 'dedup.gen<N>'; only the manifest rewrite (atomic) switches to
    it, so a kill at any point leaves the manifest naming a complete set. Older sets are then removed.
    """
    dedup_dir = f"{DEDUP}.gen{generation}"
    dd.save(out / dedup_dir)
    manifest = read_manifest(out)
    gens = [g for g in manifest.get("generations", []) if g["generation"] < generation]
    gens.append({"generation": generation, "inputs": [r.path for r in inputs], "docs": n_docs,
                 "shards": [e["index"] for e in manifest["shards"] if e["index"] >= start_index],
                 "date": _dt.date.today().isoformat()})
    manifest["generations"] = gens
    manifest["dedup"] = dedup_dir
    manifest.pop("pending", None)
    write_manifest(out, manifest)
    for old in out.glob(f"{DEDUP}.gen*"):
        if old.name != dedup_dir and old.is_dir():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


@contextlib.contextmanager
def executor(cfg: PipelineConfig) -> Iterator[tuple[Callable, Callable]]:
    """(clean stage, ordered map for tokenizing) of the chosen executor; both give the same bytes.

    ray is imported only when chosen, so the local executor never needs it installed."""
    if cfg.executor == "ray":
        # lazy: cycle (ray_executor imports pipeline), and ray is an optional extra
        from lmstack.data.ray_executor import ray_clean_stage, ray_map, ray_session

        with ray_session(cfg.ray_address, cfg.workers):
            yield ray_clean_stage, ray_map
    else:
        yield clean_stage, parallel_map


def run_pipeline(cfg: PipelineConfig, before_shards: Callable[[Path], str | None] | None = None) -> Report:
    """Run the whole pipeline into `cfg.out`; print the table and write the report files.

    before_shards(clean_jsonl_path) runs after cleaning and mixing, before tokenizing; if it returns a
    tokenizer path, the shards use it. The speedrun trains its BPE tokenizer on the clean text this way."""
    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline.yaml")
    report = Report()
    t0 = time.perf_counter()
    dd = Deduplicator(cfg.dedup)
    clean_path = out / CLEAN
    mark_pending(out / SHARDS, 0, 0)
    with executor(cfg) as (clean, map_fn):
        cleaned = clean(cfg, dd, report, clean_path)
        copies = mix_stage(cfg, cleaned, clean_path, report)
        if before_shards is not None:
            tokenizer = before_shards(clean_path)
            if tokenizer:
                cfg.shards.tokenizer = str(tokenizer)
        shard_stage(cfg, repeat_docs(clean_path, copies), report, map_fn=map_fn)
    finish_generation(out / SHARDS, 0, 0, cfg.inputs, int(copies.sum()), dd)
    report.sections["seconds"] = round(time.perf_counter() - t0, 2)
    write_report(report, out)
    if cfg.progress:
        print_report(report)
    return report
