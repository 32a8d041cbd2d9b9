"""`lmstack mm train-vlm` (multimodal/vlm_run.py): LLaVA's recipe from the command line."""
import json

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.multimodal.clip import load_clip
from lmstack.multimodal.vision_world import write_vision_world
from lmstack.multimodal.vlm import load_vlm
from lmstack.multimodal.vlm_run import VLMRunConfig, run_train_vlm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vw")
    write_vision_world(root / "data", n_images=60, size=32, seed=0)
    assert main(["mm", "train-clip", "--data", str(root / "data"), "--out", str(root / "clip"), "--steps", "3",
                 "--batch_size", "4", "--model.vision.image_size", "32", "--progress", "false"]) in (0, None)
    return root


def test_train_vlm_uses_the_frozen_clip_tower_and_saves_a_loadable_vlm(world, capsys):
    out = world / "vlm"
    rc = main(["mm", "train-vlm", "--data", str(world / "data"), "--clip", str(world / "clip"), "--out", str(out),
               "--pretrain_steps", "2", "--train.steps", "3", "--train.batch_size", "4", "--eval_images", "3",
               "--d_model", "32", "--n_layers", "1"])
    assert rc in (0, None)
    vlm, (clip, _) = load_vlm(out), load_clip(world / "clip")
    for name, weight in clip.vision.state_dict().items():  # the tower is CLIP's, unchanged by training
        assert torch.equal(vlm.vision.state_dict()[name], weight), name
    assert vlm.config.freeze_vision and vlm.config.fusion == "projector"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"]["text"]["steps"] == 2 and metrics["stages"]["multimodal"]["steps"] == 3
    assert metrics["val"]["vqa"]["all"]["n"] > 0 and "stderr" in metrics["val"]["captions"]["cider_d"]
    assert "wrote" in capsys.readouterr().out


def test_without_clip_a_fresh_vit_trains(world):
    cfg = VLMRunConfig(data=str(world / "data"), out=str(world / "fresh"), fusion="qformer", pretrain_steps=0,
                       eval_images=0, d_model=32, n_layers=1, n_queries=4)
    cfg.vision.image_size = 32
    cfg.train.steps, cfg.train.batch_size = 2, 4
    run_train_vlm(cfg)
    vlm = load_vlm(world / "fresh")
    assert not vlm.config.freeze_vision and vlm.n_image_tokens == 4


def test_missing_data_is_named(tmp_path):
    with pytest.raises(LmstackError, match="synth-vision"):
        run_train_vlm(VLMRunConfig(data=str(tmp_path / "nothing"), out=str(tmp_path / "o")))
    with pytest.raises(LmstackError, match="--data DIR and --out DIR"):
        run_train_vlm(VLMRunConfig())
