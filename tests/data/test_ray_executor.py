"""The Ray executor of `lmstack data run`: same bytes as the local executor, clear errors on bad setups.

One local Ray instance (2 CPUs, no dashboard) serves the whole module and is shut down after it.
"""
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.config import from_dict
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.data.ray_executor import check_reachable, merge_read_stats, ray_session
from lmstack.data.readers.stats import ReadStats
from lmstack.errors import LmstackError

from test_data_pipeline import config as pipeline_config, make_inputs

INSTALL = "pip install 'ray[data]==2.60.0'  (or: make setup, which installs the [ray] extra)"


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason=f"Ray is not installed: {INSTALL}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from lmstack.world import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, size="small", seed=0, progress=False)
    return out


def run_both(make_cfg, tmp_path):
    """Run the same config through both executors; return {executor: (out dir, report dict)}."""
    runs = {}
    for executor in ("local", "ray"):
        cfg = make_cfg(tmp_path / executor)
        cfg.executor = executor
        if executor == "local":
            # No process pool: forking a process that has Ray running is unsafe (Ray's docs), and the
            # local executor's output does not depend on its worker count (test_data_pipeline.py).
            cfg.workers = 1
        runs[executor] = (Path(cfg.out), run_pipeline(cfg).to_dict())
    return runs


def assert_same_output(runs):
    (a, rep_a), (b, rep_b) = runs["local"], runs["ray"]
    files = sorted(p.relative_to(a) for p in (a / "shards").rglob("*") if p.is_file())
    assert any(f.suffix == ".bin" for f in files) and (a / "shards" / "dedup.gen0" / "dedup.json").exists()
    assert files == sorted(p.relative_to(b) for p in (b / "shards").rglob("*") if p.is_file())
    for f in files + [Path("clean.jsonl")]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between the executors"

    def counts(rep):  # every step's counts and examples; wall-clock seconds differ by nature
        return [{k: v for k, v in s.items() if k != "seconds"} for s in rep["steps"]]

    assert counts(rep_a) == counts(rep_b)
    for section in ("read", "languages", "dedup", "mixing", "contamination"):
        assert rep_a.get(section) == rep_b.get(section), section
    assert json.loads((b / "report.json").read_text())["ray"]["cluster_cpus"] == 2


def test_ray_matches_local_on_small_world(ray_instance, small_world, tmp_path):
    """The built-in world: two files read in parallel tasks, decontaminated against the QA test split."""
    def make_cfg(out):
        return from_dict(PipelineConfig, {
            "inputs": [{"path": str(small_world / "pretrain" / "val.jsonl")},
                       {"path": str(small_world / "qa" / "val.jsonl"), "source": "qa"}],
            "out": str(out), "workers": 2, "batch_size": 64, "progress": False,
            "decontam": {"paths": [str(small_world / "qa" / "test.jsonl")]}, "shards": {"docs_per_shard": 128}})

    runs = run_both(make_cfg, tmp_path)
    rep = runs["ray"][1]
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["read"]["seen"] > 700 and rep["shards"]["shards"] >= 2
    assert steps["dedup"]["seen"] > 0 and steps["decontaminate"]["seen"] > 0
    assert_same_output(runs)


def test_ray_matches_local_with_duplicates_and_bad_records(ray_instance, tmp_path):
    """Exact and near duplicates, a non-UTF-8 file, a broken JSON line, an eval-set leak, toxic and PII text."""
    root = make_inputs(tmp_path / "in")
    runs = run_both(lambda out: pipeline_config(root, out, workers=2), tmp_path)
    rep = runs["ray"][1]
    dedup = next(s for s in rep["steps"] if s["name"] == "dedup")
    assert dedup["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert dedup["examples"] == {"exact_duplicate": ["web/copy"], "near_duplicate": ["web/near"]}
    assert rep["read"]["malformed_lines"] >= 1 and rep["read"]["skipped_files"]
    assert_same_output(runs)


def test_ray_simhash_and_no_exact(ray_instance, tmp_path):
    """The other dedup settings: SimHash (index in the driver on distributed signatures), exact off."""
    root = make_inputs(tmp_path / "in")
    runs = run_both(lambda out: pipeline_config(root, out, workers=2, dedup={"exact": False, "near": "simhash"}),
                    tmp_path)
    dedup = next(s for s in runs["ray"][1]["steps"] if s["name"] == "dedup")
    assert "exact_duplicate" not in dedup["dropped"] and dedup["dropped"].get("near_duplicate", 0) >= 1
    assert_same_output(runs)


def test_merge_read_stats_caps_like_one_reader():
    total = ReadStats()
    part = {"files_read": 1, "docs": 3, "empty": 0, "skipped_files": {}, "long_docs": {"split": 1},
            "malformed": {"a.jsonl": {"count": 2, "reasons": {"bad_json": 2}, "lines": [4, 9]}},
            "bad_records": [{"file": "a.jsonl", "line": 4, "reason": "bad_json"}] * 60}
    merge_read_stats(total, part)
    merge_read_stats(total, part)
    assert (total.files_read, total.docs, total.long_docs) == (2, 6, {"split": 2})
    assert total.malformed["a.jsonl"]["count"] == 4 and total.malformed["a.jsonl"]["reasons"] == {"bad_json": 4}
    from lmstack.data.readers.stats import MAX_BAD_RECORDS

    assert len(total.bad_records) == min(120, MAX_BAD_RECORDS)


def test_missing_ray_names_the_install_command(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    root = make_inputs(tmp_path / "in")
    cfg = pipeline_config(root, tmp_path / "out")
    cfg.executor = "ray"
    with pytest.raises(LmstackError, match=r"pip install 'ray\[data\]==2\.60\.0'"):
        run_pipeline(cfg)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_fails_fast(tmp_path):
    pytest.importorskip("ray", reason=f"Ray is not installed: {INSTALL}")
    root = make_inputs(tmp_path / "in")
    port = _free_port()  # nothing listens there: the connection is refused at once
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        cfg = pipeline_config(root, tmp_path / "out")
        cfg.executor, cfg.ray_address = "ray", address
        t0 = time.perf_counter()
        with pytest.raises(LmstackError, match="cannot reach the Ray cluster.*ray start --head"):
            run_pipeline(cfg)
        assert time.perf_counter() - t0 < 30
    # A host that drops packets (TEST-NET-1, never routed) answers within the connect timeout.
    t0 = time.perf_counter()
    with pytest.raises(LmstackError, match="cannot reach the Ray cluster at '192.0.2.1:6379' within 2 s"):
        check_reachable("192.0.2.1:6379", timeout=2.0)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(LmstackError, match="expected 'auto'"):
        with ray_session("no-port-here", 2):
            pass


def test_cli_flags_reach_the_executor(tmp_path):
    pytest.importorskip("ray", reason=f"Ray is not installed: {INSTALL}")
    root = make_inputs(tmp_path / "in")
    pipeline_config(root, tmp_path / "out")  # writes pipeline_1.yaml
    t0 = time.perf_counter()
    code = main(["data", "run", "--config", str(root / "pipeline_1.yaml"), "--executor", "ray",
                 "--ray_address", f"127.0.0.1:{_free_port()}"])
    assert code == 2 and time.perf_counter() - t0 < 30
    with pytest.raises(SystemExit) as bad:  # a value outside the Literal is a usage error, as from argparse
        main(["data", "run", "--config", str(root / "pipeline_1.yaml"), "--executor", "spark"])
    assert bad.value.code == 2


def test_band_reducer_finds_every_similar_earlier_pair():
    """The per-bucket reducer against brute force, on a big cluster of near copies (chunked compare)."""
    import numpy as np

    from lmstack.data.ray_dedup import _band_reducer, _exact_reduce

    rng = np.random.default_rng(0)
    n, perms = 300, 16
    sig = np.tile(rng.integers(0, 2**31, perms, dtype=np.uint32), (n, 1))
    for row in sig:  # each a near copy: 3 of 16 entries changed
        row[rng.integers(0, perms, 3)] = rng.integers(0, 2**31, 3)
    exact = np.arange(n, dtype=np.uint64)
    exact[7] = exact[3]  # an exact copy inside the run is left to the exact shuffle
    pos = rng.permutation(n).astype(np.int64)
    group = {"band": np.zeros(n, np.int64), "key": np.zeros(n, np.uint64), "pos": pos, "exact": exact, "sig": sig}
    out = _band_reducer(0.5)(group)
    later_copy = 7 if pos[7] > pos[3] else 3
    expected = {(int(pos[a]), int(pos[b])) for a in range(n) for b in range(n)
                if pos[b] < pos[a] and (sig[a] == sig[b]).mean() >= 0.5 and later_copy not in (a, b)}
    assert len(expected) > 10_000
    assert set(zip(out["i"].tolist(), out["j"].tolist())) == expected
    dups = _exact_reduce({"pos": pos, "exact": exact})
    assert dups["pos"].tolist() == [int(pos[later_copy])] and dups["rep"].tolist() == [int(pos[10 - later_copy])]


@pytest.mark.slow
def test_cli_starts_and_stops_a_private_ray(tmp_path):
    """The default path of `lmstack data run --executor ray`: its own local instance, in a fresh process."""
    import subprocess

    pytest.importorskip("ray", reason=f"Ray is not installed: {INSTALL}")
    root = make_inputs(tmp_path / "in")
    pipeline_config(root, tmp_path / "out")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "run", "--config", str(root / "pipeline_1.yaml"),
                           "--executor", "ray", "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ray"]["cluster_cpus"] == 2 and report["shards"]["docs"] > 0
