"""`lmstack align`: dpo and rm runs from a model directory and a JSONL with bad rows; unbuilt methods refused."""
import json

import pytest
from align_helpers import make_policy

from lmstack.align.reward_model import load_reward_model
from lmstack.cli import main
from lmstack.model.hf_io import load_model, save_model


@pytest.fixture
def setup(tok, world, tmp_path):
    policy_dir = tmp_path / "policy"
    save_model(make_policy(tok), policy_dir, tokenizer=tok)
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] in ("helpfulness", "harmful")][:10]
    lines = [json.dumps(r) for r in recs] + [json.dumps({"prompt": "p", "chosen": "only chosen"}), "{broken"]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return policy_dir, data, tmp_path


def _flags(method, policy_dir, data, out):
    return ["align", "--method", method, "--policy", str(policy_dir), "--data", str(data), "--out", str(out),
            "--steps", "2", "--batch_size", "2", "--lr", "1e-3", "--progress", "false", "--max_len", "96"]


def test_align_dpo_and_rm(setup, capsys):
    policy_dir, data, tmp = setup
    assert main(_flags("dpo", policy_dir, data, tmp / "dpo")) == 0
    out = capsys.readouterr().out
    assert "skipped 2" in out and "missing rejected 1" in out
    summary = json.loads((tmp / "dpo" / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["skipped_rows"] == 2 and summary["val_pairs"] == 1
    assert (tmp / "dpo" / "metrics.jsonl").is_file() and (tmp / "dpo" / "config.yaml").is_file()
    trained = load_model(tmp / "dpo" / "model")
    start = load_model(policy_dir)
    assert any(not (a == b).all() for a, b in zip(trained.state_dict().values(), start.state_dict().values()))

    assert main(_flags("rm", policy_dir, data, tmp / "rm")) == 0
    rm, tok = load_reward_model(tmp / "rm" / "model")
    assert json.loads((tmp / "rm" / "summary.json").read_text())["method"] == "rm"


def test_unbuilt_methods_and_missing_inputs_are_refused(setup, capsys):
    policy_dir, data, tmp = setup
    for method in ("ppo", "grpo", "rloo", "rft"):  # the parser lists what is built and stops
        with pytest.raises(SystemExit):
            main(_flags(method, policy_dir, data, tmp / method))
        assert "'rm', 'dpo', 'cdpo', 'ipo', 'kto'" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--data", str(data), "--progress", "false"]) == 2
    assert "--policy is required" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--policy", str(policy_dir), "--data", str(tmp / "none.jsonl")]) == 2
    assert "no preference file" in capsys.readouterr().err
