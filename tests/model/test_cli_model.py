import json

from lmstack.cli import main


def test_model_info_init_generate_convert(tmp_path, capsys):
    assert main(["model", "info", "--preset", "mixtral-tiny"]) == 0
    out = capsys.readouterr().out
    assert "active parameters per token" in out and "2 of 4 experts" in out
    assert main(["model", "init", "--preset", "qwen2-tiny", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"
    assert main(["model", "info", "--model", str(tmp_path / "m"), "--json_output", "true"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["total_params"] > 0
    assert main(["model", "generate", "--model", str(tmp_path / "m"), "--prompt_ids", "[1, 2, 3]",
                 "--max_tokens", "5"]) == 0
    assert "5 tokens" in capsys.readouterr().out
    assert main(["model", "convert", "--src", str(tmp_path / "m"), "--out", str(tmp_path / "c")]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["model", "info", "--preset", "llama-enormous"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: unknown preset") and "Traceback" not in err
    assert main(["model", "generate", "--model", str(tmp_path), "--prompt_ids", "[1]"]) == 2
    assert "no config.json" in capsys.readouterr().err
