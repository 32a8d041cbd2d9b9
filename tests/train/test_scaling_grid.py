"""`lmstack scaling`: bad grids are refused before any run, runs.jsonl resumes, the fit, prediction and plots."""
import json

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.train.scaling import ChinchillaLaw, ScalingConfig, plan_grid, run_scaling
from lmstack.train.scaling.commands import COMMANDS
from lmstack.train.scaling.grid import count, tokens_per_step
from lmstack.train.scaling.runner import run_one

SIZES = [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 1, "n_heads": 2},
         {"d_model": 48, "n_layers": 1, "n_heads": 2}, {"d_model": 64, "n_layers": 2, "n_heads": 2}]
SMALL = {"data.batch_size": 4, "data.seq_len": 16}  # 64 tokens per step
TRUE = ChinchillaLaw(E=1.2, A=60.0, B=80.0, alpha=0.4, beta=0.35)


def config(tmp_path, **kw) -> ScalingConfig:
    fields = dict(out=str(tmp_path / "scaling"), overrides=dict(SMALL), sizes=SIZES, budgets=[4e8, 8e8, 1.6e9],
                  min_steps=5, n_boot=10, plots=False)
    return ScalingConfig(**{**fields, **kw})


class FakeTrain:
    """Stands in for pretrain: the loss of a known law at the run's N and tokens, and a count of calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, pcfg):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed mid-grid")
        n = count(pcfg, "non_embedding")[0]
        tokens = pcfg.train.steps * tokens_per_step(pcfg)
        self.calls.append(pcfg.out)
        return {"val_loss": float(TRUE.loss(n, tokens)), "tokens_seen": tokens, "final_loss": 9.0}


@pytest.mark.parametrize("change, named", [
    (dict(sizes=[{"d_model": 16, "n_layerz": 1}]), "n_layerz"),
    (dict(sizes=[]), "sizes"),
    (dict(budgets=[], tokens=[]), "grid is empty"),
    (dict(budgets=[1e9, -5.0]), "budgets[1]"),
    (dict(budgets=[], tokens=[0.0]), "tokens[0]"),
    (dict(overrides={"optim.lrr": 0.1}), "optim.lrr"),
    (dict(predict=0.5), "predict"),
    (dict(budgets=[1e6]), "min_steps"),
    (dict(sizes=SIZES[:1], budgets=[], tokens=[640.0 * k for k in range(1, 9)]), "distinct parameter counts"),
])
def test_a_bad_config_is_refused_before_any_run_with_the_key_named(tmp_path, change, named):
    train = FakeTrain()
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        run_scaling(config(tmp_path, **change), train=train, log=lambda _: None)
    assert train.calls == [] and not (tmp_path / "scaling" / "runs.jsonl").exists()


def test_a_grid_of_fewer_than_eight_runs_is_refused_naming_the_count(tmp_path):
    cfg = config(tmp_path, sizes=SIZES[:2])  # 2 sizes x 3 budgets = 6 runs
    with pytest.raises(ConfigError, match=r"grid has 6 runs.*at least 8"):
        plan_grid(cfg)
    # the tokens-per-param window counts: it leaves points out before the count is checked
    _, runs = plan_grid(config(tmp_path))
    assert len(runs) == 12
    with pytest.raises(ConfigError, match=r"grid has [0-7] runs"):
        plan_grid(config(tmp_path, min_tokens_per_param=0.2))


def test_each_run_is_sized_to_its_budget_and_its_schedule_ends_there(tmp_path):
    _, runs = plan_grid(config(tmp_path, warmup_fraction=0.1))
    for run, pcfg in runs:
        assert abs(run.tokens - run.budget / (6 * run.n_params)) <= 32  # D = C / (6N), rounded to whole steps
        assert pcfg.train.steps * 64 == run.tokens and pcfg.schedule.warmup_steps == round(0.1 * run.steps)
        assert run.flops > run.flops_6nd  # counting adds the head and attention to 6 N D
    total = plan_grid(config(tmp_path, params="total"))[1]
    assert all(t.n_params == t.total_params > r.n_params == r.non_embedding_params for (r, _), (t, _) in
               zip(runs, total))


def test_a_rerun_resumes_skipping_finished_runs(tmp_path):
    crashed = FakeTrain(fail_after=5)
    with pytest.raises(RuntimeError, match="killed"):
        run_scaling(config(tmp_path), train=crashed, log=lambda _: None)
    rows_path = tmp_path / "scaling" / "runs.jsonl"
    assert len(rows_path.read_text().splitlines()) == 5
    resumed = FakeTrain()
    report = run_scaling(config(tmp_path), train=resumed, log=lambda _: None)
    assert len(resumed.calls) == 12 - 5 and set(resumed.calls).isdisjoint(crashed.calls)
    assert len(report["grid"]) == 12 and len(rows_path.read_text().splitlines()) == 12
    again = FakeTrain()
    _, planned = plan_grid(config(tmp_path))
    rows = [run_one(run, pcfg, rows_path, again, lambda _: None, lambda _: None) for run, pcfg in planned]
    assert again.calls == [] and [r["val_loss"] for r in rows] == [r["val_loss"] for r in report["grid"]]
    # a finished row with another config is refused, not silently reused
    with pytest.raises(LmstackError, match="another config"):
        run_scaling(config(tmp_path, overrides={**SMALL, "optim.lr": 0.01}), train=FakeTrain(), log=lambda _: None)


def test_the_fit_recovers_the_law_and_the_prediction_run_matches_it(tmp_path):
    train = FakeTrain()
    report = run_scaling(config(tmp_path, predict=4, plots=True), train=train, log=lambda _: None)
    law = report["fit"]["law"]
    assert abs(law["alpha"] - TRUE.alpha) < 0.05 and abs(law["beta"] - TRUE.beta) < 0.05
    pred = report["prediction"]
    n_grid = sorted({r["n_params"] for r in report["grid"]})
    # the size nearest the law's N* in log N was used, at D = 4 C_max / (6 N)
    assert pred["n_used"] == min(n_grid, key=lambda n: abs(np.log(n / pred["n_star"])))
    assert abs(6 * pred["n_used"] * pred["tokens_used"] / (4 * 1.6e9) - 1) < 0.05
    assert abs(pred["rel_error"]) < 0.005 and len(train.calls) == 13
    assert set(report["fit"]["bootstrap"]) == {"alpha", "beta", "exponent", "tokens_per_param"}
    saved = json.loads((tmp_path / "scaling" / "report.json").read_text())
    assert saved["prediction"]["measured_loss"] == pred["measured_loss"]
    for name in ("loss_vs_flops.png", "isoflop.png", "frontier.png"):
        data = (tmp_path / "scaling" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_the_command_parses_a_scaling_yaml(tmp_path):
    path = tmp_path / "scaling.yaml"
    path.write_text("sizes: [{d_model: 16, n_layers: 1}]\nbudgets: [1.0e+9]\npredict: 4\n")
    cfg = COMMANDS.parse(["--config", str(path), "--n_boot", "50"])
    assert cfg.sizes == [{"d_model": 16, "n_layers": 1}] and cfg.budgets == [1e9] and cfg.predict == 4.0
    assert cfg.n_boot == 50


@pytest.mark.slow
def test_a_tiny_grid_trains_end_to_end_on_the_world_corpus(tmp_path):
    cfg = ScalingConfig(out=str(tmp_path / "s"), data="world", world_people=30, recipe="",
                        overrides={"data.batch_size": 4, "data.seq_len": 32, "train.eval_every": 0,
                                   "train.eval_batches": 4, "train.threads": 1, "train.progress": False,
                                   "train.log_every": 1000},
                        sizes=SIZES[:2] + [{"d_model": 24, "n_layers": 1, "n_heads": 2}, SIZES[2]],
                        budgets=[3e8, 6e8], min_steps=5, n_boot=10)
    report = run_scaling(cfg, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "s" / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == len(report["grid"]) == 8
    assert all(np.isfinite(r["val_loss"]) and r["seconds"] > 0 and 0 < r["epochs"] for r in rows)
    assert report["fit"]["n_runs"] == 8 and (tmp_path / "s" / "frontier.png").exists()
