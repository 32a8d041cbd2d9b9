"""`lmstack finetune`: supervised fine-tuning (full or any adapter method) from a FinetuneConfig recipe + flags.

Usage:
    lmstack finetune --method lora --data chat.jsonl --model BASE_DIR --out runs/sft --optim.lr 1e-3
    lmstack finetune --config recipes/finetune_lora.yaml --model BASE_DIR --data chat.jsonl
"""
from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.config import ConfigCommand


def _run(cfg: FinetuneConfig) -> dict:
    """Fine-tune a pretrained model on chat data (loss on assistant tokens only) and print the summary."""
    summary = finetune(cfg)
    keys = ("method", "steps", "trainable", "trainable_pct", "final_loss", "val_loss", "val_token_acc", "val_exact",
            "train_seconds")
    print({k: summary[k] for k in keys if k in summary})
    print(f"result: {summary['result']}")
    return summary


COMMANDS = ConfigCommand(FinetuneConfig, _run)
