"""The speedrun's SFT stage on a tiny world: it trains on the world's chat mix and scores base vs SFT."""
import json

from _sft_tiny import save_base
from lmstack.stages.sft import STAGE_MIX, sft_stage
from lmstack.world import WorldConfig, generate_world


def _quiet(*_):
    pass


def test_sft_stage_trains_on_world_chat_and_scores_base_vs_sft(tmp_path):
    world = tmp_path / "world"
    generate_world(world, config=WorldConfig(n_people=16, n_arithmetic=200, n_instructions=100, corpora=("chat",)),
                   progress=False)
    base = save_base(tmp_path / "base")
    result = sft_stage(tmp_path, base, budget_s=3.0, world_dir=world, n_eval=3, batch_size=4, seq_len=128,
                       log=_quiet)
    sft = tmp_path / "sft"
    assert (sft / "run" / "model" / "model.safetensors").exists() and (sft / "report.md").exists()
    kinds = {json.loads(line)["kind"] for line in (sft / "data" / "train.jsonl").read_text().splitlines()}
    assert kinds == set(STAGE_MIX)
    for who in ("base", "base_chat", "sft"):
        assert set(result["scores"][who]) == {"qa", "arithmetic", "instruction"}
        assert all(0.0 <= v <= 1.0 for v in result["scores"][who].values())
    assert result["report_md"].count("\n") == 4 and result["steps"] >= 1
