"""multimodal/clip.py: the two towers, InfoNCE, zero-shot, recall, save/load."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.clip import (CLIP, CLIPConfig, TextConfig, clip_loss, label_embeddings, load_clip,
                                     retrieval_recall, save_clip, tokenize, zero_shot)
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=400, n_images=40)


def tiny(tok) -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                     text=TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=24),
                     embed_dim=16)
    return CLIP(cfg).eval()


def test_text_is_pooled_at_first_eos_and_padding_after_it_is_ignored(tok):
    model = tiny(tok)
    ids = tokenize(tok, ["a red circle.", "a small blue star on a gray background."], 24)
    assert ids[0, 0] == tok.bos_id and (ids[0] == tok.eos_id).sum() == 1 and ids[0, -1] == tok.pad_id
    short = tokenize(tok, ["a red circle."], 24)
    # right padding sits after the EOS; causal attention keeps it out of the pooled vector
    torch.testing.assert_close(model.encode_text(ids)[:1], model.encode_text(short), atol=1e-5, rtol=1e-5)
    hidden = model.text_hidden(short)
    eos = int((short[0] == tok.eos_id).nonzero()[0])
    torch.testing.assert_close(model.text_features(short), model.text_projection(hidden[:, eos]))
    with pytest.raises(LmstackError, match="EOS"):
        model.encode_text(torch.full((1, 4), 5))
    with pytest.raises(LmstackError, match="longer than text.max_seq_len=24"):
        model.encode_text(torch.ones(1, 30, dtype=torch.long))
    long_ids = tokenize(tok, ["a red circle " * 40], 24)
    assert long_ids.shape[1] == 24 and long_ids[0, -1] == tok.eos_id


def test_infonce_matches_formula_and_training_lowers_it(tok):
    model = tiny(tok).train()
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    ids = tokenize(tok, ["a red circle.", "a blue star.", "a green square.", "a pink cross."], 24)
    logits = model.logits(pixels, ids)
    assert logits.shape == (4, 4) and float(logits.detach().abs().max()) <= float(model.scale().detach()) + 1e-4
    manual = (-logits.log_softmax(1).diag().mean() - logits.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(clip_loss(logits), manual)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = float(model(pixels, ids).detach())
    for _ in range(15):
        opt.zero_grad()
        model(pixels, ids).backward()
        opt.step()
    assert float(model(pixels, ids).detach()) < first * 0.6
    with pytest.raises(LmstackError, match="3 pictures and 4 texts"):
        model(pixels[:3], ids)


def test_logit_scale_is_clamped_at_100(tok):
    model = tiny(tok)
    assert math.isclose(float(model.scale().detach()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)


def test_zero_shot_ensembles_prompts_and_gives_probabilities(tok):
    model = tiny(tok)
    pixels = torch.rand(3, 3, 16, 16)
    labels = ["red circle", "blue star", "green square"]
    probs = zero_shot(model, tok, pixels, labels)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    one = label_embeddings(model, tok, labels, templates=("a {}.",))
    both = label_embeddings(model, tok, labels, templates=("a {}.", "a picture of a {}."))
    two = label_embeddings(model, tok, labels, templates=("a picture of a {}.",))
    torch.testing.assert_close(both, F.normalize(one + two, dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(LmstackError, match="'{}'"):
        zero_shot(model, tok, pixels, labels, templates=("a picture",))


def test_retrieval_recall_counts_hits_both_ways():
    img = F.normalize(torch.eye(4), dim=-1)
    txt = img[[0, 1, 3, 2]]  # texts 2 and 3 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t@1"] == 0.5 and r["t2i@1"] == 0.5 and r["n_images"] == 4
    r = retrieval_recall(img, txt, ks=(1,), text_image=torch.tensor([0, 1, 3, 2]))
    assert r["i2t@1"] == 1.0 and r["t2i@1"] == 1.0
    # two captions per image: image->text hits if either is ranked first
    txt2 = torch.cat([img, -img])
    r = retrieval_recall(img, txt2, ks=(1, 5), text_image=torch.tensor([0, 1, 2, 3] * 2))
    assert r["i2t@1"] == 1.0 and r["t2i@1"] == 0.5 and r["t2i@5"] == 1.0
    with pytest.raises(LmstackError, match="text_image"):
        retrieval_recall(img, txt2)


def test_save_load_round_trip_and_refusals(tok, tmp_path):
    model = tiny(tok)
    pixels = torch.rand(2, 3, 16, 16)
    ids = tokenize(tok, ["a red circle.", "a blue star."], 24)
    out = save_clip(model, tok, tmp_path / "clip")
    back, tok2 = load_clip(out)
    torch.testing.assert_close(back.logits(pixels, ids), model.logits(pixels, ids))
    assert tok2.encode("a red star") == tok.encode("a red star")
    with pytest.raises(LmstackError, match="config.json is missing"):
        load_clip(tmp_path)
    (tmp_path / "bad").mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / "bad" / name).write_bytes((out / name).read_bytes())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LmstackError, match="model_type='llama'"):
        load_clip(tmp_path / "bad")
    (out / "tokenizer.json").unlink()
    with pytest.raises(LmstackError, match="tokenizer.json is missing"):
        load_clip(out)
    with pytest.raises(ConfigError, match="embed_dim"):
        CLIPConfig(embed_dim=0)
    with pytest.raises(ConfigError, match="eos_token_id=900"):
        TextConfig(eos_token_id=900)


def test_train_clip_command_writes_a_loadable_run_and_names_missing_data(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.multimodal.clip_train import load_vlp
    from lmstack.multimodal.vision_world import write_vision_world

    write_vision_world(tmp_path / "vis", n_images=24, size=32, seed=0)
    small = ["--model.vision.image_size", "32", "--model.vision.d_model", "32", "--model.vision.n_layers", "1",
             "--model.text.d_model", "32", "--model.text.n_layers", "1", "--vocab_size", "300", "--steps", "2",
             "--batch_size", "4", "--log_every", "1", "--no_progress", "--data", str(tmp_path / "vis")]
    main(["mm", "train-clip", *small, "--out", str(tmp_path / "run"), "--objectives", "[itc, itm, lm]"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:2]] == [1, 2] and rows[-1]["split"] == "val" and "i2t@1" in rows[-1]
    assert {"itc", "itm", "lm"} <= set(rows[0])
    model, tok = load_clip(tmp_path / "run")
    assert model.config.vision.image_size == 32 and model.config.text.vocab_size == tok.vocab_size
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    vlp, _ = load_vlp(tmp_path / "run")
    assert vlp.itm_head.weight.shape == (2, 32)
    torch.testing.assert_close(vlp.clip.logit_scale, model.logit_scale)
    save_clip(model, tok, tmp_path / "clip_only")
    with pytest.raises(LmstackError, match="vlp.json is missing"):
        load_vlp(tmp_path / "clip_only")
    assert main(["mm", "train-clip", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) != 0
    assert "write one with `lmstack data synth-vision --out" in capsys.readouterr().err
