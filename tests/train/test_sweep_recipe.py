"""recipes/sweep.yaml and the sweep fixes that benchmarks/sweep_hpo.py relies on: the example sweep parses,
validates and searches keys its recipe sets; a resumed study samples new points (not the first run's again) and
sweep seeds never share a stream; --parallel workers get distinct seeds; a pretrain trial's evaluations are not
computed twice (hook + trainer); and the benchmark's equal-budget cut leaves out the trial that crosses it."""
from dataclasses import dataclass
import importlib.util
import json
from pathlib import Path

import optuna
import pytest
import yaml

from lmstack.config import from_dict, read_mapping
from lmstack.train.pretrain import PretrainConfig
from lmstack.train.sweep import SweepConfig, check_sweep, pretrain_objective, run_sweep
from lmstack.train.sweep import commands
from lmstack.train.sweep.space import build_config
from lmstack.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "sweep.yaml"


def quiet(_):
    pass


def has_dotted(mapping: dict, key: str) -> bool:
    node = mapping
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_example_sweep_parses_validates_and_searches_keys_its_recipe_sets(monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweep names its recipe relative to the checkout, as the CLI runs it
    cfg = from_dict(SweepConfig, read_mapping(RECIPE))
    assert cfg.sampler == "tpe" and cfg.pruner in ("median", "asha") and cfg.n_trials > 0
    base, params = check_sweep(cfg, PretrainConfig)
    assert len(params) >= 3 and {p.key for p in params} >= {"optim.lr", "optim.weight_decay", "model.dropout"}
    recipe = read_mapping(cfg.recipe)
    for p in params:
        assert has_dotted(recipe, p.key), f"{p.key} is not set in {cfg.recipe}"
        section, name = p.key.rsplit(".", 1)
        value = p.choices[0] if p.kind == "choice" else p.high
        built = build_config(PretrainConfig, base, {p.key: value})
        assert getattr(getattr(built, section), name) == value  # the key reaches the trial's config
    assert next(p for p in params if p.key == "optim.lr").kind == "loguniform"
    assert base["train"]["eval_every"] > 0  # the pruner needs mid-run evals to act on
    assert cfg.warmup_steps < base["train"]["steps"]


@dataclass
class Flat:
    x: float = 0.0


def test_a_resumed_study_samples_new_points_and_seeds_do_not_share_a_stream(tmp_path):
    def xs(out, seed, counts):
        for n in counts:  # one run_sweep call per count: a resume each time, as the benchmark runs its sweeps
            result = run_sweep(SweepConfig(out=str(out), space={"x": "uniform(0, 1)"}, sampler="random",
                                           n_trials=n, seed=seed, plots=False), lambda t: t.config.x, Flat, log=quiet)
        return [round(r["params"]["x"], 9) for r in result.trials]

    resumed = xs(tmp_path / "a", 0, (1, 2, 3))
    assert len(set(resumed)) == 3, resumed  # a fresh sampler per resume used to replay the first point
    once = xs(tmp_path / "b", 0, (2,))
    assert resumed[0] == once[0]  # a fresh study keeps the plain seed
    neighbour = xs(tmp_path / "c", 1, (1, 2, 3))
    assert not set(resumed) & set(neighbour), (resumed, neighbour)  # seed 0's resumes never replay seed 1


def test_parallel_workers_each_get_their_own_seed(tmp_path, monkeypatch):
    launched = []

    class FakeWorker:
        returncode = 0

        def __init__(self, argv, **_):
            launched.append(argv[argv.index("--config") + 1])

        def communicate(self):
            return ("", None)

    monkeypatch.setattr(commands.subprocess, "Popen", FakeWorker)
    cfg = SweepConfig(out=str(tmp_path), space={"optim.lr": "loguniform(1e-4, 1e-2)"}, sampler="random",
                      n_trials=4, parallel=3, seed=5)
    commands.run_workers(cfg)
    seeds = [yaml.safe_load(Path(p).read_text())["seed"] for p in launched]
    assert len(launched) == 3 and len(set(seeds)) == 3 and 5 not in seeds, seeds


def test_a_pretrain_trial_evaluates_once_per_eval_step_and_reports_each(tmp_path, monkeypatch):
    text = "".join(f"the {w} sat on the mat and saw {w}s.\n" for w in ("cat", "dog", "bird", "fox") * 30)
    (tmp_path / "input.txt").write_text(text)
    overrides = {"data.text": str(tmp_path / "input.txt"), "data.tokenizer": "char", "data.seq_len": 16,
                 "data.batch_size": 4, "model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 1,
                 "model.n_heads": 2, "model.max_seq_len": 16, "train.steps": 6, "train.eval_every": 2,
                 "train.progress": False, "train.save_every": 0, "train.eval_batches": 2}
    calls = []
    evaluate = Trainer.evaluate

    def counting(self, state=None):
        calls.append(self.step)
        return evaluate(self, state)

    monkeypatch.setattr(Trainer, "evaluate", counting)
    cfg = SweepConfig(out=str(tmp_path / "sweep"), overrides=overrides, space={"optim.lr": [1e-3]}, sampler="grid",
                      plots=False)
    result = run_sweep(cfg, pretrain_objective("val_loss"), PretrainConfig, log=quiet)
    assert result.trials[0]["state"] == "COMPLETE", result.trials
    assert calls == [2, 4, 6]  # the hook at 2 and 4, the trainer's final eval at 6: none twice
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    reported = study.trials[0].intermediate_values
    assert sorted(reported) == [2, 4, 6] and reported[6] == pytest.approx(result.best_value)
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "trials" / "0000" / "metrics.jsonl").open()]
    assert sorted(r["step"] for r in rows if "val_loss" in r) == [2, 4, 6]  # the hook's evals are logged too


def load_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmark imports its sibling _common
    spec = importlib.util.spec_from_file_location("sweep_hpo_bench", ROOT / "benchmarks" / "sweep_hpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_budget_cut_counts_only_trials_that_end_within_it(monkeypatch):
    bench = load_benchmark(monkeypatch)
    rows = [{"state": "COMPLETE", "value": 2.0, "steps": 100, "seconds": 5.0},
            {"state": "PRUNED", "value": None, "steps": 25, "seconds": 1.5},
            {"state": "COMPLETE", "value": 1.5, "steps": 100, "seconds": 5.0},
            {"state": "COMPLETE", "value": 1.0, "steps": 100, "seconds": 5.0}]  # crosses a 250-step budget
    cut = bench.within_budget(rows, 250)
    assert cut["best"] == 1.5 and cut["steps"] == 225 and cut["trial_seconds"] == 11.5
    assert (cut["started"], cut["completed"], cut["pruned"]) == (3, 2, 1)
    assert [c[2] for c in cut["curve"]] == [2.0, 2.0, 1.5]  # best so far after each counted trial
    assert bench.within_budget(rows, 325)["best"] == 1.0
    assert bench.within_budget(rows[1:2], 250)["best"] is None  # no complete trial: no best to report
