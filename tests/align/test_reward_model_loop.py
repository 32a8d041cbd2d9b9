"""The closed human-feedback loop: a trained reward-model directory as the RL reward (alone or inside a weighted
mixture), with the RM's and the verifier's scores logged through training."""
import json

import pytest
import torch
from align_helpers import make_policy

from lmstack.align.config import AlignConfig
from lmstack.align.grpo import GroupTrainer
from lmstack.align.reward_model import RewardModel, RewardModelScorer
from lmstack.align.rewards.mixture import RewardMixture
from lmstack.align.rewards.spec import reward_from_spec
from lmstack.errors import LmstackError


@pytest.fixture
def rm_dir(tok, tmp_path):
    rm = RewardModel(make_policy(tok, seed=5), seed=3)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # a head that tells replies apart (a fresh one starts near 0)
    rm.save(tmp_path / "rm", tok)
    return tmp_path / "rm", rm.eval()


def test_rm_spec_alone_and_inside_a_mixture(rm_dir, tok, records):
    path, rm = rm_dir
    rec = records[0]
    prompt = rec["messages"][0]["content"]
    reply = f"#### {rec['answer']}"
    with torch.no_grad():
        direct = float(rm.rewards(tok, [prompt], [reply])[0])
    alone = reward_from_spec(f"rm:{path}")
    assert isinstance(alone, RewardModelScorer)
    assert alone(prompt, reply, rec) == pytest.approx(direct, abs=1e-5)
    mix = reward_from_spec(f"math=1,rm:{path}=0.5")
    assert isinstance(mix, RewardMixture) and set(mix.parts) == {"math", "rm"} and mix.parts["rm"][1] == 0.5
    parts = mix.components(prompt, reply, rec)
    assert parts["math"] == 1.0 and parts["rm"] == pytest.approx(direct, abs=1e-5)
    assert mix(prompt, reply, rec) == pytest.approx((1.0 + 0.5 * direct) / 1.5, abs=1e-5)
    with pytest.raises(LmstackError, match="no_such_rm"):
        reward_from_spec(f"math=1,rm:{path.parent / 'no_such_rm'}=0.5")
    with pytest.raises(LmstackError, match="not a number"):
        reward_from_spec(f"math=1,rm:{path}=half")


def test_rl_against_the_rm_logs_rm_and_verifier_scores(rm_dir, tok, records, tmp_path):
    path, _ = rm_dir
    cfg = AlignConfig(method="grpo", group_size=4, prompts_per_step=2, max_tokens=8, eval_prompts=3,
                      monitor="math,format",
                      train={"steps": 2, "eval_every": 0, "log_every": 1, "progress": False, "device": "cpu"},
                      optim={"lr": 1e-3}, schedule={"warmup_steps": 0})
    out = tmp_path / "run"
    summary = GroupTrainer(make_policy(tok), tok, cfg, reward_from_spec(f"math=1,rm:{path}=0.5")).fit(
        records[:5], records[5:], out_dir=out)
    for row in summary["history"]:
        assert {"score_math", "score_rm", "score_format"} <= set(row)
        assert row["score_rm"] == row["score_rm"]  # the RM applies to every sample: never NaN
    after = summary["eval_after"]
    assert after["score_math_n"] == 3 and "score_rm_stderr" in after
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("score_rm" in r for r in logged) and any("val_score_math" in r for r in logged)
    assert (out / "reward_scores.png").stat().st_size > 1000
