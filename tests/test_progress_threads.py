"""The shared progress bar follows whichever limit ends a run; the thread policy and its collapse warning."""
import math
import os
import re
import time

import pytest

from lmstack.errors import LmstackError
from lmstack.progress import BudgetBar, forecast
from lmstack.threads import ThroughputWatch, auto_threads, resolve_threads


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_forecast_arithmetic():
    # the speedrun's case: 2000 steps or 420 s; 280 steps took 392 s (1.4 s/step) -> 28 s left, 20 more steps
    assert forecast(280, 2000, 392.0, 420.0) == (300, 28.0, "time")
    # SFT: 100000 steps or 120 s; 180 steps in 60 s -> the clock ends it near step 360, in 60 s
    final, eta, by = forecast(180, 100_000, 60.0, 120.0)
    assert (final, by) == (360, "time") and eta == pytest.approx(60.0)
    # steps end it first: 90 of 100 steps in 9 s with 60 s allowed -> 100, 1 s left
    assert forecast(90, 100, 9.0, 60.0) == (100, pytest.approx(1.0), "steps")
    # no time cap: the step count decides
    assert forecast(10, 50, 5.0, 0.0) == (50, pytest.approx(20.0), "steps")
    # resumed at step 1000: only the 10 steps since the clock started give the rate (1 step/s)
    assert forecast(1010, 5000, 10.0, 30.0, initial=1000) == (1030, 20.0, "time")
    # before any timed step the rate is unknown
    total, eta, _ = forecast(0, 2000, 0.0, 420.0)
    assert total == 2000 and math.isnan(eta)
    # out of time: the step under way is the last
    assert forecast(300, 2000, 421.0, 420.0)[:2] == (300, 0.0)


def test_budget_bar_total_and_eta_follow_the_nearer_limit_with_a_fake_clock():
    clock = FakeClock()
    bar = BudgetBar(2000, max_seconds=420, desc="train", enabled=True, clock=clock)
    for _ in range(280):
        clock.t += 1.5
        bar.update(1)
    # 280 steps in 420 s would be the end; 279 steps in 418.5 s leave room for one more
    assert bar.n == 280 and bar.total == 280 and bar.ends_by == "time" and bar.eta == 0.0
    assert bar._bar.total == 280  # what tqdm shows: 280/280, not 280/2000
    bar.close()

    clock = FakeClock()
    bar = BudgetBar(100_000, max_seconds=120, enabled=True, clock=clock)
    for _ in range(180):
        clock.t += 1 / 3
        bar.update(1)
    assert bar.total == 360 and bar._bar.total == 360 and bar.eta == pytest.approx(60.0)
    bar.close()

    clock = FakeClock()
    bar = BudgetBar(100, max_seconds=3600, enabled=False, clock=clock)
    for _ in range(40):
        clock.t += 0.5
        bar.update(1)
    assert (bar.total, bar.ends_by) == (100, "steps") and bar.eta == pytest.approx(30.0)


def test_trainer_bar_ends_at_the_step_the_clock_stopped(tmp_path, capsys):
    """A real pretrain run capped at 2 s out of 100000 steps: the bar's last total is the steps done."""
    from lmstack.cli import main

    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 200)
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--data.text", str(tmp_path / "t.txt"),
                 "--data.tokenizer", "char", "--model.vocab_size", "64", "--model.d_model", "32",
                 "--model.n_layers", "1", "--data.seq_len", "32", "--data.batch_size", "2", "--train.steps", "100000",
                 "--train.max_seconds", "2", "--train.eval_every", "0", "--train.save_every", "0",
                 "--train.threads", "1"]) == 0
    captured = capsys.readouterr()
    renders = re.findall(r"train:.*?(\d+)/(\d+)", captured.err.replace("\r", "\n"))
    assert renders
    done, total = map(int, renders[-1])
    assert total == done < 100_000
    assert "'steps': %d" % done in captured.out


def test_auto_threads_uses_free_cores_and_backs_off_under_load(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_threads(cores=2, load=0.0) == 2  # a quiet laptop uses both cores
    assert auto_threads(cores=2, load=1.3) == 1  # one other busy process: one thread
    assert auto_threads(cores=16, load=0.2) == 16
    assert auto_threads(cores=16, load=4.6) == 11
    assert auto_threads(cores=16, load=40.0) == 1
    assert auto_threads(cores=1, load=0.0) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the machine
    assert auto_threads(cores=16, load=0.0) == 8
    assert resolve_threads(3) == 3
    with pytest.raises(LmstackError, match="threads=-1 is not allowed"):
        resolve_threads(-1)


def test_throughput_watch_warns_once_on_a_collapse_and_not_on_noise():
    msgs = []
    watch = ThroughputWatch(factor=5.0, window=5, warn=msgs.append, hint="--train.threads 1")
    times = [3.0] + [0.05, 0.06, 0.04, 0.05, 0.05] + [0.07, 0.2, 0.05, 0.06, 0.05]  # warm-up, then noise
    assert not any(watch.step(t) for t in times) and not msgs
    fired = [watch.step(t) for t in [1.0] * 6]  # 20x slower: the machine is oversubscribed
    assert sum(fired) == 1 and len(msgs) == 1
    assert "20.0x slower" in msgs[0] and "--train.threads 1" in msgs[0] and msgs[0].startswith("lmstack: warning:")
    assert not watch.step(5.0)  # once only


def test_budget_bar_feeds_the_watch():
    clock, msgs = FakeClock(), []
    bar = BudgetBar(1000, enabled=False, clock=clock, watch=ThroughputWatch(warn=msgs.append))
    for dt in [2.0] + [0.1] * 10 + [1.0] * 6:
        clock.t += dt
        bar.update(1)
    assert len(msgs) == 1 and "10.0x slower" in msgs[0]


def test_budget_bar_compares_time_per_unit_of_work():
    """Steps that grow on purpose (adaptive batch size: 8x the tokens) are no collapse; per token they are flat."""
    clock, msgs = FakeClock(), []
    bar = BudgetBar(1000, enabled=False, clock=clock, watch=ThroughputWatch(warn=msgs.append))
    for dt, tokens in [(2.0, 512)] + [(0.1, 512)] * 10 + [(0.8, 4096)] * 10:
        clock.t += dt
        bar.update(1, work=tokens)
    assert not msgs
    for _ in range(6):  # now 8x slower per token
        clock.t += 6.4
        bar.update(1, work=4096)
    assert len(msgs) == 1 and "8.0x slower" in msgs[0]


def test_busy_cores_sees_a_competitor_at_once():
    """The sample sees a busy process the moment it runs (the 1-minute load average would lag)."""
    import subprocess
    import sys

    from lmstack.threads import busy_cores

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat")
    quiet = busy_cores()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        loaded = busy_cores()
    finally:
        spin.kill()
        spin.wait()
    assert loaded >= 0.7, (quiet, loaded)
