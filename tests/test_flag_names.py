"""One flag name per concept across the training commands (issue 17 §5): pretrain, finetune and align nest the
loop, the optimizer and the schedule as the same TrainConfig / OptimizerConfig / ScheduleConfig, the model to start
from is --model, and the old names (align's flat --steps/--lr, --policy, finetune's --base) answer with the new one.

The concepts are read from the dataclasses themselves, so a field added later that spells a shared concept
outside its nested config fails here."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

from lmstack import cli
from lmstack.adapt.finetune import FinetuneConfig
from lmstack.align.config import RENAMED, TRAIN_FIELDS_USED, TRAIN_VALUES_OBEYED, AlignConfig
from lmstack.align.steps import Stepper
from lmstack.config import ConfigError, load_config
from lmstack.model.hf_io import save_model
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import train_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, lr_multiplier
from lmstack.train.pretrain import PretrainConfig

COMMANDS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "align": AlignConfig}
SHARED = {"train": TrainConfig, "optim": OptimizerConfig, "schedule": ScheduleConfig}
# "name" is every registry's selector (model.name, objective.name, optim.name): a word, not a concept
CONCEPTS = {f.name: group for group, cls in SHARED.items() for f in dataclasses.fields(cls) if f.name != "name"}


def leaf_paths(obj, prefix: str = "") -> list[str]:
    """Dotted paths of every non-dataclass field of a config instance (its flags without the dashes)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out += leaf_paths(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def test_training_concepts_have_one_flag_in_pretrain_finetune_and_align():
    for command, cls in COMMANDS.items():
        paths = leaf_paths(cls())
        for path in paths:  # a shared concept spelled anywhere but in its nested config is a second flag for it
            leaf = path.rsplit(".", 1)[-1]
            if leaf in CONCEPTS:
                assert path == f"{CONCEPTS[leaf]}.{leaf}", f"{command} spells {leaf} as --{path}"
        for leaf, group in CONCEPTS.items():  # and each command has all of them
            assert f"{group}.{leaf}" in paths, f"{command} lacks --{group}.{leaf}"
        flags = set(cli.command_parser(command)._option_string_actions)
        for concept in ("--train.steps", "--optim.lr", "--optim.weight_decay", "--schedule.warmup_steps",
                        "--train.seed", "--train.device", "--train.max_seconds"):
            assert concept in flags, f"lmstack {command} has no {concept}"
    # the model to start from: --model, a directory path, in the commands that load one (pretrain's is the
    # architecture, a ModelConfig, and stays)
    for command in ("finetune", "align"):
        field = {f.name: f for f in dataclasses.fields(COMMANDS[command])}["model"]
        assert field.type in (str, "str"), f"{command} --model must be a path"
        assert not {"base", "policy"} & {f.name for f in dataclasses.fields(COMMANDS[command])}


@pytest.mark.parametrize("argv,message", [
    (["align", "--steps", "5"], "align: --steps is now --train.steps"),
    (["align", "--lr", "1e-4"], "align: --lr is now --optim.lr"),
    (["align", "--warmup-steps", "3"], "align: --warmup_steps is now --schedule.warmup_steps"),
    (["align", "--max_seconds=9"], "align: --max_seconds is now --train.max_seconds"),
    (["align", "--policy", "runs/sft"], "align: --policy is now --model"),
    (["align", "--no-progress"], "align: --no_progress is now --no_train.progress"),
    (["finetune", "--base", "runs/tiny"], "finetune: --base is now --model"),
])
def test_old_flags_name_their_new_flag(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmstack: error: {message}"]


def test_every_renamed_key_names_a_real_flag():
    flags = set(cli.command_parser("align")._option_string_actions)
    for old, new in RENAMED.items():
        assert f"--{new}" in flags and f"--{old}" not in flags, (old, new)
    assert "--model" in set(cli.command_parser("finetune")._option_string_actions)


def test_old_keys_in_a_recipe_or_in_python_are_refused_with_the_new_name(tmp_path, capsys):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("method: dpo\nsteps: 5\n")
    assert cli.main(["align", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"lmstack: error: align: key 'steps' in {recipe} is now 'train.steps' (--steps is now --train.steps)"
    with pytest.raises(ConfigError, match="key 'steps' of AlignConfig is now 'train.steps'"):
        load_config(AlignConfig, recipe)
    ft = tmp_path / "ft.yaml"
    ft.write_text("base: runs/tiny\n")
    with pytest.raises(ConfigError, match="key 'base' of FinetuneConfig is now 'model'"):
        load_config(FinetuneConfig, ft)
    cfg = AlignConfig()
    with pytest.raises(ConfigError, match=r"AlignConfig.steps is now AlignConfig.train.steps"):
        cfg.steps = 5  # would otherwise be an attribute nothing reads
    recipe.write_text("method: dpo\ntrain: {steps: 5}\noptim: {lr: 0.001}\n")  # the new keys merge into defaults
    cfg = load_config(AlignConfig, recipe)
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.eval_every) == (5, 1e-3, 0.0, 50)


def _non_default(f: dataclasses.Field, default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    return {"precision": "bf16", "device": "cpu"}[f.name]


def test_align_refuses_every_train_knob_it_does_not_honour():
    default = TrainConfig()
    ignored = [f for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_FIELDS_USED]
    assert len(ignored) >= 15
    for f in ignored:
        value = _non_default(f, getattr(default, f.name))
        with pytest.raises(ConfigError, match=f"align does not use train.{f.name}"):
            AlignConfig(train={f.name: value})
    for name, values in TRAIN_VALUES_OBEYED.items():
        for value in values:
            assert getattr(AlignConfig(train={name: value}).train, name) == value
    for name in TRAIN_FIELDS_USED:  # the ones align reads take any valid value
        value = _non_default(next(f for f in dataclasses.fields(TrainConfig) if f.name == name),
                             getattr(default, name))
        assert getattr(AlignConfig(train={name: value}).train, name) == value


def test_align_keeps_its_defaults_in_python_and_on_the_command_line():
    from lmstack.align.commands import COMMANDS as ALIGN

    for cfg in (AlignConfig(), ALIGN.parse([], parser_class=cli.parser_class())):
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-5, 0.0)
        assert (cfg.train.steps, cfg.train.eval_every, cfg.train.log_every, cfg.train.clip_grad_norm) == \
            (200, 50, 10, 1.0)
        assert (cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio) == ("cosine", 10, 0.1)
    # the schedule is the one align had: linear warmup over 10 steps, then cosine to 10% at step 200
    cfg = AlignConfig()
    for step in (0, 5, 9, 10, 57, 150, 199):
        old = (step + 1) / 10 if step < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 190))
        assert lr_multiplier(cfg.schedule, step, cfg.train.steps) == pytest.approx(old, rel=1e-12)


def _tiny_model(vocab: int = 300) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                              max_seq_len=128))


@pytest.mark.parametrize("name", ["adamw", "lion", "muon", "adafactor"])
def test_every_optimizer_name_reaches_align(name):
    stepper = Stepper.from_config(_tiny_model(), AlignConfig(optim={"name": name, "lr": 1e-3}))
    expected = {"adamw": "AdamW", "lion": "Lion", "muon": "Muon", "adafactor": "Adafactor"}[name]
    assert type(stepper.optimizer).__name__ == expected


def test_align_cli_runs_with_the_new_flags(tmp_path):
    texts = [f"question {i}: is {i} even? answer: {'yes' if i % 2 == 0 else 'no'}" for i in range(200)]
    tok = train_tokenizer(texts=texts, type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    save_model(_tiny_model(tok.vocab_size), tmp_path / "sft", tokenizer=tok)
    rows = [{"prompt": f"is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
             "rejected": "no" if i % 2 == 0 else "yes"} for i in range(12)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    torch.set_num_threads(1)
    assert cli.main(["align", str(tmp_path / "sft"), "--method", "dpo", "--data", str(tmp_path / "prefs.jsonl"),
                     "--out", str(out), "--train.steps", "3", "--train.progress", "--no_train.progress",
                     "--optim.name", "lion", "--optim.lr", "1e-4", "--schedule.warmup-steps", "1",
                     "--train.threads", "1", "--batch_size", "2", "--max_len", "64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(tmp_path / "sft")
    assert (saved["train"]["steps"], saved["optim"]["name"], saved["optim"]["lr"]) == (3, "lion", 1e-4)
    assert saved["schedule"]["warmup_steps"] == 1 and saved["train"]["progress"] is False
