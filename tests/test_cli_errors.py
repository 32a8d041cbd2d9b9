"""Bad command lines print one `lmstack: error: ...` line (with a did-you-mean) and exit 2; --help keeps the
full usage; a stage that is not built yet has no row in the CLI table and is refused like any unknown stage;
flags may use dashes or underscores."""
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


@pytest.mark.parametrize("stage", ["quantize", "rag"])
def test_stages_that_are_not_built_are_unknown_stages_in_one_line(capsys, stage):
    if stage in STAGES:  # the table routes only to modules that exist (tests/test_cli_table.py)
        pytest.skip(f"{stage} is built and routed now")
    line = one_error_line(capsys, [stage, "--anything"])
    assert f"unknown stage {stage!r}" in line and "speedrun" in line  # it names the stages there are
    main(["--help"])
    assert f"\n  {stage} " not in capsys.readouterr().out  # the overview lists only routed stages


def test_flags_accept_dashes_and_underscores(capsys):
    from lmstack.cli import run

    run(["pretrain", "--model.d-model", "96", "--print-config"])
    a = capsys.readouterr().out
    run(["pretrain", "--model.d_model", "96", "--print_config"])
    assert a == capsys.readouterr().out and "d_model: 96" in a


def test_every_compute_stage_has_a_threads_flag():
    """generate, eval, align (and chat, serve) had none; pretrain/finetune/align have train.threads."""
    for stage in ("generate", "eval", "chat", "serve"):
        assert "threads" in inspect.signature(_load_stage(stage)).parameters, stage
    assert "threads" in inspect.signature(_load_stage("model")["generate"]).parameters
    assert hasattr(_load_stage("speedrun").config(), "threads")
    for stage in ("pretrain", "finetune", "align"):
        assert hasattr(_load_stage(stage).config().train, "threads")
