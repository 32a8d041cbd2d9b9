"""--log.tensorboard: every training stage (pretrain, finetune/SFT, DPO, GRPO) writes TensorBoard event files
whose scalars, read back with tensorboard's own EventAccumulator, equal the metrics.jsonl rows; it is off by
default; --log.wandb is imported only when on and names `pip install wandb` when missing."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard", reason="pip install tensorboard (or make setup: it is in the dev extra)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lmstack.cli import main  # noqa: E402
from lmstack.world import World  # noqa: E402
from lmstack.errors import LmstackError  # noqa: E402
from lmstack.tokenizer import train_tokenizer  # noqa: E402
from lmstack.train.metrics import LogConfig, MetricsLogger  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_people=12, n_preferences=60, n_arithmetic=20, n_instructions=10)


@pytest.fixture(scope="module")
def tok(world):
    texts = ([r["text"] for r in world.corpus("chat")] + [r["text"] for r in world.corpus("preferences")])
    return train_tokenizer(texts=texts, type="bpe", vocab_size=400, special_tokens="chat", show_progress=False)


def _tiny_model(tok):
    from lmstack.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                   max_seq_len=256, hf_model_type="llama", bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)).eval()


def jsonl_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of the finite numbers in a metrics.jsonl, in file order."""
    out: dict[str, list] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
                    and abs(v) != float("inf"):
                out.setdefault(k, []).append((row["step"], float(v)))
    return out


def assert_tensorboard_matches_jsonl(run: Path, must_have: set[str]) -> EventAccumulator:
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no event file in {run / 'tensorboard'}"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    expected = jsonl_scalars(run / "metrics.jsonl")
    assert must_have <= set(expected), (must_have, sorted(expected))
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        for (_, a), (_, b) in zip(got, points):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-30), key  # event files hold float32
    return acc


def test_pretrain_writes_event_files_equal_to_jsonl_and_histograms(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_text(TEXT)
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    args = ["pretrain", "--config", "recipes/shakespeare_char.yaml", "--out", str(run),
            "--data.text", str(tmp_path / "input.txt"), "--model.vocab_size", "64", "--model.n_layers", "1",
            "--model.d_model", "32", "--model.n_heads", "2", "--model.n_kv_heads", "1", "--train.steps", "6",
            "--train.eval_every", "3", "--train.eval_batches", "1", "--train.progress", "false",
            "--train.log_every", "2", "--log.tensorboard", "true", "--log.histograms", "true",
            "--log.histogram_every", "4"]
    assert main(args) == 0
    acc = assert_tensorboard_matches_jsonl(run, {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"})
    hist = acc.Tags()["histograms"]
    assert any(t.startswith("weights/") for t in hist)
    assert sorted({e.step for e in acc.Histograms(hist[0])}) == [2, 6]  # every 4 steps from the first log


def test_tensorboard_is_off_by_default(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"loss": 1.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def test_finetune_cli_flag_writes_event_files(tmp_path, world, tok):
    from lmstack.model.hf_io import save_model

    base = save_model(_tiny_model(tok), tmp_path / "base", tokenizer=tok)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in world.corpus("chat")[:80]))
    out = tmp_path / "sft"
    assert main(["finetune", "--method", "full", "--data", str(data), "--model", str(base), "--out", str(out),
                 "--train.steps", "4", "--train.eval_every", "2", "--train.eval_batches", "1",
                 "--train.log_every", "1", "--train.progress", "false", "--batch_size", "2", "--seq_len", "96",
                 "--log.tensorboard", "true"]) == 0
    assert_tensorboard_matches_jsonl(out, {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"})


def test_dpo_and_grpo_write_event_files(tmp_path, world, tok):
    from lmstack.align.config import AlignConfig
    from lmstack.align.dpo import PreferenceTrainer
    from lmstack.align.grpo import GroupTrainer
    from lmstack.align.preference_data import pairs_from_records

    on = LogConfig(tensorboard=True)
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] in ("harmful", "benign", "helpfulness")]
    pairs = pairs_from_records(recs[:6]).pairs
    dpo_cfg = AlignConfig(method="dpo", batch_size=2, max_len=128, log=on,
                          train={"steps": 3, "progress": False, "eval_every": 0, "log_every": 1, "device": "cpu"},
                          optim={"lr": 3e-3}, schedule={"warmup_steps": 0})
    PreferenceTrainer(_tiny_model(tok), tok, dpo_cfg, log=lambda s: None).fit(pairs, pairs[:2], out_dir=tmp_path / "dpo")
    assert_tensorboard_matches_jsonl(tmp_path / "dpo", {"loss", "accuracy", "lr", "grad_norm", "val_accuracy"})

    prompts = [r for r in world.corpus("chat") if r["kind"] == "arithmetic"][:4]
    grpo_cfg = AlignConfig(method="grpo", group_size=2, prompts_per_step=2, max_tokens=4, eval_prompts=0, log=on,
                           train={"steps": 2, "log_every": 1, "progress": False, "device": "cpu"}, optim={"lr": 1e-3},
                           schedule={"warmup_steps": 0})
    letter_e = lambda p, c, r: c.count("e") / max(1, len(c))  # noqa: E731 - a reward that varies inside a group
    GroupTrainer(_tiny_model(tok), tok, grpo_cfg, letter_e, log=lambda s: None).fit(prompts, out_dir=tmp_path / "grpo")
    assert_tensorboard_matches_jsonl(tmp_path / "grpo", {"reward_mean", "lr"})


def test_wandb_is_imported_only_when_on_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    MetricsLogger(tmp_path / "off").close()  # off: never imported
    with pytest.raises(LmstackError, match="pip install wandb"):
        MetricsLogger(tmp_path / "on", log=LogConfig(wandb=True))
    # With a stand-in module (no network in tests): the same scalars at the same steps, and the run is finished.
    logged, finished = [], []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: finished.append(kw)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(tmp_path / "w", log=LogConfig(wandb=True, wandb_mode="offline"))
    log.log(3, {"loss": 2.5, "lr": 1e-3, "note": "text", "flag": True, "bad": float("nan")})
    log.close()
    assert logged == [(3, {"loss": 2.5, "lr": 1e-3})]
    assert finished and finished[0]["mode"] == "offline" and finished[0]["project"] == "lmstack"


def test_bad_log_settings_are_named():
    from lmstack.config import ConfigError

    with pytest.raises(ConfigError, match="histogram_every"):
        LogConfig(histogram_every=0)
    with pytest.raises(ConfigError, match="wandb_mode"):
        LogConfig(wandb_mode="sometimes")
