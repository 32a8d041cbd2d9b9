"""The Ray executor of `lmstack data run`: the same pipeline, distributed by Ray Data.

`--executor ray` runs read -> filter -> dedup -> decontaminate -> shard on a Ray instance; its
clean.jsonl, shards, manifest and stored dedup signatures are byte-identical to the local executor's
for the same config (tests/data/test_ray_executor.py). Every technique keeps its one home: this
module calls the readers, `pipeline._process_batch` (filters, dedup signatures, eval-overlap marks),
`ray_dedup` (the dedup decision as shuffles) and `shards._build_shard`; it only distributes them.

    read       Ray Data `flat_map`, one task per input file (per reader when it sets max_docs, as
               that limit spans files); each task's ReadStats travel as one side row and are merged
               in file order, so report.json's read section is the local one.
    filter     `map_batches` of `batch_size` documents: filters, MinHash/exact signatures and the
               decontamination n-gram marks, all per document.
    dedup      two shuffles (`groupby` + `map_groups`): exact copies by text hash, near duplicates
               by LSH band (see ray_dedup.py for why this is the local keep rule).
    decontam.  the verdict on the marks, and augmentation, in the driver while clean.jsonl is
               written in document order, in the local executor's batches (augmentation draws
               random numbers per batch).
    mix        as the local executor (per-document copy counts; cheap, driver).
    shard      one Ray task per shard (tokenize + write), at most 2 per cluster CPU in flight.

What still passes through the driver: every document's id and dedup signature (~0.5 KB each with
128-permutation MinHash), so the stored dedup set is written exactly as the local run writes it,
and clean.jsonl, streamed in order. At ~10^8 documents that is tens of GB: past that, the stored set
would have to be written per partition.

Pointing it at a cluster: `ray start --head` on one machine (`ray start --address HEAD:6379` on the
others), then `lmstack data run --executor ray --ray_address auto` on the head, or
`--ray_address ray://HEAD:10001` from elsewhere (Ray Client: `pip install 'ray[client]'`). Input
files and `out` must be on a filesystem every node sees (NFS, a shared volume). With no address a
private local instance with `workers` CPUs is started and shut down after the run.

Usage:
    lmstack data run --config pipeline.yaml --executor ray                      # local Ray
    lmstack data run --config pipeline.yaml --executor ray --ray_address auto   # a cluster
"""
from __future__ import annotations

from collections import deque
import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
import random
import socket
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lmstack.config import from_dict, to_dict
from lmstack.data import pipeline
from lmstack.data.dedup import Deduplicator
from lmstack.data.document import EXAMPLES_PER_REASON, Report, make_doc
from lmstack.data.pipeline import Cleaned, declare_steps, finish_clean, write_clean_batch
from lmstack.data.ray_dedup import exact_duplicates, near_pairs, near_representatives
from lmstack.data.readers import expand_paths, read_documents, source_name
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import MAX_BAD_RECORDS, MAX_LINE_EXAMPLES, ReadStats
from lmstack.errors import LmstackError

RAY_REQUIREMENT = "ray[data]==2.60.0"
INSTALL = f"pip install '{RAY_REQUIREMENT}'  (or, in a checkout: pip install -e '.[ray]')"
CONNECT_TIMEOUT_S = 10.0
POS_BITS = 40  # pos = read task << 40 | document number in the task: the document order, as one int64
SIDE_POS = (1 << POS_BITS) - 1


# ---- the Ray instance ----------------------------------------------------------------------------
def import_ray() -> Any:
    """The ray module, or an LmstackError that says how to install it."""
    try:
        # lazy: optional extra (ray)
        import ray
        import ray.data  # noqa: F401 - the Data library is an extra of the ray package
    except ImportError as e:
        raise LmstackError(f"--executor ray needs Ray Data, which is not installed ({e}); install it with: "
                           f"{INSTALL}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout` seconds when a host:port address does not answer.

    ray.init retries an unreachable GCS for about a minute before it gives up; a TCP connect first
    answers the common mistakes (wrong host, wrong port, cluster not started) at once."""
    if address in ("", "auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LmstackError(f"ray_address {address!r}: expected 'auto', 'HOST:6379' or 'ray://HOST:10001'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise LmstackError(f"cannot reach the Ray cluster at {address!r} within {timeout:.0f} s "
                           f"({e.strerror or type(e).__name__}); start one with `ray start --head` and pass "
                           "--ray_address auto (on the head) or ray://HEAD:10001") from None


@contextlib.contextmanager
def ray_session(address: str, workers: int) -> Iterator[Any]:
    """Connect to (or start) Ray for one run; shut it down after, unless the caller had started it."""
    ray = import_ray()
    check_reachable(address)  # even with Ray running here: an address given and unreachable is a mistake
    if ray.is_initialized():  # a test module or notebook owns the instance: use it, leave it running
        yield ray
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address in ("", "local"):
        kwargs.update(num_cpus=workers, include_dashboard=False)
    elif not address.startswith("ray://"):
        kwargs.update(include_dashboard=False)
    try:
        # 'local' always starts a fresh instance, even where `ray start` left one running on this machine.
        ray.init(address=address or "local", **kwargs)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, grpc errors: all mean "no cluster"
        raise LmstackError(f"cannot connect to Ray at {address or 'a new local instance'!r}: {type(e).__name__}: "
                           f"{e} (start a cluster with `ray start --head`, or leave --ray_address empty for a "
                           "private local instance)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- read ----------------------------------------------------------------------------------------
def read_tasks(inputs: list[ReaderConfig]) -> list[dict[str, Any]]:
    """One task per input file, in reading order (one per reader where max_docs spans its files)."""
    tasks: list[dict[str, Any]] = []
    for r in inputs:
        files = [str(p) for p in expand_paths(r.path)]
        per_file = [dataclasses.replace(r, path=f, source=source_name(r)) for f in files]
        for cfg in [r] if r.max_docs else per_file:
            tasks.append({"k": len(tasks), "reader": json.dumps(to_dict(cfg))})
    return tasks


def _read_task(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stats = ReadStats()
    base = int(row["k"]) << POS_BITS
    for i, doc in enumerate(read_documents(from_dict(ReaderConfig, json.loads(row["reader"])), stats)):
        yield {"pos": base + i, "doc": json.dumps(doc, ensure_ascii=False), "side": ""}
    yield {"pos": base + SIDE_POS, "doc": "", "side": json.dumps({"read": dataclasses.asdict(stats)})}


def merge_read_stats(total: ReadStats, part: dict[str, Any]) -> None:
    """Add one task's ReadStats (as a dict) to `total`, as if one reader had read both in order."""
    for key in ("files_read", "docs", "empty"):
        setattr(total, key, getattr(total, key) + part[key])
    total.skipped_files.update(part["skipped_files"])
    for path, entry in part["malformed"].items():
        mine = total.malformed.setdefault(path, {"count": 0, "reasons": {}, "lines": []})
        mine["count"] += entry["count"]
        for why, n in entry["reasons"].items():
            mine["reasons"][why] = mine["reasons"].get(why, 0) + n
        mine["lines"] = (mine["lines"] + entry["lines"])[:MAX_LINE_EXAMPLES]
    total.bad_records = (total.bad_records + part["bad_records"])[:MAX_BAD_RECORDS]
    for key, n in part["long_docs"].items():
        total.long_docs[key] = total.long_docs.get(key, 0) + n


# ---- filter + signatures + eval-overlap marks ------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _clean_fn(cfg: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """map_batches UDF: the local executor's per-batch work, on the documents of a Ray batch."""

    key = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    probe = Deduplicator(cfg.dedup).signatures([make_doc("a b c d e f g h", "probe", "probe")])
    near = cfg.dedup.near if cfg.dedup.near != "none" else None
    sig_shape = probe[near].reshape(1, -1).shape[1:] if near else (1,)
    sig_dtype = probe[near].dtype if near else np.uint32

    def clean(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if _CACHE.get("key") != key:  # once per Ray worker process (workers outlive tasks)
            pipeline._init_stage(cfg)
            _CACHE["key"] = key
        side = b["side"] != ""
        docs = [json.loads(d) for d in b["doc"][~side]]
        for doc, pos in zip(docs, b["pos"][~side].tolist()):
            doc["_pos"] = pos  # rides along through the filters, which keep a document's keys
        rows: dict[str, list] = {"pos": [], "doc": [], "side": [], "id": []}
        exact, sigs = np.zeros(0, np.uint64), np.zeros((0, *sig_shape), sig_dtype)
        if docs:
            n_in, kept, summaries, s = pipeline._process_batch(docs)
            exact = s.get("exact", np.zeros(len(kept), np.uint64))
            sigs = s[near].reshape(len(kept), *sig_shape) if near else np.zeros((len(kept), 1), np.uint32)
            for doc in kept:
                rows["pos"].append(doc.pop("_pos"))
                rows["id"].append(doc["id"])
                rows["doc"].append(json.dumps(doc, ensure_ascii=False))
                rows["side"].append("")
            rows["pos"].append(int(b["pos"][~side][0]))  # the batch's counts, ordered by its first document
            rows["doc"].append("")
            rows["id"].append("")
            rows["side"].append(json.dumps({"summaries": summaries}))
        for pos, s_json in zip(b["pos"][side].tolist(), b["side"][side].tolist()):  # read stats pass through
            rows["pos"].append(pos)
            rows["doc"].append("")
            rows["id"].append("")
            rows["side"].append(s_json)
        n_side = len(rows["pos"]) - len(exact)
        return {"pos": np.array(rows["pos"], dtype=np.int64), "doc": np.array(rows["doc"], dtype=object),
                "side": np.array(rows["side"], dtype=object), "id": np.array(rows["id"], dtype=object),
                "exact": np.r_[exact, np.zeros(n_side, np.uint64)].astype(np.uint64),
                "sig": np.concatenate([sigs, np.zeros((n_side, *sig_shape), sig_dtype)])}
    return clean


# ---- the clean stage -------------------------------------------------------------------------------
def _summary(kept: int, dropped: list[tuple[str, str]]) -> dict[str, Any]:
    """A `summarize`-shaped summary from (id, reason) pairs in document order."""
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for doc_id, why in dropped:
        counts[why] = counts.get(why, 0) + 1
        ids = examples.setdefault(why, [])
        if len(ids) < EXAMPLES_PER_REASON:
            ids.append(doc_id)
    return {"kept": kept, "dropped": counts, "modified": {}, "examples": examples}


def dedup_decisions(ray: Any, docs: Any, cfg: Any, dd: Deduplicator) -> tuple[dict[int, str], dict[str, Any]]:
    """({pos: 'exact_duplicate' | 'near_duplicate'} of the dropped documents, the dedup step's summary).

    `dd` ends with the same signatures and ids as the local executor's, so the stored dedup set
    (shards/dedup.gen0) and later `lmstack data add` runs are the same too."""
    # lazy: optional extra (ray)
    from ray.data.expressions import col

    n_buckets = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))  # one reducer call per bucket
    meta = {"pos": [], "id": [], "exact": [], "sig": []}
    for b in docs.select_columns(["pos", "id", "exact", "sig"]).iter_batches(batch_format="numpy", batch_size=4096):
        for k in meta:
            meta[k].append(b[k])
    pos = np.concatenate(meta["pos"]) if meta["pos"] else np.zeros(0, np.int64)
    if len(pos) and (np.diff(pos) <= 0).any():
        raise LmstackError("internal: Ray returned documents out of order (preserve_order is off?)")
    ids = np.concatenate(meta["id"]).tolist() if meta["id"] else []
    index = {p: n for n, p in enumerate(pos.tolist())}
    dropped: dict[int, str] = {}
    live = np.ones(len(pos), dtype=bool)
    if dd.exact is not None:
        hashes = np.concatenate(meta["exact"]).astype(np.uint64)
        dups = exact_duplicates(docs, n_buckets)
        dd.exact.index.add(hashes, query=False)
        dd.exact.ids = list(ids)
        for p in sorted(dups):
            dropped[p] = "exact_duplicate"
            live[index[p]] = False
            dd.exact.members.setdefault(index[dups[p]], []).append(ids[index[p]])
    if dd.near is not None:
        sigs = np.concatenate(meta["sig"])[live]
        shape = dd.signatures([make_doc("a b c d e f g h", "probe", "probe")])[cfg.dedup.near].shape[1:]
        sigs = sigs.reshape(len(sigs), *shape)  # Arrow stored SimHash's scalar per document as a row of one
        live_pos, live_ids = pos[live], [i for i, keep in zip(ids, live.tolist()) if keep]
        if cfg.dedup.near == "minhash":
            gone = set(dropped)
            survivors = docs.filter(expr=col("pos").not_in(sorted(gone))) if gone else docs
            pairs = near_pairs(survivors, cfg.dedup.minhash, n_buckets)
            reps = near_representatives(live_pos.tolist(), pairs)
            dd.near.index.add(sigs, query=False)
            dd.near.ids = live_ids
            near_index = {p: n for n, p in enumerate(live_pos.tolist())}
            for p, r in reps.items():
                dropped[p] = "near_duplicate"
                dd.near.members.setdefault(near_index[r], []).append(ids[index[p]])
        else:  # simhash has no band shuffle here: its index runs in the driver on the distributed signatures
            reps_arr = dd.near.add(sigs, live_ids)
            for p in live_pos[reps_arr >= 0].tolist():
                dropped[p] = "near_duplicate"
    in_order = [(ids[index[p]], dropped[p]) for p in sorted(dropped)]
    by_reason = sorted(in_order, key=lambda x: x[1])  # exact first, as the local Deduplicator reports them
    return dropped, _summary(len(pos) - len(dropped), by_reason)


def ray_clean_stage(cfg: Any, dd: Deduplicator, report: Report, clean_path: Path) -> Any:
    """The local `clean_stage` contract on Ray: same clean.jsonl bytes, same report counts, same `dd`."""

    ray = import_ray()
    # lazy: optional extra (ray)
    from ray.data.expressions import col

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # document order decides which copy is kept
    ctx.enable_progress_bars = bool(cfg.progress)
    ctx.print_on_execution_start = False
    # Sort-based shuffles run as plain tasks; the default hash shuffle first starts aggregator
    # actors, which cost ~10 s per groupby here whatever the data size.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per Dataset otherwise
    dec_on, augmenter = declare_steps(cfg, report)
    tasks = read_tasks(cfg.inputs)
    t0 = time.perf_counter()
    ds = (ray.data.from_items(tasks, override_num_blocks=len(tasks))  # one read task per file
          .flat_map(_read_task)
          .repartition(target_num_rows_per_block=cfg.batch_size)  # one file -> many blocks -> parallel filters
          .map_batches(_clean_fn(cfg), batch_size=cfg.batch_size, batch_format="numpy")
          .materialize())
    filter_wall = time.perf_counter() - t0
    stats, sides = ReadStats(), ds.filter(expr=col("side") != "").select_columns(["pos", "side"]).take_all()
    offsets: dict[int, int] = {}
    dec_seconds = 0.0
    for row in sorted(sides, key=lambda r: r["pos"]):
        side = json.loads(row["side"])
        if "read" in side:
            offsets[row["pos"] >> POS_BITS] = stats.docs  # documents read before this task's first one
            merge_read_stats(stats, side["read"])
        for name, s in side.get("summaries", {}).items():
            if name == "_decontam_seconds":
                dec_seconds += s["seconds"]
            else:
                report.add_summary(name, s, s["seconds"])
    docs = ds.filter(expr=col("side") == "")
    t0 = time.perf_counter()
    dropped, summary = dedup_decisions(ray, docs, cfg, dd)
    dedup_wall = time.perf_counter() - t0
    report.add_summary("dedup", summary, dedup_wall)

    out = Cleaned()
    rng = random.Random(cfg.mix.topics.seed)
    cap = cfg.mix.topics.max_fit_docs
    clean_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=clean_path.parent, prefix=f".{clean_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            def flush(kept: list[dict]) -> None:
                write_clean_batch(kept, cfg, dec_on, augmenter, report, out, f, rng, cap)

            batch: list[dict] = []
            batch_no = -1
            for row in docs.select_columns(["pos", "doc"]).iter_rows():
                p = row["pos"]
                if p in dropped:
                    continue
                # The local executor's batch: `batch_size` documents in reading order, before filtering.
                b = (offsets[p >> POS_BITS] + (p & SIDE_POS)) // cfg.batch_size
                if b != batch_no and batch:
                    flush(batch)
                    batch = []
                batch_no = b
                batch.append(json.loads(row["doc"]))
            if batch:
                flush(batch)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, clean_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if dec_on:
        report.step("decontaminate").seconds += dec_seconds
    # Wall-clock per phase: where the time of a Ray run goes (Ray's per-stage overhead is visible here).
    report.sections["ray"] = {"read_tasks": len(tasks), "cluster_cpus": ray.cluster_resources().get("CPU"),
                              "read_filter_seconds": round(filter_wall, 3), "dedup_seconds": round(dedup_wall, 3),
                              "write_seconds": round(time.perf_counter() - t0 - dedup_wall, 3)}
    finish_clean(report, stats, out, dd, dec_on)
    return out


# ---- shard -------------------------------------------------------------------------------------------
_INIT: dict[str, Any] = {}


def _run_job(fn: Callable, initializer: Callable | None, initargs: tuple, item: Any) -> Any:
    """One job in a Ray worker; the initializer runs once per worker process and set of arguments."""
    key = repr((initializer, initargs))
    if initializer is not None and _INIT.get("key") != key:
        initializer(*initargs)
        _INIT["key"] = key
    return fn(item)


def ray_map(fn: Callable, items: Iterable[Any], workers: int = 1, initializer: Callable | None = None,
            initargs: tuple = (), max_pending: int | None = None) -> Iterator[Any]:
    """parallel_map on Ray tasks: results in input order, at most `max_pending` jobs in flight."""
    ray = import_ray()
    remote = ray.remote(_run_job)
    max_pending = max_pending or 2 * max(1, int(ray.cluster_resources().get("CPU", workers)))
    pending: deque = deque()
    for item in items:
        pending.append(remote.remote(fn, initializer, initargs, item))
        if len(pending) >= max_pending:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())
