"""VLM training and evaluation on the shapes world (multimodal/vlm_train.py): answer-only targets, a loss that
falls, the text-only mode, data read from a synth-vision directory, and the metrics' shape (n, stderr)."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vision_world import build_vision_world, write_vision_world
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig
from lmstack.multimodal.vlm_train import IGNORE, VLMTrainConfig, encode_example, evaluate_captions, evaluate_vqa, \
    read_split, render_pixels, train_vlm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on busy cores


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=330, n_images=20)


@pytest.fixture(scope="module")
def records():
    return build_vision_world(n_images=6, size=32, seed=0)


def make(tok, fusion="projector", **kw):
    torch.manual_seed(0)
    return VLM(VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=4),
                         lm=ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                        max_seq_len=128),
                         fusion=fusion, n_queries=4, image_token_id=tok.token_to_id(IMAGE_TOKEN), **kw))


def test_only_the_answer_is_a_target(tok):
    vlm = make(tok)
    ids, labels = encode_example(vlm, tok, "How many shapes are there?", "3", use_images=True)
    answer = tok.encode(" 3") + [tok.token_to_id("<|eos|>")]
    assert ids[-len(answer):] == answer and labels[-len(answer):] == answer
    assert all(x == IGNORE for x in labels[:-len(answer)])
    assert ids.count(tok.token_to_id(IMAGE_TOKEN)) == vlm.n_image_tokens
    text_ids, _ = encode_example(vlm, tok, "How many shapes are there?", "3", use_images=False)
    assert tok.token_to_id(IMAGE_TOKEN) not in text_ids


@pytest.mark.parametrize("fusion", ["projector", "qformer", "xattn"])
def test_training_lowers_the_loss(tok, records, fusion):
    vlm = make(tok, fusion, freeze_lm=fusion == "xattn")
    lm_before = [p.clone() for p in vlm.lm.parameters()]
    stats = train_vlm(VLMTrainConfig(task="vqa", steps=25, batch_size=8, lr=3e-3, warmup=2), records, vlm, tok)
    assert stats["steps"] == 25 and stats["loss_last"] < stats["loss_first"] - 0.5
    if fusion == "xattn":  # Flamingo: the LM stays frozen, the gates moved off 0
        assert all(torch.equal(a, b) for a, b in zip(lm_before, vlm.lm.parameters()))
        assert any(layer.attn_gate.item() != 0 for layer in vlm.xattn)


def test_text_only_mode_trains_the_lm_alone(tok, records):
    vlm = make(tok)
    vision_before = [p.clone() for p in vlm.vision.parameters()]
    stats = train_vlm(VLMTrainConfig(task="caption", steps=5, batch_size=4, use_images=False), records, vlm, tok)
    assert stats["trainable_params"] == sum(p.numel() for p in vlm.lm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(vision_before, vlm.vision.parameters()))


def test_max_seconds_stops_early(tok, records):
    stats = train_vlm(VLMTrainConfig(steps=10_000, batch_size=2, max_seconds=0.5), records, make(tok), tok)
    assert 1 <= stats["steps"] < 10_000 and stats["seconds"] < 5


def test_evaluation_reports_n_and_stderr(tok, records):
    vlm = make(tok)
    caps = evaluate_captions(vlm, tok, records[:3], samples=2)
    for key in ("attribute_exact", "attribute_recall", "bleu4", "cider_d"):
        assert caps[key]["n"] == 3 and caps[key]["stderr"] >= 0
    assert len(caps["samples"]) == 2
    vqa = evaluate_vqa(vlm, tok, records[:2], use_images=False)
    n_items = sum(len(r["vqa"]) for r in records[:2])
    assert vqa["all"]["n"] == n_items
    assert sum(v["n"] for k, v in vqa.items() if k != "all") == n_items
    assert {"count", "exists"} <= set(vqa)


def test_read_split_and_pixels_from_a_directory(tmp_path, records):
    write_vision_world(tmp_path / "w", n_images=6, size=32, seed=0)
    got = [r for s in ("train", "val", "test", "test_heldout") for r in read_split(tmp_path / "w", s)]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in records}
    assert torch.allclose(render_pixels(got, 32), render_pixels([by_id[r["id"]] for r in got], 32))
    with pytest.raises(LmstackError, match="synth-vision"):
        read_split(tmp_path / "missing", "train")
    with pytest.raises(LmstackError, match="split"):
        read_split(tmp_path / "w", "dev")


def test_config_refusals():
    with pytest.raises(LmstackError, match="task"):
        VLMTrainConfig(task="dance")
    with pytest.raises(LmstackError, match="steps"):
        VLMTrainConfig(steps=0)


def test_vision_lr_mult_speeds_up_the_new_parts_only(tok, records):
    vlm = make(tok)
    lm0 = [p.clone() for p in vlm.lm.parameters()]
    vis0 = [p.clone() for p in vlm.vision.parameters()]
    train_vlm(VLMTrainConfig(task="vqa", steps=3, batch_size=4, lr=1e-6, warmup=1, vision_lr_mult=1e4), records,
              vlm, tok)
    lm_move = max((a - b).abs().max().item() for a, b in zip(lm0, vlm.lm.parameters()))
    vis_move = max((a - b).abs().max().item() for a, b in zip(vis0, vlm.vision.parameters()))
    assert lm_move < 1e-5 < 1e-3 < vis_move
    with pytest.raises(LmstackError, match="vision_lr_mult"):
        VLMTrainConfig(vision_lr_mult=0)
