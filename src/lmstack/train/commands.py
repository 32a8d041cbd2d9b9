"""`lmstack pretrain`: train a model from a recipe (a PretrainConfig YAML) plus dotted overrides.

Usage:
    lmstack pretrain --config recipes/shakespeare_char.yaml --train.steps 500
    torchrun --nproc_per_node 2 -m lmstack.cli pretrain --config recipes/x.yaml --distributed.strategy fsdp2
"""
from lmstack.config import ConfigCommand
from lmstack.train.distributed import is_main_process
from lmstack.train.pretrain import PretrainConfig, pretrain


def _run(cfg: PretrainConfig) -> dict:
    """Train a model from a recipe (PretrainConfig) and print the summary."""

    summary = pretrain(cfg)
    if is_main_process():
        print({k: v for k, v in summary.items() if k != "checkpoint"})
        print(f"checkpoint: {summary.get('checkpoint')}")
    return summary


COMMANDS = ConfigCommand(PretrainConfig, _run)
