"""`lmstack generate` end to end on a saved tiny model."""
import json

import pytest

import lmstack
from lmstack.cli import main

from infer_helpers import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("m")
    lmstack.save_model(tiny_model(tok.vocab_size), d, tokenizer=tok)
    return d


def test_generate_command(model_dir, capsys, tmp_path):
    assert main(["generate", "--model", str(model_dir), "--prompt", "The first", "--max_tokens", "5",
                 "--json_output", "true"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(rec["completions"][0]["token_ids"]) <= 5 and rec["prompt"] == "The first"
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n\nthree\n")
    assert main(["generate", "--model", str(model_dir), "--prompts_file", str(f), "--max_tokens", "3",
                 "--regex", "[0-9]{2}", "--temperature", "1.0", "--seed", "1", "--json_output", "true"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 3 and all(len(r["completions"][0]["text"]) == 2 for r in lines)
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--chat", "true", "--max_tokens", "3",
                 "--speculative", "ngram"]) == 0
    assert "spec acceptance" in capsys.readouterr().out


def test_generate_command_errors(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top_p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
