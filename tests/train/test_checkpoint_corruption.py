"""Issue 15 §4: corrupt checkpoints are moved aside (never deleted, never counted towards `keep`), training
never silently starts over a run directory that holds checkpoints, and verification has no holes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.train.checkpoint import MANIFEST, NOTE, CheckpointManager

sys.path.insert(0, str(Path(__file__).parent))
from _train_script import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tiny_checkpoint(root: Path, step: int = 10, keep: int = 3) -> tuple[CheckpointManager, Path]:
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters())
    mgr = CheckpointManager(root, keep=keep)
    return mgr, mgr.save(step, model, opt.state_dict(), {"step": step})


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ---- verification: every hole found in the old verify() -----------------------------------------------------
def test_a_fresh_checkpoint_verifies_with_sizes_and_hashes(tmp_path):
    mgr, path = tiny_checkpoint(tmp_path)
    assert mgr.verify(path) is None
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert files["state.json"]["size"] == (path / "state.json").stat().st_size
    assert len(files["state.json"]["sha256"]) == 64


def test_an_empty_files_list_fails_verification(tmp_path):
    mgr, path = tiny_checkpoint(tmp_path)
    edit_manifest(path, lambda m: m.update(files={}))
    assert mgr.verify(path) == "manifest.json lists no files"


HOLES = {
    "files is a list": (lambda m: m.update(files=list(m["files"])), "lists no files"),
    "files missing": (lambda m: m.pop("files"), "lists no files"),
    "only some files listed": (lambda m: m.update(files={"model/config.json": m["files"]["model/config.json"]}),
                               "does not list optimizer.safetensors, which a resume reads"),
    "weights unlisted": (lambda m: m["files"].pop("model/model.safetensors"),
                         "does not list model/model.safetensors"),
    "listed file missing": (lambda m: m["files"].update({"extra.bin": {"size": 1, "sha256": "0" * 64}}),
                            "missing file extra.bin"),
    "wrong size": (lambda m: m["files"]["state.json"].update(size=m["files"]["state.json"]["size"] + 1),
                   "size mismatch in state.json"),
    "wrong hash": (lambda m: m["files"]["optimizer.json"].update(sha256="f" * 64),
                   "checksum mismatch in optimizer.json"),
    "hash not hex": (lambda m: m["files"]["optimizer.json"].update(sha256="nothex"), "has no valid sha256"),
    "size not a number": (lambda m: m["files"]["state.json"].update(size="12"), "has no valid size"),
    "step of another directory": (lambda m: m.update(step=11), "step does not match"),
    "no model_config": (lambda m: m.pop("model_config"), "no model_config"),
    "dot-dot path": (lambda m: m["files"].update({"../outside.txt": {"size": 1, "sha256": "0" * 64}}),
                     "entry 7 names a path that is not a plain file inside the checkpoint"),
    "absolute path": (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "not a plain file inside"),
    "unnormalised path": (lambda m: m["files"].update({"model/./config.json": "0" * 64}), "not a plain file inside"),
    "manifest lists itself": (lambda m: m["files"].update({MANIFEST: "0" * 64}), "not a plain file inside"),
}


@pytest.mark.parametrize("hole", list(HOLES))
def test_every_manifest_hole_fails_verification(tmp_path, hole):
    change, expected = HOLES[hole]
    mgr, path = tiny_checkpoint(tmp_path / "run")
    edit_manifest(path, change)
    problem = mgr.verify(path)
    assert problem is not None and expected in problem, problem


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b"{\"files\": ", b"[" * 100_000])
def test_an_unreadable_manifest_fails_verification_without_raising(tmp_path, content):
    mgr, path = tiny_checkpoint(tmp_path)
    (path / MANIFEST).write_bytes(content)
    assert mgr.verify(path) in ("manifest.json is not readable JSON", "manifest.json is not a JSON object")


def test_a_path_outside_the_checkpoint_is_refused_even_with_the_right_hash(tmp_path):
    import hashlib

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-CONTENT")
    digest = {"size": secret.stat().st_size, "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}
    mgr, path = tiny_checkpoint(tmp_path / "run" / "checkpoints")
    edit_manifest(path, lambda m: m["files"].update({"../../../secret.txt": digest}))
    problem = mgr.verify(path)
    assert "not a plain file inside the checkpoint" in problem and "SECRET" not in problem
    # a symlink inside the checkpoint pointing out is refused too (the old verify followed it)
    edit_manifest(path, lambda m: m["files"].pop("../../../secret.txt"))
    (path / "link.txt").symlink_to(secret)
    edit_manifest(path, lambda m: m["files"].update({"link.txt": digest}))
    assert "symlink or resolves outside" in mgr.verify(path)


def test_an_old_manifest_without_sizes_still_verifies(tmp_path):
    mgr, path = tiny_checkpoint(tmp_path)
    edit_manifest(path, lambda m: m.update(files={k: v["sha256"] for k, v in m["files"].items()}))
    assert mgr.verify(path) is None
    flip_last_byte(path / "state.safetensors")
    assert "checksum mismatch in state.safetensors" in mgr.verify(path)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=20), c, max_size=4),
                     max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.text(max_size=30), _json, max_size=6), step=_json)
def test_fuzzed_manifests_never_verify_and_never_raise(tmp_path, files, step):
    path = tmp_path / "step_00000010"
    path.mkdir(exist_ok=True)
    (path / MANIFEST).write_text(json.dumps({"step": step, "model_config": {}, "files": files}))
    problem = CheckpointManager(tmp_path).verify(path)
    assert isinstance(problem, str) and problem


# ---- keep counts only good checkpoints; corrupt ones are moved aside, never deleted --------------------------
def test_keep_counts_only_good_checkpoints_and_corrupt_ones_are_moved_aside(tmp_path):
    mgr, _ = tiny_checkpoint(tmp_path, step=10, keep=2)
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters())
    mgr.save(20, model, opt.state_dict(), {"step": 20})
    flip_last_byte(mgr.path(20) / "optimizer.safetensors")
    mgr2 = CheckpointManager(tmp_path, keep=2)  # a new process: nothing verified yet
    mgr2.save(30, model, opt.state_dict(), {"step": 30})
    # the old code counted the corrupt step 20 and deleted the good step 10
    assert [p.name for p in mgr2.list()] == ["step_00000010", "step_00000030"]
    moved = mgr2.corrupt()
    assert [p.name for p in moved] == ["step_00000020"]
    assert "checksum mismatch in optimizer.safetensors" in (moved[0] / NOTE).read_text()
    assert (moved[0] / "model" / "model.safetensors").exists()  # kept whole, for inspection
    # the same step going bad again gets its own name in corrupt/
    mgr2.save(20, model, opt.state_dict(), {"step": 20})
    flip_last_byte(mgr2.path(20) / "state.json")
    assert CheckpointManager(tmp_path).latest(log=lambda m: None).name == "step_00000030"
    mgr3 = CheckpointManager(tmp_path, keep=2)
    mgr3.save(40, model, opt.state_dict(), {"step": 40})
    assert [p.name for p in mgr3.corrupt()] == ["step_00000020", "step_00000020.1"]
    assert [p.name for p in mgr3.list()] == ["step_00000030", "step_00000040"]


# ---- the Trainer: resume from the newest good one, refuse to start over silently -----------------------------
def crashing(out: Path, at: int, **kw):
    """A 24-step run (the LR schedule depends on the total) that dies when it reaches step `at`."""
    t = build(out, steps=24, save_every=4, batch_size=4, **kw)
    step = t.train_step

    def train_step(progress):
        if t.step == at:
            raise RuntimeError("simulated crash")
        return step(progress)

    t.train_step = train_step
    return t


def test_corrupt_plus_good_resumes_from_the_good_one_and_a_second_crash_from_the_newest_good(tmp_path):
    ref = tmp_path / "ref"
    build(ref, steps=24, save_every=4, batch_size=4).fit()
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing(run, 12).fit()  # keep_checkpoints=2: step 8 and step 12 on disk
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000008", "step_00000012"]
    (ckpts / "step_00000012" / "state.safetensors").write_bytes(b"")  # the newest is corrupt
    messages = []
    t = crashing(run, 20)
    t.log_fn = messages.append
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    assert any("skipping checkpoint" in m and "step_00000012" in m and "size mismatch in state.safetensors" in m
               for m in messages), messages
    assert any("resumed from" in m and m.endswith("at step 8") for m in messages), messages
    assert (ckpts / "corrupt" / "step_00000012" / NOTE).exists()
    # keep=2 counts good ones only: the new 16 and 20; the corrupt 12 sits in corrupt/ and is not counted
    assert [p.name for p in CheckpointManager(ckpts).list()] == ["step_00000016", "step_00000020"]
    # after the second crash the next run resumes from the newest good checkpoint (20), not from 0 or 8
    messages.clear()
    t = build(run, steps=24, save_every=4, batch_size=4)
    t.log_fn = messages.append
    t.fit()
    assert any(m.endswith("at step 20") for m in messages), messages
    want, got = losses(ref), losses(run)
    assert [s for s in range(9, 25) if got[s] != want[s]] == []  # bit-identical to the uninterrupted run


def test_an_all_corrupt_run_dir_refuses_without_restart_and_restart_moves_it_aside(tmp_path):
    run = tmp_path / "run"
    build(run, steps=12, save_every=6).fit()
    ckpts = run / "checkpoints"
    for p in ckpts.glob("step_*"):
        (p / "optimizer.json").write_text("{}")
    with pytest.raises(LmstackError) as e:
        build(run, steps=18, save_every=6).fit()
    assert str(ckpts) in str(e.value) and "--train.restart true" in str(e.value) and "none verifies" in str(e.value)
    assert sorted(p.name for p in (ckpts / "corrupt").iterdir()) == ["step_00000006", "step_00000012"]
    with pytest.raises(LmstackError, match="none verifies"):  # and again: corrupt/ still counts as a run
        build(run, steps=18, save_every=6).fit()
    t = build(run, steps=6, save_every=0, restart=True)
    summary = t.fit()
    assert summary["steps"] == 6 and t.tokens_seen == 6 * 8 * 16  # from step 0
    replaced = list((run / "replaced").iterdir())
    assert len(replaced) == 1 and sorted(p.name for p in (replaced[0] / "checkpoints" / "corrupt").iterdir()) \
        == ["step_00000006", "step_00000012"]
    assert (replaced[0] / "metrics.jsonl").exists() and sorted(losses(run)) == list(range(1, 7))
    assert [p.name for p in CheckpointManager(ckpts).list()] == ["step_00000006"] and not (ckpts / "corrupt").exists()


def test_resume_off_over_existing_checkpoints_refuses(tmp_path):
    build(tmp_path, steps=6, save_every=0).fit()
    with pytest.raises(LmstackError, match=r"holds checkpoints and train.resume is false.*--train.restart true"):
        build(tmp_path, steps=6, save_every=0, resume=False)
    assert (tmp_path / "checkpoints" / "step_00000006").exists()


def test_the_cli_names_the_directory_and_the_restart_flag(tmp_path, capsys):
    from lmstack.cli import main

    (tmp_path / "input.txt").write_text("hello world, a tiny corpus for a tiny run.\n" * 40)
    args = ["pretrain", "--out", str(tmp_path / "run"), "--data.text", str(tmp_path / "input.txt"),
            "--data.tokenizer", "char", "--model.vocab_size", "64", "--model.d_model", "16", "--model.n_layers", "1",
            "--model.n_heads", "2", "--model.max_seq_len", "16", "--data.seq_len", "16", "--data.batch_size", "4",
            "--train.steps", "2", "--train.eval_every", "0", "--train.progress", "false", "--train.threads", "1"]
    assert main(args) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    (ckpt / "state.json").write_text("corrupt")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / "checkpoints") in err and "--train.restart true" in err
    assert main(args + ["--train.restart", "true"]) == 0
    assert "restart: moved the earlier run's" in capsys.readouterr().out
    assert "restart: false" in (tmp_path / "run" / "config.yaml").read_text()  # resuming it will not restart again


# ---- SIGKILL while a checkpoint is being written --------------------------------------------------------------
KILL_IN_SAVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import lmstack.train.checkpoint as ck
from _train_script import build
real = ck.save_tree
def slow(tree, stem):
    out = real(tree, stem)
    if Path(stem).name == "state" and tree.get("step") == 12:  # the model and optimizer are on disk, no manifest yet
        Path({marker!r}).write_text("saving")
        time.sleep(120)
    return out
ck.save_tree = slow
build({out!r}, 24, 6).fit()
"""


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_bit_identically(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    ref, run, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "marker"
    build(ref, steps=24, save_every=6).fit()
    code = KILL_IN_SAVE.format(tests=str(Path(__file__).parent), marker=str(marker), out=str(run))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the step-12 save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob(".step_00000012.*.tmp")] and not (ckpts / "step_00000012").exists()
    messages = []
    t = build(run, steps=24, save_every=6)
    t.log_fn = messages.append
    t.fit()
    assert any(m.endswith("at step 6") for m in messages), messages  # the half-written save is not a checkpoint
    want, got = losses(ref), losses(run)
    assert all(got[s] == want[s] for s in range(7, 25))
    assert not list(ckpts.glob(".step_*.tmp")) and not (ckpts / "corrupt").exists()


def test_a_sharded_model_must_list_every_shard_its_index_names(tmp_path):
    from lmstack.model.hf_io import save_model

    class Sharded(CheckpointManager):
        def write_model(self, model, folder, model_state):
            save_model(model, folder / "model", max_shard_bytes=20_000)

    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16))
    mgr = Sharded(tmp_path)
    path = mgr.save(10, model, torch.optim.AdamW(model.parameters()).state_dict(), {"step": 10})
    shards = sorted(p.name for p in (path / "model").glob("model-*.safetensors"))
    assert len(shards) >= 2 and mgr.verify(path) is None
    edit_manifest(path, lambda m: m["files"].pop(f"model/{shards[-1]}"))
    assert f"does not list model/{shards[-1]}" in mgr.verify(path)


def test_resaving_a_step_swaps_it_in_and_readers_never_move_anything(tmp_path):
    mgr, path = tiny_checkpoint(tmp_path, step=10)
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    mgr.save(10, model, {}, {"step": 10, "again": True})  # a finished run resumed saves its last step again
    assert mgr.load(path)[2]["again"] is True and not list(tmp_path.glob(".step_*"))
    flip_last_byte(path / "state.json")
    reader = CheckpointManager(tmp_path, writer=False)  # a distributed rank other than 0
    messages = []
    assert reader.latest(log=messages.append) is None and "left in place" in messages[0]
    assert path.exists() and not reader.corrupt()
    with pytest.raises(LmstackError, match="refusing to resume from .*checksum mismatch in state.json"):
        reader.load(path)
