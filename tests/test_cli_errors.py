"""Bad command lines print one `lmstack: error: ...` line (with a did-you-mean) and exit 2; --help keeps the
full usage; stages that are not built yet say so in one line; flags may use dashes or underscores."""
import inspect

import pytest

from lmstack.cli import STAGES, _load_stage, main


def one_error_line(capsys, argv, code=2):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmstack: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,suggestion", [
    (["pretrain", "--model.d_modle", "8"], "did you mean --model.d_model?"),
    (["pretrain", "--train.stesp=3"], "did you mean --train.steps?"),
    (["generate", "--modle", "x"], "did you mean --model?"),
    (["model", "init", "--prest", "x"], "did you mean --preset?"),
    (["pretrian"], "did you mean pretrain?"),
    (["model", "intt"], "did you mean init?"),
])
def test_a_bad_flag_stage_or_action_is_one_line_with_a_suggestion(capsys, argv, suggestion):
    line = one_error_line(capsys, argv)
    assert suggestion in line and "usage" not in line


def test_a_bad_value_is_one_line_naming_the_key(capsys):
    line = one_error_line(capsys, ["pretrain", "--train.steps", "abc"])
    assert "train.steps" in line and "abc" in line
    line = one_error_line(capsys, ["align", "--method", "dpx"])
    assert "--method='dpx' is not allowed" in line and "kto" in line and "did you mean dpo?" in line
    # a value the config itself refuses (after parsing) is one line too
    assert main(["pretrain", "--model.d_model", "100", "--model.n_heads", "3", "--print_config"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "d_model=100 must be divisible by n_heads=3" in lines[0]


def test_help_keeps_the_full_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.d_model" in out and "--train.threads" in out and out.count("\n") > 20


@pytest.mark.parametrize("stage", [s for s in STAGES if _load_stage(s) is None] or ["quantize"])
def test_stages_that_are_not_built_say_so_in_one_line(capsys, stage):
    if _load_stage(stage) is not None:
        pytest.skip(f"{stage} is built now")
    assert main([stage, "--anything"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and f"the '{stage}' stage is not built yet" in lines[0]
    assert lines[0].startswith("lmstack: error: ")
    main(["--help"])
    assert f"{stage}" in capsys.readouterr().out  # the overview lists it as not built yet


def test_flags_accept_dashes_and_underscores(capsys):
    from lmstack.cli import run

    run(["pretrain", "--model.d-model", "96", "--print-config"])
    a = capsys.readouterr().out
    run(["pretrain", "--model.d_model", "96", "--print_config"])
    assert a == capsys.readouterr().out and "d_model: 96" in a


def test_every_compute_stage_has_a_threads_flag():
    """generate, eval, align (and chat, serve) had none; pretrain/finetune have train.threads."""
    for stage in ("generate", "eval", "chat", "serve"):
        assert "threads" in inspect.signature(_load_stage(stage)).parameters, stage
    assert "threads" in inspect.signature(_load_stage("model")["generate"]).parameters
    assert hasattr(_load_stage("align").config(), "threads")
    assert hasattr(_load_stage("speedrun").config(), "threads")
    for stage in ("pretrain", "finetune"):
        assert hasattr(_load_stage(stage).config().train, "threads")
