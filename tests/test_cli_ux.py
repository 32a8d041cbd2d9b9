"""The CLI a user expects (issue 17 §5): dashed flags, defaults in --help, bare booleans, repeated list flags,
KEY=VALUE maps, a positional model, one flag name per concept, --version, and a clear refusal of .gguf files.

Parsers are built exactly as a run builds them (lmstack.cli.command_parser) and read, not run, so these
tests stay fast."""
from __future__ import annotations

import json

from jsonargparse import CLI
import pytest

import lmstack
from lmstack import cli


def _routes() -> list[tuple[str, ...]]:
    out = []
    for stage in cli.STAGES:
        commands = cli._load_stage(stage)
        out += [(stage, a) for a in commands] if isinstance(commands, dict) else [(stage,)]
    return out


ROUTES = _routes()
PARSERS = {}


def parser(*route: str):
    if route not in PARSERS:
        PARSERS[route] = cli.command_parser(*route)
    return PARSERS[route]


def parse(*argv: str):
    """Namespace that `lmstack argv...` would run with (the route is the leading words that name it)."""
    route = next(r for r in sorted(ROUTES, key=len, reverse=True) if tuple(argv[:len(r)]) == r)
    return parser(*route).parse_args(cli._dashes_to_underscores(list(argv[len(route):])))


def _flags(p) -> list[str]:
    return sorted(o for a in p._actions for o in a.option_strings if o.startswith("--") and not o.endswith("+"))


@pytest.mark.parametrize("route", ROUTES, ids=" ".join)
def test_every_flag_of_every_command_has_a_dashed_spelling_that_means_it(route):
    p = parser(*route)
    underscored = [f for f in _flags(p) if "_" in f]
    for flag in underscored:
        assert cli._dashes_to_underscores([flag.replace("_", "-") + "=x"]) == [flag + "=x"]
        assert flag in p._option_string_actions
    assert underscored or route in {("data", "verify"), ("report",)}, f"{route} has no multi-word flag to check"


def test_the_issue_command_tokenizer_train_vocab_size_runs(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the quick brown fox\n" * 40, encoding="utf-8")
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                     "--min-frequency", "1", "--out", str(tmp_path / "tok")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vocab_size"] <= 300 and (tmp_path / "tok" / "tokenizer.json").is_file()


def test_dashed_and_underscored_flags_parse_to_the_same_values():
    a = parse("generate", "--model", "d", "--max-tokens", "7", "--top-p", "0.5", "--ignore-eos", "true")
    b = parse("generate", "--model", "d", "--max_tokens", "7", "--top_p", "0.5", "--ignore_eos", "true")
    assert a == b and a.max_tokens == 7 and a.ignore_eos is True
    c = parse("pretrain", "--train.max-seconds", "3", "--optim.weight-decay", "0.2")
    assert c.train.max_seconds == 3 and c.optim.weight_decay == 0.2


@pytest.mark.parametrize("route", ROUTES, ids=" ".join)
def test_help_lists_every_optional_flag_with_its_default(route):
    p = parser(*route)
    typed = [a for a in p._actions if type(a).__name__ == "ActionTypeHint" and a.option_strings and not a.required]
    text = p.format_help()
    assert text.count("default:") >= len(typed), f"{' '.join(route)} --help shows fewer defaults than flags"


def test_help_shows_the_actual_default_values(capsys):
    with pytest.raises(SystemExit):
        cli.run(["tokenizer", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "total vocabulary size including special tokens. (type: int, default: 8192)" in text


def test_bare_booleans_are_true_and_no_prefixed_ones_false():
    assert parse("generate", "--model", "d", "--chat").chat is True
    assert parse("generate", "--model", "d", "--chat", "--ignore-eos").ignore_eos is True
    assert parse("generate", "--model", "d", "--chat", "false").chat is False
    assert parse("generate", "--model", "d", "--no-chat").chat is False
    assert parse("serve", "--model", "d", "--no-enable-prefix-caching").enable_prefix_caching is False
    assert parse("pretrain", "--train.compile").train.compile is True
    assert parse("eval", "--model", "d", "--tasks", "x", "--chat-template").chat_template is True


def test_list_flags_repeat_and_append_and_a_bracketed_value_is_a_whole_list():
    assert parse("generate", "--model", "d", "--stop", ".", "--stop", ",").stop == [".", ","]
    assert parse("generate", "--model", "d", "--stop=.").stop == ["."]
    assert parse("generate", "--model", "d", "--stop", "[a, b]", "--stop", "c").stop == ["a", "b", "c"]
    assert parse("generate", "--model", "d", "--prompt-ids", "5", "--prompt-ids", "6").prompt_ids == [5, 6]


def test_key_value_flags_work_as_lists_and_as_maps():
    assert parse("serve", "--model", "d", "--adapters", "qa=runs/qa", "--adapters", "b=x").adapters == \
        ["qa=runs/qa", "b=x"]

    assert parse("finetune", "--mix", "world_qa=0.5", "--mix", "code=2").mix == {"world_qa": 0.5, "code": 2.0}
    assert parse("finetune", "--mix", '{"a": 1}').mix == {"a": 1.0}  # a whole mapping still works
    assert parse("pretrain", "--data.adaptive.domains", "web=data/web").data.adaptive.domains == {"web": "data/web"}

    def f(weights: dict[str, float] | None = None, names: dict[str, str] | None = None):
        return weights, names

    got = CLI(f, args=["--weights", "a=0.5", "--weights=b=2", "--names", "x=y=z"], parser_class=cli.parser_class())
    assert got == ({"a": 0.5, "b": 2.0}, {"x": "y=z"})


@pytest.mark.parametrize("stage", ["generate", "serve", "chat", "eval"])
def test_the_model_may_be_positional(stage):
    extra = ["--tasks", "x"] if stage == "eval" else []
    assert parse(stage, "runs/tiny", *extra).model == "runs/tiny"
    assert parse(stage, "--model", "runs/tiny", *extra).model == "runs/tiny"


def test_the_starting_model_of_finetune_and_align_may_be_positional():
    assert parse("finetune", "runs/tiny", "--method", "lora").model == "runs/tiny"
    assert parse("align", "runs/sft", "--method", "dpo").model == "runs/sft"


def test_a_positional_word_is_not_taken_as_a_model_where_model_is_a_config_group(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "runs/tiny"])
    assert "unrecognized arguments: runs/tiny" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmstack {lmstack.__version__}"


GGUF_COMMANDS = [
    ["generate", "--model", "m.gguf", "--prompt", "hi"],
    ["generate", "m.gguf", "--prompt", "hi"],
    ["generate", "--model", "d", "--prompt", "hi", "--speculative", "draft", "--draft-model", "m.gguf"],
    ["serve", "m.gguf"],
    ["chat", "--model=m.GGUF"],
    ["eval", "--model", "m.gguf", "--tasks", "arc_easy"],
    ["model", "info", "--model", "m.gguf"],
    ["model", "generate", "--model", "m.gguf", "--prompt", "x"],
    ["model", "convert", "--src", "m.gguf", "--out", "o"],
    ["finetune", "--model", "m.gguf"],
    ["align", "--model", "m.gguf"],
    ["align", "m.gguf"],
    ["export", "--model", "m.gguf", "--format", "onnx", "--out", "o.onnx"],
    ["quantize", "--model", "m.gguf", "--method", "int8", "--out", "o"],
    ["prune", "--model", "m.gguf", "--method", "magnitude", "--out", "o"],
    ["distill", "--teacher", "m.gguf", "--student_preset", "llama-tiny", "--data", "d.jsonl", "--out", "o"],
    ["rag", "ask", "where?", "--model", "m.gguf", "--index", "idx"],
    ["rag", "check", "--text", "x", "--judge", "lm", "--model", "m.gguf", "--index", "idx"],
    ["rag", "eval", "--model", "m.gguf", "--index", "idx"],
    ["explain", "--model", "m.gguf", "--prompt", "hi"],
    ["redteam", "--model", "m.gguf"],
    ["audit", "--model", "m.gguf"],
    ["mm", "caption", "pic.png", "--model", "m.gguf"],
    ["mm", "zero-shot", "pic.png", "--model", "m.gguf", "--labels", "a,b"],
    ["mm", "generate-image", "--prompt", "a red circle", "--model", "m.gguf"],
    ["mm", "transcribe", "a.wav", "--model", "m.gguf"],
    ["mm", "speak", "hello", "--model", "m.gguf"],
]


@pytest.mark.parametrize("argv", GGUF_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_gguf_model_is_one_clear_line_in_every_command_that_takes_a_model(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmstack: error: GGUF models are not supported yet:")
    assert "m.gguf" in err.lower() and "Traceback" not in err


def test_every_command_with_a_model_flag_is_covered_by_the_gguf_test():
    covered = {tuple(a[:2]) if a[0] in ("model", "rag", "mm") else (a[0],) for a in GGUF_COMMANDS}
    for route in ROUTES:
        names = {f.rsplit(".", 1)[-1].lstrip("-") for f in _flags(parser(*route))}
        takes_model = any(f"--{n}" in parser(*route)._option_string_actions and n in names
                          for n in cli.MODEL_PATH_FLAGS - {"model"})
        takes_model |= cli._typehint(parser(*route)._option_string_actions.get("--model")) is str
        assert not takes_model or route in covered, f"{' '.join(route)} takes a model but has no .gguf case"


def test_a_gguf_word_that_is_not_a_model_is_left_alone():
    assert parse("generate", "--model", "d", "--prompt", "what is x.gguf").prompt == "what is x.gguf"


# One flag name per concept, checked over every command's parser: each concept's other spellings
# (what peers or our own older flags called it) appear in no command.
CONCEPTS = {
    "--max_tokens": ["--max_new_tokens", "--max_gen_tokens", "--max_length_new", "--num_tokens"],
    "--model": ["--model_path", "--model_dir", "--model_name_or_path", "--checkpoint"],
    "--tokenizer": ["--tokenizer_path", "--tokenizer_dir", "--tok"],
    "--threads": ["--num_threads", "--n_threads", "--torch_threads"],
    "--seed": ["--random_seed", "--rng_seed"],
    "--out": ["--output", "--output_dir", "--out_dir", "--save_dir"],
    "--device": ["--devices", "--accelerator"],
    "--json_output": ["--json", "--as_json"],
    "--max_model_gib": ["--memory_limit_gib", "--max_gib"],
}


@pytest.mark.parametrize("route", ROUTES, ids=" ".join)
def test_one_flag_name_per_concept_across_commands(route):
    flags = {f.rsplit(".", 1)[-1] for f in _flags(parser(*route))}
    flags = {"--" + f.lstrip("-") for f in flags}
    for concept, others in CONCEPTS.items():
        clash = flags & set(others)
        assert not clash, f"`lmstack {' '.join(route)}` spells {concept} as {sorted(clash)}"


def test_action_names_take_dashes_or_underscores(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(["data", "train_classifier", "--help"])
    assert e.value.code == 0 and "usage: lmstack data train-classifier" in capsys.readouterr().out


def test_a_parser_built_outside_the_cli_entry_point_still_takes_the_habits():
    # ConfigCommand.parse with our parser class (the path stages and tests use) sees dashed and bare flags too
    from lmstack.train.commands import COMMANDS

    cfg = COMMANDS.parse(["--train.max-seconds", "2", "--train.compile"], parser_class=cli.parser_class())
    assert cfg.train.max_seconds == 2 and cfg.train.compile is True


def test_the_loaders_refuse_a_gguf_file_with_the_same_message(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(lmstack.errors.LmstackError, match="GGUF models are not supported yet: .*m.gguf"):
        lmstack.load_model(gguf)
