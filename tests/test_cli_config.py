"""The CLI, a recipe YAML and the Python API give one config for the same overrides.

Regression: jsonargparse took each nested default from a default *instance*, whose derived fields were
already resolved, so `lmstack pretrain --model.d_model 128` kept head_dim 16 and d_ff 192 from the default
d_model 64, and the nanoGPT recipe trained a 345k-parameter model through the CLI but a 0.8M one in Python.
"""
from pathlib import Path

import pytest
import yaml

from lmstack.adapt.commands import COMMANDS as FINETUNE
from lmstack.adapt.finetune import FinetuneConfig
from lmstack.align.commands import COMMANDS as ALIGN
from lmstack.align.config import AlignConfig
from lmstack.config import from_dict, load_config, to_dict
from lmstack.model.config import ModelConfig
from lmstack.stages.speedrun import COMMANDS as SPEEDRUN
from lmstack.stages.speedrun import SpeedrunConfig
from lmstack.train.commands import COMMANDS as PRETRAIN
from lmstack.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def flags(overrides: dict, prefix: str = "") -> list[str]:
    """{"model": {"d_model": 128}} -> ["--model.d_model", "128"]."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            out += flags(value, f"{prefix}{key}.")
        else:
            out += [f"--{prefix}{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


CASES = [
    (PRETRAIN, PretrainConfig, {"model": {"d_model": 128}}),
    (PRETRAIN, PretrainConfig, {"model": {"d_model": 96, "n_heads": 8, "mlp": "gelu", "max_seq_len": 64}}),
    (PRETRAIN, PretrainConfig, {"model": {"d_model": 128, "n_experts": 4, "moe_top_k": 1}, "train": {"steps": 7}}),
    (PRETRAIN, PretrainConfig, {"model": {"n_heads": 2, "rope_scaling": "yarn", "rope_factor": 2.0}}),
    (SPEEDRUN, SpeedrunConfig, {"pretrain": {"model": {"d_model": 512}}}),
    (SPEEDRUN, SpeedrunConfig, {"pretrain": {"model": {"n_heads": 8, "n_layers": 2}, "train": {"max_seconds": 5.0}},
                                "sft_seconds": 3.0}),
    (FINETUNE, FinetuneConfig, {"method": "lora", "train": {"steps": 5}, "optim": {"lr": 0.01}}),
    (ALIGN, AlignConfig, {"method": "ipo", "beta": 0.2, "train": {"steps": 3, "threads": 1}, "optim": {"lr": 0.001},
                          "schedule": {"warmup_steps": 2}}),
]


@pytest.mark.parametrize("command,cls,overrides", CASES)
def test_cli_flags_yaml_and_python_api_give_one_config(tmp_path, capsys, command, cls, overrides):
    python = to_dict(from_dict(cls, overrides))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(overrides), encoding="utf-8")
    assert to_dict(load_config(cls, path)) == python                      # recipe YAML read in Python
    assert to_dict(command.parse(flags(overrides))) == python              # CLI flags
    assert to_dict(command.parse(["--config", str(path)])) == python       # CLI --config recipe
    assert command(flags(overrides) + ["--print_config"], "lmstack x") is None
    assert yaml.safe_load(capsys.readouterr().out) == python               # what --print_config shows
    # and the model really is re-derived from the overrides, as the constructor derives it
    cfg = from_dict(cls, overrides)
    model = getattr(cfg, "model", None) or getattr(getattr(cfg, "pretrain", None), "model", None)
    if model is not None:
        assert model.head_dim == model.d_model // model.n_heads
        want_ff = ModelConfig(d_model=model.d_model, n_heads=model.n_heads, mlp=model.mlp).d_ff
        assert model.d_ff == want_ff and model.moe_d_ff == want_ff
        assert model.rope_original_max_seq_len == model.max_seq_len


def test_speedrun_override_keeps_the_speedrun_model_and_rederives_its_sizes():
    cfg = SPEEDRUN.parse(["--pretrain.model.d_model", "512"])
    m = cfg.pretrain.model
    assert (m.d_model, m.head_dim, m.d_ff) == (512, 128, 1376)          # was 64 and 704 (d_model 256's)
    assert (m.n_kv_heads, m.qk_norm, m.vocab_size) == (2, True, 4096)     # the speedrun's explicit choices stay
    assert cfg.pretrain.train.max_seconds == 420                          # the other defaults are the speedrun's


def test_shakespeare_recipe_through_the_cli_is_the_benchmarks_model():
    from lmstack.model.transformer import Transformer

    recipe = ROOT / "recipes" / "shakespeare_char.yaml"
    cli = PRETRAIN.parse(["--config", str(recipe)])
    assert to_dict(cli) == to_dict(load_config(PretrainConfig, recipe))
    assert (cli.model.head_dim, cli.model.d_ff) == (32, 512)
    assert Transformer(cli.model).num_parameters() == 804_096             # about 0.8M, not 345k


def test_explicit_derived_values_are_kept_everywhere(tmp_path):
    overrides = {"model": {"d_model": 128, "head_dim": 16, "d_ff": 200, "n_kv_heads": 2}}
    for cfg in (from_dict(PretrainConfig, overrides), PRETRAIN.parse(flags(overrides))):
        assert (cfg.model.head_dim, cfg.model.d_ff, cfg.model.n_kv_heads, cfg.model.moe_d_ff) == (16, 200, 2, 200)
    # a saved, resolved config loads back as itself
    saved = to_dict(from_dict(PretrainConfig, overrides))
    assert to_dict(from_dict(PretrainConfig, saved)) == saved


def test_python_constructors_are_unchanged():
    cfg = ModelConfig(d_model=128)
    assert (cfg.head_dim, cfg.d_ff, cfg.n_kv_heads) == (32, 352, 4)
    assert ModelConfig(d_model=128, mlp="gelu").d_ff == 512
    # replace() keeps its dataclasses meaning (resolved fields are explicit there), as before
    assert cfg.replace(d_model=256).head_dim == 32
    assert "_derived" not in vars(cfg) and cfg == ModelConfig(d_model=128)
