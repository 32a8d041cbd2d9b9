"""`lmstack tokenizer train|encode|stats` through lmstack.cli.main, including the bad-input messages."""
import gzip
import json

import pytest

from lmstack.cli import main
from lmstack.tokenizer import load_tokenizer


@pytest.fixture()
def files(tmp_path, corpus):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    half = len(corpus) // 2
    a.write_text(corpus[:half], encoding="utf-8")
    b.write_text(corpus[half:], encoding="utf-8")
    return a, b


def test_train_encode_stats(tmp_path, files, capsys):
    a, b = files
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", f"[{a},{b}]", "--vocab_size", "500", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == 2 and summary["vocab_size"] == 500
    tok = load_tokenizer(out)
    assert (out / "tokenizer_config.json").is_file() and tok.vocab_size == 500

    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "the people"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0]) == tok.encode("the people")
    assert json.loads(lines[1]) == [tok.id_to_token(i) for i in tok.encode("the people")]

    udhr = tmp_path / "udhr.jsonl.gz"
    rows = [{"code": c, "name": c, "articles": [{"number": str(n), "text": t} for n in range(1, 31)]}
            for c, t in (("eng", "the people said"), ("ell", "οι άνθρωποι είπαν"), ("jpn", "人々は言った"))]
    with gzip.open(udhr, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert main(["tokenizer", "stats", "--tokenizer", str(out), "--input", str(a), "--udhr", str(udhr),
                 "--out", str(tmp_path / "stats")]) == 0
    text = capsys.readouterr().out
    assert "bytes/token" in text and "worst premium" in text
    assert (tmp_path / "stats" / "fertility.png").is_file()
    assert "| eng |" in (tmp_path / "stats" / "fertility.md").read_text()


def test_input_forms_repeat_and_glob(tmp_path, files):
    a, b = files
    assert main(["tokenizer", "train", "--input+", str(a), "--input+", str(b), "--type", "wordpiece",
                 "--vocab_size", "300", "--out", str(tmp_path / "wp")]) == 0
    assert load_tokenizer(tmp_path / "wp").type == "wordpiece"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "*.txt"), "--type", "char",
                 "--out", str(tmp_path / "ch")]) == 0
    assert load_tokenizer(tmp_path / "ch").type == "char"


def test_bad_input_messages(tmp_path, files, capsys):
    a, _ = files
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff\xfe here\nanother fine line\n" * 3)
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab_size", "300", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt is not valid UTF-8: bad byte at offset 17" in err and "Traceback" not in err
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab_size", "300", "--invalid_utf8", "skip",
                 "--out", str(tmp_path / "x")]) == 0
    assert "skipped 3 lines" in capsys.readouterr().out

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert main(["tokenizer", "train", "--input", str(empty), "--out", str(tmp_path / "y")]) == 2
    assert "corpus is empty" in capsys.readouterr().err

    assert main(["tokenizer", "train", "--input", str(a), "--vocab_size", "100", "--out", str(tmp_path / "z")]) == 2
    assert "smaller than the base alphabet" in capsys.readouterr().err

    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "z")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(tmp_path / "*.md"), "--out", str(tmp_path / "z")]) == 2
    assert "matches no files" in capsys.readouterr().err

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "corrupt"), "--text", "x"]) == 2
    assert "not valid JSON" in capsys.readouterr().err

    assert main(["tokenizer", "train", "--input", str(a), "--type", "wordpiece", "--pretokenizer", "gpt4",
                 "--out", str(tmp_path / "z")]) == 2
    assert "pretokenizer='gpt4' is not allowed for type='wordpiece'" in capsys.readouterr().err


def test_config_errors_name_the_field(corpus):
    from lmstack.errors import LmstackError
    from lmstack.tokenizer import TokenizerConfig, train_tokenizer

    with pytest.raises(LmstackError, match="dropout=1.5 is not allowed"):
        TokenizerConfig(dropout=1.5)
    with pytest.raises(LmstackError, match="unknown key 'vocabsize'"):
        train_tokenizer(texts=[corpus], vocabsize=100)
    with pytest.raises(LmstackError, match="sample_alpha applies to type='unigram' only"):
        TokenizerConfig(type="bpe", sample_alpha=0.1)
    with pytest.raises(LmstackError, match="training file not found: missing/file.txt"):
        train_tokenizer(["missing/file.txt"])
