"""Video-language training: answer vocabulary, QA items, accuracy and the majority level, QA training and
contrastive pretraining on tiny worlds, the run directory round trip and the clip checks on load."""
import math
from pathlib import Path

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import TextConfig
from lmstack.multimodal.video_model import VideoCLIP, VideoCLIPConfig, VideoConfig, VideoQA, VideoQAConfig
from lmstack.multimodal.video_train import (VideoTrainConfig, accuracy, answer_vocab, encode_questions,
                                            load_video_qa, load_video_split, majority_level, predict_qa,
                                            pretrain_contrastive, qa_items, render_clips, train_qa, train_video,
                                            video_retrieval, video_tokenizer)
from lmstack.multimodal.video_world import build_video_world, write_video_world
from lmstack.multimodal.vit import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # two threads collapse on the shared cores
TINY = VisionConfig(image_size=32, patch_size=16, d_model=32, n_layers=1, n_heads=2)


@pytest.fixture(scope="module")
def tok():
    return video_tokenizer()


def _video(encoder: str = "temporal") -> VideoConfig:
    return VideoConfig(vision=TINY, frames=4, encoder=encoder, temporal_layers=1)


def test_answer_vocab_holds_every_answer_of_the_world_once():
    answers = answer_vocab()
    assert len(answers) == len(set(answers))
    records = build_video_world(60, frames=6, size=32, seed=3)
    items = qa_items(records, answers)
    assert len(items) == sum(len(r["questions"]) for r in records)
    assert {answers[it["label"]] for it in items} <= set(answers)
    bad = [dict(records[0], questions=[dict(records[0]["questions"][0], answer="purple")])]
    with pytest.raises(LmstackError, match="'purple'"):
        qa_items(bad, answers)


def test_accuracy_and_majority_level():
    r = accuracy([True, False, True, True])
    assert r["acc"] == 0.75 and r["n"] == 4 and r["stderr"] == round(math.sqrt(0.75 * 0.25 / 4), 4)
    train = [{"type": "count", "sensitive": True, "label": 2}] * 3 + [{"type": "count", "sensitive": True, "label": 1}]
    train += [{"type": "collision", "sensitive": False, "label": 6}]
    test = [{"type": "count", "sensitive": True, "label": 2}, {"type": "count", "sensitive": True, "label": 1},
            {"type": "collision", "sensitive": False, "label": 6}, {"type": "order", "sensitive": True, "label": 9}]
    m = majority_level(train, test)  # an unseen group ('order') is answered wrongly
    assert m["temporal"] == accuracy([True, False, False]) and m["non_temporal"]["acc"] == 1.0
    assert m["count_temporal"]["acc"] == 0.5 and m["all"]["n"] == 4


def test_encode_questions_masks_padding_and_refuses_long(tok):
    ids, mask = encode_questions(tok, ["How many shapes are there at the end?", "Do they touch?"], 32)
    assert ids.shape == mask.shape and int(mask[1].sum()) == len(tok.encode("Do they touch?")) + 2
    assert int(mask[0].sum()) == ids.shape[1] and int(ids[1, int(mask[1].sum()) - 1]) == tok.eos_id
    with pytest.raises(LmstackError, match="max_question_len=4"):
        encode_questions(tok, ["How many shapes are there at the end?"], 4)


def test_train_qa_fits_a_tiny_world(tok):
    answers = answer_vocab()
    records = build_video_world(4, frames=4, size=32, seed=0)
    clips = render_clips(records)
    assert clips.shape == (4, 4, 3, 32, 32) and clips.dtype == torch.uint8
    items = qa_items(records, answers)
    torch.manual_seed(0)
    model = VideoQA(VideoQAConfig(video=_video(), vocab_size=tok.vocab_size, n_answers=len(answers), d_model=32,
                                  n_layers=1, n_heads=2))
    before = sum(p == it["label"] for p, it in zip(predict_qa(model, tok, items, clips), items))
    rows = train_qa(model, tok, items, clips, steps=40, batch_size=4, questions_per_clip=12, lr=3e-3)
    after = sum(p == it["label"] for p, it in zip(predict_qa(model, tok, items, clips), items))
    assert rows[-1]["loss"] < rows[0]["loss"] and after > before and after / len(items) > 0.5


def test_contrastive_pretraining_lowers_the_loss_and_reports_recall(tok):
    records = build_video_world(6, frames=4, size=32, seed=1)
    clips = render_clips(records)
    text = TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=192,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = VideoCLIP(VideoCLIPConfig(video=_video("mean"), text=text, embed_dim=16))
    rows = pretrain_contrastive(model, tok, records, clips, steps=30, batch_size=6, lr=3e-3)
    assert rows[-1]["loss"] < rows[0]["loss"]
    r = video_retrieval(model, tok, records, clips, ks=(1, 5))
    assert r["n"] == 6 and r["chance@1"] == pytest.approx(1 / 6) and r["chance@5"] == pytest.approx(5 / 6)
    assert r["v2t@1"] > r["chance@1"] and 0 <= r["t2v@5"] <= 1


def test_train_video_writes_a_run_that_loads_back(tmp_path: Path, tok):
    write_video_world(tmp_path / "world", n_clips=14, frames=4, size=32, seed=0)
    cfg = VideoTrainConfig(data=str(tmp_path / "world"), out=str(tmp_path / "run"),
                           model=VideoQAConfig(video=_video(), d_model=32, n_layers=1, n_heads=2),
                           text=VideoCLIPConfig(text=TextConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=192)),
                           pretrain_steps=2, qa_steps=3, batch_size=4, progress=False, device="cpu")
    summary = train_video(cfg)
    assert summary["qa_val"]["all"]["n"] > 0 and "v2t@1" in summary["retrieval_val"]
    assert {"temporal", "non_temporal"} <= set(summary["majority_val"])
    model, tok2, answers = load_video_qa(tmp_path / "run")
    records, clips = load_video_split(tmp_path / "world", "val", 4, 32)
    items = qa_items(records, answers)
    assert model.config.video.encoder == "temporal" and answers == answer_vocab()
    hits = [p == it["label"] for p, it in zip(predict_qa(model, tok2, items, clips), items)]
    assert accuracy(hits) == summary["qa_val"]["all"]
    with pytest.raises(LmstackError, match="model.safetensors is missing"):
        (tmp_path / "run" / "model.safetensors").unlink()
        load_video_qa(tmp_path / "run")


def test_load_video_split_refuses_bad_clips(tmp_path: Path):
    write_video_world(tmp_path, n_clips=6, frames=4, size=32, seed=0)
    with pytest.raises(LmstackError, match="frames x height"):
        load_video_split(tmp_path, "train", 5, 32)
    with pytest.raises(LmstackError, match="64x64 RGB"):
        load_video_split(tmp_path, "train", 4, 64)
    with pytest.raises(LmstackError, match="manifest.json missing"):
        load_video_split(tmp_path / "nowhere", "train", 4, 32)
    path = next((tmp_path / "clips" / "train").glob("*.png"))
    path.write_bytes(b"not a png")
    with pytest.raises(LmstackError, match="cannot read sprite sheet"):
        load_video_split(tmp_path, "train", 4, 32)


def test_blind_arm_ignores_the_clip(tok):
    answers = answer_vocab()
    records = build_video_world(3, frames=4, size=32, seed=2)
    items, clips = qa_items(records, answers), render_clips(records)
    torch.manual_seed(0)
    model = VideoQA(VideoQAConfig(video=_video(), vocab_size=tok.vocab_size, n_answers=len(answers), d_model=32,
                                  n_layers=1, n_heads=2))
    vit = {k: v.clone() for k, v in model.video.state_dict().items()}
    train_qa(model, tok, items, clips, steps=2, batch_size=3, blind=True)
    assert all(torch.equal(v, model.video.state_dict()[k]) for k, v in vit.items())  # no gradient reached it
    assert predict_qa(model, tok, items, clips, blind=True) == predict_qa(model, tok, items, 255 - clips, blind=True)
    train_qa(model, tok, items, clips, steps=2, batch_size=3)
    assert not torch.equal(vit["vit.patch_embed.weight"], model.video.state_dict()["vit.patch_embed.weight"])
