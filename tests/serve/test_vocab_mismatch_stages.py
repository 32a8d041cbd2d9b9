"""A tokenizer larger than the model fails once, at load time, with one `lmstack: error:` line naming both
sizes and paths, in every stage (one helper: lmstack.model.vocab.check_vocab); pretrain records the padded
rows of a table larger than its tokenizer (real_vocab_size), so they get zero probability from step one."""
import json

import pytest
import torch

import lmstack
from lmstack.cli import main
from lmstack.model.presets import preset
from lmstack.tokenizer import train_tokenizer

from serve_helpers import make_text


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size - 20, max_seq_len=64))
    bad = lmstack.save_model(model, root / "bad", tokenizer=tok)   # a tokenizer.json that does not fit
    tok.save(root / "tok")
    (root / "corpus.txt").write_text("\n".join(make_text()) * 3)
    (root / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    (root / "pref.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "yo", "rejected": "no"}) + "\n")
    return root, str(bad)


@pytest.mark.parametrize("stage", ["generate", "generate_tokenizer", "model_generate", "chat", "serve", "finetune",
                                   "align", "pretrain"])
def test_every_stage_refuses_a_larger_tokenizer_in_one_line(tok, files, stage, capsys):
    root, bad = files
    n, small = tok.vocab_size, tok.vocab_size - 20
    args, where = {
        "generate": (["generate", "--model", bad, "--prompt", "the cat"], bad),
        "generate_tokenizer": (["generate", "--model", bad, "--tokenizer", str(root / "tok"), "--prompt", "x"],
                               str(root / "tok")),
        "model_generate": (["model", "generate", "--model", bad, "--prompt", "the cat"], bad),
        "chat": (["chat", "--model", bad], bad),
        "serve": (["serve", "--model", bad, "--port", "1"], bad),
        "finetune": (["finetune", "--model", bad, "--data", str(root / "sft.jsonl"), "--out", str(root / "ft")], bad),
        "align": (["align", "--model", bad, "--data", str(root / "pref.jsonl"), "--out", str(root / "al")], bad),
        "pretrain": (["pretrain", "--data.text", str(root / "corpus.txt"), "--data.tokenizer", str(root / "tok"),
                      "--model.vocab_size", str(small), "--out", str(root / "pt")], str(root / "tok")),
    }[stage]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: error: ") and "\n" not in err and "IndexError" not in err
    assert f"has {n} tokens" in err and f"has {small} tokens" in err and where in err
    if stage == "pretrain":
        assert f"Set model.vocab_size >= {n}" in err


def test_pretrain_marks_rows_past_the_tokenizer_as_padding(tok, files):
    root, _ = files
    out = root / "run"
    assert main(["pretrain", "--data.text", str(root / "corpus.txt"), "--data.tokenizer", str(root / "tok"),
                 "--model.vocab_size", str(tok.vocab_size + 28), "--model.d_model", "32", "--model.n_layers", "1",
                 "--model.n_heads", "2", "--model.max_seq_len", "32", "--data.seq_len", "32", "--data.batch_size",
                 "4", "--train.steps", "3", "--train.eval_every", "3", "--train.progress", "false",
                 "--out", str(out)]) == 0
    [model_dir] = list(out.glob("checkpoints/step_*/model"))
    model = lmstack.load_model(model_dir)
    assert model.config.vocab_size == tok.vocab_size + 28 and model.config.real_vocab_size == tok.vocab_size
    with torch.no_grad():
        probs = model(torch.tensor([tok.encode("the cat sat")])).softmax(-1)
    assert (probs[..., tok.vocab_size:] == 0).all()


def test_model_generate_never_samples_the_padded_rows_of_an_older_checkpoint(tok, tmp_path, capsys):
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size + 40, max_seq_len=64))
    with torch.no_grad():  # loud padded rows and no real_vocab_size: only the tokenizer says they are padding
        w = model.lm_head.weight
        w[tok.vocab_size:] = torch.randn(40, w.shape[1]) * w[:tok.vocab_size].std() * 40
    path = lmstack.save_model(model, tmp_path / "old", tokenizer=tok)
    for temperature in ("0", "1"):
        assert main(["model", "generate", "--model", str(path), "--prompt", "the cat", "--max_tokens", "12",
                     "--temperature", temperature, "--seed", "0"]) == 0
        assert "[12 tokens" in capsys.readouterr().out   # decoded: an id past the tokenizer would not decode
