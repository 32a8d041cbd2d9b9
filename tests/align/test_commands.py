"""`lmstack align`: dpo, rm and online (grpo/rloo) runs from a model directory and JSONL with bad rows; bad input refused."""
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
    return ["align", "--method", method, "--model", str(policy_dir), "--data", str(data), "--out", str(out),
            "--train.steps", "2", "--batch_size", "2", "--optim.lr", "1e-3", "--train.progress", "false",
            "--max_len", "96"]


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


def test_align_online_methods(setup, world, tok, capsys):
    policy_dir, _, tmp = setup
    recs = [r for r in world.corpus("chat") if r["kind"] == "arithmetic"][:12]
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps(r) for r in recs] + ['{"answer": 1}']) + "\n", encoding="utf-8")
    for method in ("grpo", "rloo", "ppo", "rft"):
        out = tmp / method
        flags = ["align", "--method", method, "--model", str(policy_dir), "--data", str(prompts), "--out", str(out),
                 "--train.steps", "2", "--group_size", "2", "--prompts_per_step", "2", "--max_tokens", "6",
                 "--reward", "math=1,format=0.5", "--optim.lr", "1e-3", "--eval_prompts", "2", "--val_fraction", "0.2",
                 "--train.progress", "false", "--rounds", "1", "--rft_min_reward", "0.0", "--batch_size", "2"]
        assert main(flags) == 0
        assert "skipped 1: no prompt 1" in capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and summary["eval_after"]["n"] == 2
        assert load_model(out / "model").config.vocab_size == tok.vocab_size

    # a reference with another tokenizer is refused before any training
    from lmstack.tokenizer import train_tokenizer

    other = train_tokenizer(texts=["completely different text " * 50], type="bpe", vocab_size=300,
                            special_tokens="chat", show_progress=False)
    ref_dir = tmp / "other_ref"
    save_model(make_policy(other), ref_dir, tokenizer=other)
    flags = ["align", "--method", "grpo", "--model", str(policy_dir), "--data", str(prompts), "--out",
             str(tmp / "bad"), "--reference_path", str(ref_dir), "--kl_coef", "0.1", "--train.progress", "false"]
    assert main(flags) == 2
    assert "tokenizer" in capsys.readouterr().err and not (tmp / "bad" / "model").exists()


def test_missing_inputs_are_refused(setup, capsys):
    policy_dir, data, tmp = setup
    assert main(_flags("grpo", policy_dir, data, tmp / "g") + ["--group_size", "1"]) == 2
    assert "group_size must be >= 2" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--data", str(data), "--train.progress", "false"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--model", str(policy_dir), "--data", str(tmp / "none.jsonl")]) == 2
    assert "no preference file" in capsys.readouterr().err
