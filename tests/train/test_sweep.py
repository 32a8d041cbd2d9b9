"""lmstack.train.sweep: the search space is checked before any trial (each refusal names the key), and the
Optuna study behaves: grid covers the grid, TPE beats random on a quadratic, median pruning stops bad trials,
a crashed trial is FAILED while the others complete, and a second call over the same SQLite study continues it.
The objectives are analytic (no training)."""
import csv
from dataclasses import dataclass, field
import json
import subprocess
import sys
import time

import pytest
import yaml

from lmstack.cli import main
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.train.pretrain import PretrainConfig
from lmstack.train.sweep import SweepConfig, parse_space, run_sweep
from lmstack.train.sweep.study import open_study
from lmstack.train.sweep.objectives import ReportHook, pretrain_objective


@dataclass
class Knobs:
    x: float = 0.0
    y: float = 0.0
    n: int = 1
    mode: str = "a"


@dataclass
class Toy:
    out: str = "runs/toy"
    knobs: Knobs = field(default_factory=Knobs)


def quadratic(trial):
    k = trial.config.knobs
    return (k.x - 0.3) ** 2 + (k.y + 0.2) ** 2


def quiet(_):
    pass


def test_space_parses_each_form_over_dotted_keys():
    space = parse_space({"optim.lr": "loguniform(1e-4, 1e-2)", "model.d_model": [64, 128, 256],
                         "optim.weight_decay": "uniform(0, 0.2)", "model.n_layers": "int(1, 4)"}, PretrainConfig)
    kinds = {p.key: (p.kind, p.low, p.high, p.choices) for p in space}
    assert kinds["optim.lr"] == ("loguniform", 1e-4, 1e-2, ())
    assert kinds["model.d_model"][0] == "choice" and kinds["model.d_model"][3] == (64, 128, 256)
    assert kinds["optim.weight_decay"][:3] == ("uniform", 0.0, 0.2)
    assert kinds["model.n_layers"][:3] == ("int", 1, 4)
    # a cross-field rule met by another searched key is not refused (96 and 192 divide by 3 and 6)
    assert len(parse_space({"model.d_model": [96, 192], "model.n_heads": [3, 6]}, PretrainConfig)) == 2


@pytest.mark.parametrize("space,named,why", [
    ({"optim.lrr": "uniform(0, 1)"}, "optim.lrr", "no field 'lrr'"),
    ({"optimm.lr": [1e-3]}, "optimm.lr", "no field 'optimm'"),
    ({"optim.lr": "loguniform(1e-2, 1e-4)"}, "optim.lr", "empty range"),
    ({"optim.weight_decay": "uniform(0.1, 0.1)"}, "optim.weight_decay", "empty range"),
    ({"model.n_layers": "int(4, 2)"}, "model.n_layers", "empty range"),
    ({"optim.lr": []}, "optim.lr", "empty"),
    ({"optim.lr": "loguniform(0, 1)"}, "optim.lr", "above 0"),
    ({"model.d_model": "uniform(32, 64)"}, "model.d_model", "samples floats but the field is int"),
    ({"model.position": "int(1, 3)"}, "model.position", "samples integers"),
    ({"model.d_model": ["a", 64]}, "model.d_model", "must be an integer"),
    ({"optim.lr": ["fast"]}, "optim.lr", "must be a number"),
    ({"model.position": ["rope", "bogus"]}, "model.position", "not allowed"),
    ({"model.d_model": [65]}, "model.d_model", "divisible"),
    ({"optim.lr": "gauss(0, 1)"}, "optim.lr", "not a search range"),
    ({"optim.lr": "uniform(1e-3)"}, "optim.lr", "two numbers"),
    ({"optim": [1]}, "optim", "whole config section"),
])
def test_bad_space_is_refused_naming_the_key_before_any_trial(tmp_path, space, named, why):
    calls = []
    cfg = SweepConfig(out=str(tmp_path / "s"), space=space, sampler="random", n_trials=3)
    with pytest.raises(ConfigError) as e:
        run_sweep(cfg, lambda t: calls.append(t) or 0.0, PretrainConfig, log=quiet)
    assert named in str(e.value) and why in str(e.value)
    assert calls == [] and not (tmp_path / "s" / "study.db").exists()


def test_bad_sweep_settings_are_refused(tmp_path):
    space = {"knobs.x": "uniform(0, 1)"}
    with pytest.raises(ConfigError, match="grid sampler needs a list"):
        run_sweep(SweepConfig(out=str(tmp_path), space=space, sampler="grid"), quadratic, Toy, log=quiet)
    with pytest.raises(ConfigError, match="n_trials must be above 0"):
        run_sweep(SweepConfig(out=str(tmp_path), space=space, sampler="tpe"), quadratic, Toy, log=quiet)
    with pytest.raises(ConfigError, match="not a database URL"):
        run_sweep(SweepConfig(out=str(tmp_path), space=space, n_trials=2, storage="study.db"), quadratic, Toy,
                  log=quiet)
    with pytest.raises(ConfigError, match="knobs.z"):
        run_sweep(SweepConfig(out=str(tmp_path), space=space, n_trials=2, overrides={"knobs.z": 1}), quadratic,
                  Toy, log=quiet)


def test_grid_visits_every_point_and_writes_outputs(tmp_path):
    seen = []

    def objective(trial):
        seen.append((trial.config.knobs.n, trial.config.knobs.mode))
        return trial.config.knobs.n + (0.5 if trial.config.knobs.mode == "b" else 0.0)

    cfg = SweepConfig(out=str(tmp_path), space={"knobs.n": "int(1, 3)", "knobs.mode": ["a", "b"]}, sampler="grid",
                      overrides={"knobs.x": 2.0})
    result = run_sweep(cfg, objective, Toy, log=quiet)
    assert sorted(seen) == [(n, m) for n in (1, 2, 3) for m in ("a", "b")]
    assert result.best_value == 1.0 and result.best_params == {"knobs.n": 1, "knobs.mode": "a"}
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["knobs"] == {"x": 2.0, "y": 0.0, "n": 1, "mode": "a"}  # the overrides hold in the best config
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == 6 and {r["state"] for r in rows} == {"COMPLETE"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["COMPLETE"] == 6 and summary["best"]["params"] == result.best_params
    assert best["out"] == str(tmp_path / "trials" / f"{summary['best']['number']:04d}")  # each trial its own dir
    for name in ("history.png", "params.png", "importance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_tpe_beats_random_on_a_quadratic_at_equal_trials(tmp_path):
    space = {"knobs.x": "uniform(-2, 2)", "knobs.y": "uniform(-2, 2)"}
    best = {"random": [], "tpe": []}
    for seed in range(6):
        for sampler in best:
            cfg = SweepConfig(out=str(tmp_path / f"{sampler}{seed}"), storage="memory", space=space,
                              sampler=sampler, n_trials=60, seed=seed, n_startup_trials=10,
                              plots=False)
            best[sampler].append(run_sweep(cfg, quadratic, Toy, log=quiet).best_value)
    wins = sum(t < r for t, r in zip(best["tpe"], best["random"]))
    assert wins >= 4, best  # measured 5 of 6
    assert sorted(best["tpe"])[2] < sorted(best["random"])[2] / 3, best  # medians: about 15x apart


def test_median_pruner_prunes_bad_trials(tmp_path):
    def curve(trial):
        gap = abs(trial.config.knobs.x - 0.5)
        for step in range(10):
            trial.report(step, gap + 1.0 / (step + 1))  # a worse x is worse at every step
        return gap

    cfg = SweepConfig(out=str(tmp_path), space={"knobs.x": "uniform(0, 1)"}, sampler="random", pruner="median",
                      n_trials=25, n_startup_trials=4, seed=1)
    result = run_sweep(cfg, curve, Toy, log=quiet)
    pruned = [abs(r["params"]["knobs.x"] - 0.5) for r in result.trials if r["state"] == "PRUNED"]
    done = [abs(r["params"]["knobs.x"] - 0.5) for r in result.trials if r["state"] == "COMPLETE"]
    assert len(pruned) >= 5 and done
    assert sum(pruned) / len(pruned) > sum(done) / len(done)
    assert min(done) == pytest.approx(result.best_value)


def test_asha_prunes_and_the_without_pruner_run_does_not(tmp_path):
    def curve(trial):
        for step in range(1, 28):
            trial.report(step, abs(trial.config.knobs.x - 0.5) + 1.0 / step)
        return abs(trial.config.knobs.x - 0.5)

    states = {}
    for pruner in ("asha", "none"):
        cfg = SweepConfig(out=str(tmp_path / pruner), space={"knobs.x": "uniform(0, 1)"}, sampler="random",
                          pruner=pruner, n_trials=12, seed=0)
        states[pruner] = [r["state"] for r in run_sweep(cfg, curve, Toy, log=quiet).trials]
    assert "PRUNED" in states["asha"] and set(states["none"]) == {"COMPLETE"}


def test_a_crashed_trial_is_failed_and_the_sweep_goes_on(tmp_path):
    def flaky(trial):
        if trial.number == 1:
            raise RuntimeError("out of memory in trial one")
        if trial.number == 3:
            return float("nan")
        return quadratic(trial)

    cfg = SweepConfig(out=str(tmp_path), space={"knobs.x": "uniform(0, 1)"}, sampler="random", n_trials=5)
    result = run_sweep(cfg, flaky, Toy, log=quiet)
    states = [r["state"] for r in result.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert "out of memory in trial one" in rows[1]["error"] and "nan" in rows[3]["error"]
    assert result.best_value is not None


def test_resuming_the_same_storage_continues_the_study(tmp_path):
    space = {"optim.lr": "loguniform(1e-4, 1e-2)", "model.d_model": [32, 64]}
    numbers = []

    def objective(trial):
        numbers.append(trial.number)
        assert trial.config.out == str(tmp_path / "trials" / f"{trial.number:04d}")
        return abs(trial.config.optim.lr - 1e-3) * trial.config.model.d_model

    first = run_sweep(SweepConfig(out=str(tmp_path), space=space, sampler="tpe", n_trials=3), objective,
                      PretrainConfig, log=quiet)
    assert len(first.trials) == 3 and (tmp_path / "study.db").exists()
    second = run_sweep(SweepConfig(out=str(tmp_path), space=space, sampler="tpe", n_trials=5), objective,
                       PretrainConfig, log=quiet)
    assert numbers == [0, 1, 2, 3, 4] and [r["number"] for r in second.trials] == [0, 1, 2, 3, 4]
    again = run_sweep(SweepConfig(out=str(tmp_path), space=space, sampler="tpe", n_trials=5), objective,
                      PretrainConfig, log=quiet)
    assert numbers == [0, 1, 2, 3, 4] and again.best_value == second.best_value  # budget spent: no new trial
    with pytest.raises(LmstackError, match="another space"):
        run_sweep(SweepConfig(out=str(tmp_path), space={"optim.lr": "loguniform(1e-4, 1e-1)"}, n_trials=6),
                  objective, PretrainConfig, log=quiet)


CRASHING_SWEEP = """
import os
import time
from dataclasses import dataclass
from lmstack.train.sweep import SweepConfig, run_sweep

@dataclass
class Flat:
    x: float = 0.0

def objective(trial):
    if trial.number == 2:
        time.sleep(0.5)  # a real trial runs long enough for its first heartbeat
        os._exit(3)  # the process dies mid-trial: no exception, no cleanup, the trial stays RUNNING
    return trial.config.x

run_sweep(SweepConfig(out={out!r}, space={{"x": "uniform(0, 1)"}}, sampler="random", n_trials=4,
                      grace_period_s=1), objective, Flat, log=lambda _: None)
"""


@dataclass
class Flat:
    x: float = 0.0


def test_a_sweep_whose_process_died_resumes_and_fails_the_stale_trial(tmp_path):
    out = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", CRASHING_SWEEP.format(out=out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    time.sleep(2.5)  # past grace_period_s: the dead trial's heartbeat is stale
    numbers = []
    result = run_sweep(SweepConfig(out=out, space={"x": "uniform(0, 1)"}, sampler="random", n_trials=4,
                                   grace_period_s=1), lambda t: numbers.append(t.number) or t.config.x, Flat,
                       log=quiet)
    states = {r["number"]: r["state"] for r in result.trials}
    assert states[0] == states[1] == "COMPLETE" and states[2] == "FAIL"
    assert numbers and numbers[0] == 3 and "RUNNING" not in states.values()


def tiny_pretrain(tmp_path):
    text = "".join(f"the {w} sat on the mat and saw {w}s.\n" for w in ("cat", "dog", "bird", "fox") * 30)
    (tmp_path / "input.txt").write_text(text)
    return {"data.text": str(tmp_path / "input.txt"), "data.tokenizer": "char", "data.seq_len": 16,
                 "data.batch_size": 4, "model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 1,
                 "model.n_heads": 2, "model.max_seq_len": 16, "train.steps": 4, "train.eval_every": 0,
                 "train.progress": False, "train.save_every": 0, "train.eval_batches": 2}


def test_pretrain_objective_trains_each_trial_in_its_own_directory(tmp_path):
    overrides = tiny_pretrain(tmp_path)
    cfg = SweepConfig(out=str(tmp_path / "sweep"), overrides=overrides, space={"optim.lr": [1e-3, 3e-3]},
                      sampler="grid", plots=False)
    result = run_sweep(cfg, pretrain_objective("val_loss"), PretrainConfig, log=quiet)
    assert [r["state"] for r in result.trials] == ["COMPLETE", "COMPLETE"], result.trials
    assert all(0 < r["value"] < 10 for r in result.trials)
    for number in (0, 1):
        assert (tmp_path / "sweep" / "trials" / f"{number:04d}" / "metrics.jsonl").exists()
    missing = SweepConfig(out=str(tmp_path / "bad"), overrides=overrides, space={"optim.lr": [1e-3]}, sampler="grid",
                          plots=False)
    bad = run_sweep(missing, pretrain_objective("val_nothing"), PretrainConfig, log=quiet)
    assert bad.trials[0]["state"] == "FAIL" and "val_nothing" in bad.trials[0]["error"]


def test_the_sweep_command_runs_a_sweep_file_and_refuses_a_bad_space(tmp_path, capsys):
    sweep = {"out": str(tmp_path / "sweep"), "overrides": tiny_pretrain(tmp_path), "sampler": "random",
             "n_trials": 1, "plots": False, "space": {"optim.lr": "loguniform(1e-4, 1e-2)"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 0
    assert "1 trials (1 complete" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())["model"]["d_model"] == 32
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**sweep, "space": {"optim.lrr": "uniform(0, 1)"}}))
    assert main(["sweep", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "optim.lrr" in capsys.readouterr().err


WORKER = """
import time
from dataclasses import dataclass
from lmstack.train.sweep import SweepConfig, run_sweep

@dataclass
class Flat:
    x: float = 0.0

def objective(trial):
    time.sleep(0.2)  # long enough that the two workers' trials interleave
    print("trial", trial.number, flush=True)
    return trial.config.x

run_sweep(SweepConfig(out={out!r}, storage={storage!r}, space={{"x": "uniform(0, 1)"}}, sampler="tpe",
                      n_trials=8, seed={seed}, plots=False), objective, Flat, log=lambda _: None)
"""


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgres(tmp_path):
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    import tempfile

    data = tempfile.mkdtemp(prefix="pg", dir="/tmp")  # short: the socket path must fit in 107 bytes
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        storage = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)  # psycopg 3's dialect
        first = SweepConfig(out=str(tmp_path / "first"), storage=storage, space={"x": "uniform(0, 1)"},
                            sampler="tpe", n_trials=8, plots=False)
        open_study(first, parse_space(first.space, Flat))  # the tables first, as run_workers does
        workers = [subprocess.Popen([sys.executable, "-c", WORKER.format(out=str(tmp_path / f"w{i}"),
                                                                         storage=storage, seed=i)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [w.communicate(timeout=300) for w in workers]
        assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
        ran = [{int(line.split()[1]) for line in o[0].splitlines() if line.startswith("trial")} for o in outs]
        assert ran[0] and ran[1] and not ran[0] & ran[1]  # both workers ran trials, never the same one
        total = ran[0] | ran[1]
        assert total == set(range(len(total))) and 8 <= len(total) <= 9  # one budget, at most one overshoot
        result = run_sweep(SweepConfig(out=str(tmp_path / "after"), storage=storage, space={"x": "uniform(0, 1)"},
                                       sampler="tpe", n_trials=8, plots=False), lambda t: t.config.x, Flat, log=quiet)
        assert len(result.trials) == len(total)  # the budget is spent: a third call adds nothing
    finally:
        server.cleanup()


@pytest.mark.slow
def test_the_sweep_command_runs_trials_in_parallel_workers(tmp_path, capsys):
    sweep = {"out": str(tmp_path / "sweep"), "overrides": tiny_pretrain(tmp_path), "sampler": "random",
             "n_trials": 3, "space": {"optim.lr": "loguniform(1e-4, 1e-2)"}, "parallel": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    # workers that start a trial at the same moment may overshoot the budget by parallel - 1
    assert summary["counts"]["COMPLETE"] in (3, 4) and summary["counts"]["FAIL"] == 0
    assert "resuming study" in capsys.readouterr().out  # the workers ran every trial; this process only reports
    assert (tmp_path / "sweep" / "history.png").exists()
    (tmp_path / "mem.yaml").write_text(yaml.safe_dump({**sweep, "storage": "memory"}))
    assert main(["sweep", "--config", str(tmp_path / "mem.yaml")]) == 2
    assert "parallel" in capsys.readouterr().err


class FakeTrainer:
    """The two things ReportHook reads from a Trainer: the step, and evaluate() -> metrics."""

    def __init__(self, gap):
        self.step, self.gap, self.evaluations = 0, gap, 0

    def evaluate(self):
        self.evaluations += 1
        return {"val_loss": self.gap + 1.0 / self.step}


def test_report_hook_evaluates_every_n_steps_and_lets_the_pruner_stop_the_run(tmp_path):
    evaluations = {}

    def training(trial):
        trainer, hook = FakeTrainer(abs(trial.config.knobs.x - 0.5)), ReportHook(trial, "val_loss", every=5)
        try:
            for trainer.step in range(1, 41):
                assert hook.after_step(trainer) == {}
        finally:
            evaluations[trial.number] = trainer.evaluations
        return trainer.gap

    cfg = SweepConfig(out=str(tmp_path), space={"knobs.x": "uniform(0, 1)"}, sampler="random", pruner="median",
                      n_trials=16, n_startup_trials=3, seed=2, plots=False)
    result = run_sweep(cfg, training, Toy, log=quiet)
    states = {r["number"]: r["state"] for r in result.trials}
    assert "PRUNED" in states.values()
    assert all(evaluations[n] == 8 for n, s in states.items() if s == "COMPLETE")  # steps 5, 10, ..., 40
    assert all(evaluations[n] < 8 for n, s in states.items() if s == "PRUNED")  # stopped midway
    no_val = FakeTrainer(0.1)
    no_val.step = 1
    with pytest.raises(LmstackError, match="'val_bpb' is not among"):  # a metric the trainer does not compute
        ReportHook(None, "val_bpb", every=1).after_step(no_val)
    with pytest.raises(LmstackError, match="every=0"):
        ReportHook(None, every=0)
