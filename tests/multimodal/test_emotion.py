"""emotion.py: input checks, masking, learning from audio / text / both, BoW, evaluation, save/load."""
import json

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.emotion import (BagOfWords, EmotionClassifier, EmotionConfig, EmotionTrainConfig,
                                        audio_features, classify, collate, emotion_tokenizer, evaluate, load_emotion,
                                        make_examples, noisy_copies, predict, save_emotion, scores, train_emotion)
from lmstack.multimodal.emotion_world import CLASSES

TINY = dict(d_model=32, n_layers=1, n_heads=2)


def tone(freq: float, seconds: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def toy_pairs(n: int, seed: int) -> list:
    """Class = (high tone?, good word?): the audio knows one axis, the text the other, like the emotion world."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        label = i % 4
        high, good = label in (0, 1), label in (0, 2)
        freq = (900 if high else 250) * rng.uniform(0.9, 1.1)
        text = f"{'Good' if good else 'Bad'} news: item {rng.integers(100)} arrived."
        pairs.append(({"text": text, "label_id": label, "sample_rate": 16000},
                      tone(freq, rng.uniform(0.2, 0.4), rng.uniform(0, 6))))
    return pairs


@pytest.fixture(scope="module")
def tok():
    return emotion_tokenizer([r["text"] for r, _ in toy_pairs(40, 0)], vocab_size=300)


def test_audio_input_refusals():
    with pytest.raises(LmstackError, match="sample rate of 8000 Hz"):
        audio_features(tone(300, 0.2), 8000)
    with pytest.raises(LmstackError, match="empty"):
        audio_features(np.zeros(0, np.float32), 16000)
    with pytest.raises(LmstackError, match="mono"):
        audio_features(np.zeros((2, 3200), np.float32), 16000)
    with pytest.raises(LmstackError, match="NaN"):
        audio_features(np.full(3200, np.nan, np.float32), 16000)
    assert audio_features(tone(300, 2.0), 16000, max_frames=50).shape == (80, 50)


def test_config_refusals():
    with pytest.raises(LmstackError, match="modality"):
        EmotionConfig(modality="video")
    with pytest.raises(LmstackError, match="multiple of n_heads"):
        EmotionConfig(d_model=30, n_heads=4)
    with pytest.raises(LmstackError, match="steps"):
        EmotionTrainConfig(steps=0)


@pytest.mark.parametrize("fusion", ["concat", "xattn"])
def test_padding_does_not_change_an_example(tok, fusion):
    torch.manual_seed(0)
    cfg = EmotionConfig(modality="both", fusion=fusion, vocab_size=tok.vocab_size, **TINY)
    model = EmotionClassifier(cfg).eval()
    pairs = toy_pairs(3, 1)
    pairs[1] = ({**pairs[1][0], "text": pairs[1][0]["text"] + " It was late again and again."}, tone(500, 0.9))
    ex = make_examples(pairs, cfg, tok)
    batch = collate(ex)
    assert batch["mel"].shape[2] == max(e["mel"].shape[1] for e in ex)
    assert batch["ids_mask"].sum() < batch["ids"].numel()  # the batch really is padded
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(collate([e])) for e in ex])
    assert torch.allclose(together, alone, atol=1e-5)


def test_fusion_learns_both_axes_and_single_views_cannot(tok):
    train, test = toy_pairs(96, 0), toy_pairs(40, 1)
    accs = {}
    for modality in ("audio", "text", "both"):
        torch.manual_seed(0)
        cfg = EmotionConfig(modality=modality, vocab_size=tok.vocab_size, **TINY)
        model = EmotionClassifier(cfg)
        losses = train_emotion(model, make_examples(train, cfg, tok), EmotionTrainConfig(steps=60, batch_size=16,
                                                                                       lr=3e-3, warmup=5))
        assert losses[-1] < losses[0]
        accs[modality] = evaluate(model, make_examples(test, cfg, tok))["accuracy"]
    assert accs["both"] >= 0.9, accs
    assert accs["audio"] <= 0.6 and accs["text"] <= 0.6, accs  # one axis each: ceiling 0.5


def test_bag_of_words(tok):
    train = toy_pairs(64, 0)
    words = BagOfWords.vocabulary([r["text"] for r, _ in train])
    assert "good" in words and "news" in words and words == sorted(words)
    bow = BagOfWords(words)
    feats = bow.features(["Good good news, zebra!"])
    assert feats[0, words.index("good")] == 2 and feats.sum() == 3  # unseen words count for nothing
    cfg = EmotionConfig(modality="text", vocab_size=tok.vocab_size)
    train_emotion(bow, make_examples(train, cfg, tok), EmotionTrainConfig(steps=40, batch_size=16, lr=0.1))
    probs = predict(bow, make_examples(toy_pairs(40, 1), cfg, tok))
    good = torch.tensor([r["label_id"] in (0, 2) for r, _ in toy_pairs(40, 1)])
    assert ((probs[:, 0] + probs[:, 2] > 0.5) == good).float().mean() == 1.0  # valence read off the word
    with pytest.raises(LmstackError, match="non-empty vocabulary"):
        BagOfWords([])


def test_equal_seeds_give_equal_batches(tok):
    cfg = EmotionConfig(modality="text", vocab_size=tok.vocab_size, **TINY)
    ex = make_examples(toy_pairs(32, 0), cfg, tok)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train_emotion(EmotionClassifier(cfg), ex, EmotionTrainConfig(steps=5, batch_size=8)))
    assert runs[0] == runs[1]
    torch.manual_seed(0)
    other = train_emotion(EmotionClassifier(cfg), ex, EmotionTrainConfig(steps=5, batch_size=8, seed=1))
    assert other != runs[0]


def test_evaluate_confusion(tok):
    cfg = EmotionConfig(modality="text", vocab_size=tok.vocab_size, **TINY)
    ex = make_examples(toy_pairs(20, 2), cfg, tok)
    out = evaluate(EmotionClassifier(cfg), ex)
    conf = np.array(out["confusion"])
    assert conf.shape == (4, 4) and conf.sum() == out["n"] == 20
    assert out["accuracy"] == pytest.approx(np.trace(conf) / 20)
    assert out["stderr"] == pytest.approx(np.sqrt(out["accuracy"] * (1 - out["accuracy"]) / 20))
    assert conf.sum(1).tolist() == [5, 5, 5, 5]  # rows are the true classes


def test_save_load_classify(tmp_path, tok):
    torch.manual_seed(0)
    cfg = EmotionConfig(modality="both", fusion="xattn", vocab_size=tok.vocab_size, **TINY)
    model = EmotionClassifier(cfg).eval()
    save_emotion(model, tmp_path / "m", tok)
    again, tok2 = load_emotion(tmp_path / "m")
    wave, text = tone(400, 0.3), "Good news: item 3 arrived."
    a, b = classify(model, tok, wave, 16000, text), classify(again, tok2, wave, 16000, text)
    assert a["label"] == b["label"] in CLASSES and a["probs"] == pytest.approx(b["probs"], abs=1e-6)
    with pytest.raises(LmstackError, match="needs the message text"):
        classify(again, tok2, wave, 16000)
    with pytest.raises(LmstackError, match="16000 Hz"):
        classify(again, tok2, wave, 22050, text)
    with pytest.raises(LmstackError, match="needs audio"):
        classify(again, tok2, text=text)
    audio_only = EmotionClassifier(EmotionConfig(modality="audio", **TINY))
    save_emotion(audio_only, tmp_path / "a")
    assert load_emotion(tmp_path / "a")[1] is None and not (tmp_path / "a" / "tokenizer.json").exists()
    with pytest.raises(LmstackError, match="pass tok"):
        save_emotion(model, tmp_path / "x")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "model_type": "lmstack-clip"}))
    with pytest.raises(LmstackError, match="not an emotion-model config"):
        load_emotion(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "emotion": {**conf["emotion"], "d_model": 64}}))
    with pytest.raises(LmstackError, match="does not match its config"):
        load_emotion(tmp_path / "m")
    with pytest.raises(LmstackError, match="config.json or model.safetensors is missing"):
        load_emotion(tmp_path / "nothing")


def test_scores_and_noisy_copies():
    out = scores([0, 1, 2, 3, 3], [0, 1, 2, 2, 3])
    assert out["accuracy"] == 0.8 and out["n"] == 5 and out["confusion"][3] == [0, 0, 1, 1]
    with pytest.raises(LmstackError, match="equally many"):
        scores([0, 1], [0])
    pairs = toy_pairs(6, 0)
    noisy = noisy_copies(pairs, (10.0, 10.0), seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(noisy, noisy_copies(pairs, (10.0, 10.0), seed=0)))
    for (rec, clean), (nrec, dirty) in zip(pairs, noisy):
        assert nrec["snr_db"] == 10.0 and nrec["text"] == rec["text"] and "snr_db" not in rec
        snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((dirty - clean) ** 2.0))
        assert abs(snr - 10.0) < 0.5
    with pytest.raises(LmstackError, match="low <= high"):
        noisy_copies(pairs, (20.0, 5.0))
