"""`lmstack model init` writes a tokenizer, so generate/chat work on its output at once; `generate --tokenizer`
takes a tokenizer from elsewhere; a model without one gets an error naming the flag."""
import json
import shutil
import subprocess
import sys

from lmstack.cli import main


def test_model_init_writes_a_byte_level_tokenizer_that_generate_and_chat_use(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    from lmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    text = "Hé, wörld! ✓"
    assert tok.decode(tok.encode(text)) == text             # byte-level: any text round-trips
    assert tok.vocab_size == 256 + len(tok.special_tokens)   # no merges
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["bos_token_id"] == tok.bos_id
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max_tokens", "3",
                 "--threads", "1", "--json_output", "true"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(rec["completions"][0]["token_ids"]) == 3
    # the terminal chat as a user runs it: one turn on stdin, then leave
    chat = subprocess.run([sys.executable, "-m", "lmstack.cli", "chat", "--model", str(out), "--max_tokens", "3",
                           "--threads", "1"], input="hello\n/exit\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and "model> " in chat.stdout, chat.stderr[-2000:]


def test_generate_takes_a_tokenizer_from_elsewhere_and_names_the_flag_without_one(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(out)]) == 0
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(out / name, tok_dir / name)
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err and "no tokenizer.json" in err
    assert main(["generate", "--model", str(out), "--tokenizer", str(tok_dir), "--prompt", "hi",
                 "--max_tokens", "2"]) == 0


def test_model_init_copies_a_given_tokenizer_and_refuses_one_too_large(tmp_path, capsys):
    from lmstack.tokenizer import train_tokenizer

    small = train_tokenizer(texts=["the cat sat on the mat " * 50], type="bpe", vocab_size=300, show_progress=False)
    small.save(tmp_path / "small")
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(tmp_path / "a"),
                 "--tokenizer", str(tmp_path / "small")]) == 0
    copied = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert copied == json.loads((tmp_path / "small" / "tokenizer.json").read_text())
    big = train_tokenizer(texts=[" ".join(f"w{i}x{i * 7}" for i in range(3000))], type="bpe", vocab_size=700,
                          min_frequency=1, show_progress=False)
    assert big.vocab_size > 512
    big.save(tmp_path / "big")
    capsys.readouterr()
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(tmp_path / "b"),
                 "--tokenizer", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert f"has {big.vocab_size} ids but llama-tiny has vocab_size=512" in err
    assert not (tmp_path / "b").exists()  # nothing half-written
