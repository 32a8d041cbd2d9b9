"""The speedrun's alignment stage on a tiny world: SFT -> DPO -> GRPO, measured before and after."""
import json

from align_helpers import make_policy
from lmstack.align.align_stage import align_stage, preference_accuracy
from lmstack.align.preference_data import Pair
from lmstack.data.world import WorldConfig, generate_world
from lmstack.model.hf_io import load_model, save_model


def test_align_stage_writes_a_before_after_table(tmp_path, tok):
    world = tmp_path / "world"
    generate_world(world, config=WorldConfig(n_people=16, n_arithmetic=60, n_instructions=30, n_preferences=80,
                                             corpora=("chat", "preferences")), progress=False)
    sft = tmp_path / "sft_model"
    save_model(make_policy(tok), sft, tokenizer=tok)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "scores.json").write_text(json.dumps({"base": {"qa": 0.0, "instruction": 0.1}}))
    result = align_stage(tmp_path, sft, world, budget_s=4.0, n_eval=3, log=lambda *a: None)
    for who in ("sft", "aligned"):
        s = result["scores"][who]
        assert 0 <= s["arithmetic"] <= 1 and s["arithmetic_n"] > 0 and 0 <= s["preference_accuracy"] <= 1
        assert s["n_harmful"] + s["n_benign"] > 0  # a tiny world has few safety prompts in its test split
    assert result["dpo"]["steps"] >= 1 and result["grpo"]["steps"] >= 1
    assert (tmp_path / "align" / "model" / "model.safetensors").exists()
    report = (tmp_path / "align" / "report.md").read_text()
    assert "| refusal of harmful requests" in report and "| qa (first 30 test) | 0.0% |" in report
    moved = load_model(tmp_path / "align" / "model")
    assert any(not (a == b).all() for a, b in zip(moved.state_dict().values(), load_model(sft).state_dict().values()))


def test_preference_accuracy_prefers_the_likelier_reply(tok):
    policy = make_policy(tok)
    pairs = [Pair("Say", "the the the", "zq xv kj")] * 2
    acc = preference_accuracy(policy, tok, pairs)
    swapped = preference_accuracy(policy, tok, [Pair(p.prompt, p.rejected, p.chosen) for p in pairs])
    assert acc + swapped == 1.0  # no ties for different texts: exactly one order wins
