"""Checkpoint integrity (issue 15 §4): a fault campaign against checkpoint verification, the
all-corrupt-then-crash-twice scenario, and what verification costs.

Baseline: lmstack's own checkpoint.py as of commit 1e39711 (before this fix), loaded from git, so both
sides run the same save code and only verification / pruning differ.

- corruptions_detected: of N faults injected into a saved checkpoint (truncation, bit flips, missing
  files, empty or partial manifests, path traversal, symlinks, wrong step, ...), how many verify()
  reports (a verifier that raises or returns "intact" has missed it). Each fault hits a fresh copy.
- config.crash_scenario: keep=2 over two corrupt checkpoints; a run saves steps 10 and 20, then dies;
  the step the next launch resumes from (the old code pruned the new good checkpoints at once).
- seconds_to_reject_truncated_optimizer: verify() on a ~100 MB checkpoint whose optimizer file lost
  its last 100 bytes (ours: the recorded size shows it before hashing). Interleaved repeats, median.
- seconds_to_verify_intact: verify() on the intact checkpoint (both hash every byte).

Usage: python benchmarks/checkpoint_integrity.py
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

import torch  # noqa: E402

from lmstack.errors import LmstackError  # noqa: E402
from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.train.checkpoint import MANIFEST, CheckpointManager  # noqa: E402

BASELINE_COMMIT = "1e39711"
ROOT = Path(__file__).resolve().parents[1]


def baseline_module(tmp: Path):
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:src/lmstack/train/checkpoint.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    (tmp / "old_checkpoint.py").write_text(source)
    spec = importlib.util.spec_from_file_location("old_checkpoint", tmp / "old_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def trained(cfg: ModelConfig):
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, cfg.vocab_size, (2, 16))).float().mean().backward()
    opt.step()
    return model, opt


# ---- faults: each edits a checkpoint directory in place; `outside` is a file beside the run directory
def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _write_manifest(path: Path, m) -> None:
    (path / MANIFEST).write_text(json.dumps(m))


def _edit(change):
    def fault(path: Path, outside: Path) -> None:
        m = _manifest(path)
        change(m, path, outside)
        _write_manifest(path, m)
    return fault


def _entry(path_of_file: Path, like):
    """A manifest entry in the same format as `like` (old: a hex digest; new: {size, sha256})."""
    digest = hashlib.sha256(path_of_file.read_bytes()).hexdigest()
    return digest if isinstance(like, str) else {"size": path_of_file.stat().st_size, "sha256": digest}


def _truncate(rel: str, n: int):
    def fault(path: Path, outside: Path) -> None:
        f = path / rel
        f.write_bytes(f.read_bytes()[:-n] if n else b"")
    return fault


def _flip(rel: str):
    def fault(path: Path, outside: Path) -> None:
        f = path / rel
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    return fault


def _symlink_out(m, path, outside):
    (path / "link.bin").symlink_to(outside)
    m["files"]["link.bin"] = _entry(outside, m["files"]["state.json"])


def _unlisted_bad_weights(m, path, outside):
    m["files"].pop("model/model.safetensors")
    w = path / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])


FAULTS = {
    "weights truncated": _truncate("model/model.safetensors", 100),
    "optimizer bit flip": _flip("optimizer.safetensors"),
    "state emptied": _truncate("state.safetensors", 0),
    "optimizer.json deleted": lambda p, o: (p / "optimizer.json").unlink(),
    "manifest deleted": lambda p, o: (p / MANIFEST).unlink(),
    "manifest files empty": _edit(lambda m, p, o: m.update(files={})),
    "manifest lists only config.json": _edit(lambda m, p, o: m.update(
        files={"model/config.json": m["files"]["model/config.json"]})),
    "manifest files is a list": _edit(lambda m, p, o: m.update(files=list(m["files"]))),
    "manifest not UTF-8": lambda p, o: (p / MANIFEST).write_bytes(b"\xff\xfe{}"),
    "manifest is a JSON array": lambda p, o: (p / MANIFEST).write_text("[]"),
    "manifest nested 100k deep": lambda p, o: (p / MANIFEST).write_text("[" * 100_000),
    "entry ../ outside, right hash": _edit(lambda m, p, o: m["files"].update(
        {os.path.relpath(o, p): _entry(o, m["files"]["state.json"])})),
    "absolute entry, right hash": _edit(lambda m, p, o: m["files"].update(
        {str(o): _entry(o, m["files"]["state.json"])})),
    "symlink to outside, right hash": _edit(_symlink_out),
    "weights unlisted and truncated": _edit(_unlisted_bad_weights),
    "step of another directory": _edit(lambda m, p, o: m.update(step=m["step"] + 1)),
    "model_config missing": _edit(lambda m, p, o: m.pop("model_config")),
}


def outcome(verify, path: Path) -> str:
    try:
        return "intact" if verify(path) is None else "detected"
    except Exception as e:  # the resume would crash with a traceback instead of skipping the checkpoint
        return f"raised {type(e).__name__}"


def campaign(tmp: Path, old, cfg: ModelConfig) -> dict:
    model, opt = trained(cfg)
    outside = tmp / "outside.bin"
    outside.write_bytes(b"not part of any checkpoint")
    rows = {}
    sides = (("ours", CheckpointManager(tmp / "ours_src")), ("baseline", old.CheckpointManager(tmp / "old_src")))
    for side, mgr in sides:
        src = mgr.save(10, model, opt.state_dict(), {"step": 10})
        for name, fault in FAULTS.items():
            work = tmp / "work" / "checkpoints" / src.name
            shutil.rmtree(tmp / "work", ignore_errors=True)
            shutil.copytree(src, work)
            fault(work, outside)
            rows.setdefault(name, {})[side] = outcome(mgr.verify, work)
    return rows


def crash_scenario(tmp: Path, old, cfg: ModelConfig) -> dict:
    """keep=2, both kept checkpoints corrupt; a run saves 10 and 20, dies; where does the next launch resume?"""
    model, opt = trained(cfg)
    out = {}
    for side in ("ours", "baseline"):
        make = CheckpointManager if side == "ours" else old.CheckpointManager
        root = tmp / f"crash_{side}" / "checkpoints"
        seed = make(root, keep=2)
        for step in (100, 200):
            p = seed.save(step, model, opt.state_dict(), {"step": step})
            (p / "state.safetensors").write_bytes(b"")
        refused = False
        if side == "ours":  # the Trainer's rule: checkpoints exist but none verifies -> refuse unless restart
            mgr = make(root, keep=2)
            had = mgr.exists()
            if mgr.latest(log=lambda m: None) is None and had:
                refused = True
                shutil.move(str(root), str(root.parent / "replaced"))  # what --train.restart does
        mgr = make(root, keep=2)
        start = mgr.latest(log=lambda m: None)
        for step in (10, 20):  # the run from step 0, saving twice, then killed
            mgr.save(step, model, opt.state_dict(), {"step": step})
        found = make(root, keep=2).latest(log=lambda m: None)
        out[side] = {"first_launch_refused": refused, "first_launch_resumed_from": start.name if start else None,
                     "resume_step_after_crash": int(found.name[5:]) if found else 0}
    return out


def timings(tmp: Path, old, cfg: ModelConfig, repeat: int) -> dict:
    model, opt = trained(cfg)
    ours_mgr, old_mgr = CheckpointManager(tmp / "t_ours"), old.CheckpointManager(tmp / "t_old")
    ours_ck = ours_mgr.save(10, model, opt.state_dict(), {"step": 10})
    old_ck = old_mgr.save(10, model, opt.state_dict(), {"step": 10})
    size_mb = sum(f.stat().st_size for f in ours_ck.rglob("*") if f.is_file()) / 1e6
    times = {k: [] for k in ("intact_ours", "intact_old", "trunc_ours", "trunc_old")}
    for _ in range(repeat):  # interleaved, so contention on the shared machine hits both alike
        for key, mgr, ck in (("intact_ours", ours_mgr, ours_ck), ("intact_old", old_mgr, old_ck)):
            t = time.perf_counter()
            assert mgr.verify(ck) is None
            times[key].append(time.perf_counter() - t)
    for ck in (ours_ck, old_ck):
        f = ck / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    for _ in range(repeat):
        for key, mgr, ck in (("trunc_ours", ours_mgr, ours_ck), ("trunc_old", old_mgr, old_ck)):
            t = time.perf_counter()
            assert mgr.verify(ck) is not None
            times[key].append(time.perf_counter() - t)
    return {"size_mb": round(size_mb, 1), **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    small = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    big = ModelConfig(vocab_size=4096, d_model=256, n_layers=8, n_heads=4, max_seq_len=256)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old = baseline_module(tmp)
        rows = campaign(tmp, old, small)
        scenario = crash_scenario(tmp, old, small)
        t = timings(tmp, old, big, args.repeat)
    n = len(rows)
    ours = sum(r["ours"] == "detected" for r in rows.values())
    base = sum(r["baseline"] == "detected" for r in rows.values())
    common = {"machine": "2 cores, shared", "baseline_commit": BASELINE_COMMIT}
    results = [
        result("checkpoint_integrity", "corruptions_detected", True, ours, f"checkpoint.py@{BASELINE_COMMIT}", base,
               goal=n, n_faults=n, per_fault=rows,
               baseline_raised=sum(r["baseline"].startswith("raised") for r in rows.values()),
               baseline_passed_as_intact=sum(r["baseline"] == "intact" for r in rows.values()),
               crash_scenario=scenario, **common),
        result("checkpoint_integrity", "seconds_to_reject_truncated_optimizer", False, t["trunc_ours"],
               f"checkpoint.py@{BASELINE_COMMIT}", t["trunc_old"], checkpoint_mb=t["size_mb"], repeat=args.repeat,
               **common),
        result("checkpoint_integrity", "seconds_to_verify_intact", False, t["intact_ours"],
               f"checkpoint.py@{BASELINE_COMMIT}", t["intact_old"], checkpoint_mb=t["size_mb"], repeat=args.repeat,
               **common),
    ]
    write_result("checkpoint_integrity", results)
    for name, r in rows.items():
        print(f"  {name:36s} ours={r['ours']:10s} baseline={r['baseline']}")
    print(f"  crash scenario: {scenario}")


if __name__ == "__main__":
    try:
        main()
    except LmstackError as e:
        raise SystemExit(f"lmstack: {e}")
