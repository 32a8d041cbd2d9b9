"""`lmstack align`: train a reward model or run offline preference optimisation from a policy directory.

    lmstack align --method rm  --model runs/sft/model --data prefs.jsonl --out runs/rm  --optim.lr 1e-4
    lmstack align --method dpo --model runs/sft/model --data prefs.jsonl --out runs/dpo --beta 0.1
    lmstack align --method dpo --model runs/sft/model --from-feedback feedback.db --out runs/dpo-fb   # users' flags
    lmstack align --method kto --model runs/sft/model --data kto.jsonl   --out runs/kto
    lmstack align --method grpo --model runs/sft/model --data world/chat/train.jsonl --kind arithmetic \
                  --reward math --group_size 8 --train.steps 40 --optim.lr 3e-4 --out runs/grpo
    lmstack align --method ppo|trpo|rloo|rft ...     # the same prompt data and reward
    lmstack align --method grpo ... --reward math=1,rm:runs/rm/model=0.5 --monitor math   # RM in the loop
    lmstack align --config recipe.yaml --train.steps 50

The loop, optimizer and schedule flags are pretrain's and finetune's (--train.*, --optim.*, --schedule.*);
the model to start from is --model (or the first word), as in every command.

Writes into --out: model/ (the aligned policy, or the reward model with its head), metrics.jsonl,
summary.json (held-out accuracy and margins, or held-out greedy reward for online methods, before and
after) and config.yaml. Skipped data rows are counted and reported.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from lmstack.align.config import ONLINE, AlignConfig
from lmstack.align.logprobs import check_same_tokenizer
from lmstack.align.preference_data import Pair, load_preferences, load_unpaired
from lmstack.align.rollout import load_prompts
from lmstack.config import ConfigCommand, atomic_write_text, save_config
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.side_files import keep_source_files
from lmstack.model.load_guard import set_max_model_gib
from lmstack.model.vocab import check_vocab
from lmstack.runtime.device import resolve_device
from lmstack.safety.feedback import preference_pairs
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer


def _load_policy(cfg: AlignConfig, device):
    if not cfg.model:
        raise LmstackError("--model is required: the model directory to align (with its tokenizer.json)")
    if not Path(cfg.model).is_dir():
        raise LmstackError(f"--model {cfg.model} is not a model directory")

    # lazy=False: weights are trained in place, so they must be real tensors, not views of the mapped file
    model, tok = load_model(cfg.model, lazy=False, device=device), load_tokenizer(cfg.model)
    check_vocab(model, tok, model_path=cfg.model, tokenizer_path=cfg.model, what="align")
    return model, tok


def _save_policy(policy, tok, cfg: AlignConfig, out: Path) -> None:
    """out/model in HF layout; the tokenizer, template and generation_config.json of the directory the policy came
    from stay as they were (its eos list and sampling defaults: model/side_files.py)."""
    keep_source_files(cfg.model, save_model(policy, out / "model", tokenizer=tok), policy.config)


def _feedback_data(cfg: AlignConfig, log=print):
    """(train pairs, validation pairs, skipped flags, what was built) from a feedback database."""
    # lazy: heavy, pulls torch.distributed.tensor (via train.optim): +0.6 s on `lmstack align --help`
    from lmstack.align.steps import split_holdout

    # Completions prompts are raw text, chat prompts go through the template: read the ones this run renders alike.
    built = preference_pairs(cfg.from_feedback, endpoint="completions" if cfg.template == "plain" else "chat")
    log(built.report())
    if not built.pairs:
        raise LmstackError(f"--from-feedback {cfg.from_feedback}: no preference pairs could be built from its flags "
                           f"({built.summary()['skipped']}); flag replies down with a correction or as unsafe")
    if cfg.val_data:
        val = load_preferences(cfg.val_data)
        log("validation: " + val.report())
        return built.pairs, val.rows, built.summary()["skipped_total"], built
    train, val = split_holdout(built.pairs, cfg.val_fraction, cfg.train.seed)
    return train, val, built.summary()["skipped_total"], built


def _load_data(cfg: AlignConfig, log=print):
    if not cfg.data:
        raise LmstackError("--data is required: a preference JSONL (prompt, chosen, rejected), or --from-feedback DB")
    # lazy: heavy, pulls torch.distributed.tensor (via train.optim): +0.6 s on `lmstack align --help`
    from lmstack.align.steps import split_holdout

    split = cfg.split or None
    paired = cfg.method != "kto"
    try:
        loaded = load_preferences(cfg.data, split)
    except LmstackError:
        if paired:
            raise
        loaded = load_unpaired(cfg.data, split)  # KTO also reads (prompt, completion, label) rows
    log(loaded.report())
    rows = loaded.rows
    if cfg.val_data:
        val = load_preferences(cfg.val_data)
        log("validation: " + val.report())
        return rows, val.rows, loaded.n_skipped
    train, val = split_holdout(rows, cfg.val_fraction, cfg.train.seed)

    return train, [p for p in val if isinstance(p, Pair)], loaded.n_skipped


# online method -> "module:class" (imported when used)
ONLINE_TRAINERS = {"grpo": "lmstack.align.grpo:GroupTrainer", "rloo": "lmstack.align.grpo:GroupTrainer",
                   "ppo": "lmstack.align.ppo:PPOTrainer", "trpo": "lmstack.align.trpo:TRPOTrainer",
                   "rft": "lmstack.align.rft:RejectionSamplingTrainer"}


def online_trainer_class(method: str):
    module, _, name = ONLINE_TRAINERS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def _load_reference(cfg: AlignConfig, tok, device):
    if not cfg.reference_path:
        return None

    check_same_tokenizer(tok, load_tokenizer(cfg.reference_path), "policy", "reference")
    return load_model(cfg.reference_path, lazy=False, device=device)


def _online(cfg: AlignConfig, device, out: Path) -> dict:
    """ppo / grpo / rloo / rft: prompt records in, reward from cfg.reward, held-out greedy reward out."""
    # lazy: heavy, pull torch.distributed.tensor (via train.optim): +0.6 s on `lmstack align --help`
    from lmstack.align.rewards.spec import reward_from_spec
    from lmstack.align.steps import split_holdout

    if not cfg.data:
        raise LmstackError("--data is required: a JSONL of prompt records (prompt or messages, plus what the "
                           "reward checks, e.g. answer)")
    loaded = load_prompts(cfg.data, cfg.split or None, cfg.kind or None)
    print(loaded.report())
    if cfg.val_data:
        val_loaded = load_prompts(cfg.val_data, None, cfg.kind or None)
        print("validation: " + val_loaded.report())
        train, val = loaded.records, val_loaded.records
    else:
        train, val = split_holdout(loaded.records, cfg.val_fraction, cfg.train.seed)
    policy, tok = _load_policy(cfg, device)
    reference = _load_reference(cfg, tok, device)
    reward = reward_from_spec(cfg.reward, device=str(device))
    save_config(cfg, out / "config.yaml")
    trainer = online_trainer_class(cfg.method)(policy, tok, cfg, reward, reference=reference)
    summary = trainer.fit(train, val, out_dir=out)

    _save_policy(trainer.policy, tok, cfg, out)
    summary["skipped_rows"] = loaded.n_skipped
    return summary


def align(cfg: AlignConfig) -> dict:
    """Train a reward model (rm), align a policy offline (dpo, cdpo, ipo, kto) or online (ppo, grpo, rloo, rft);
    print held-out accuracy (or held-out greedy reward) before and after."""

    set_threads(cfg.train.threads)  # 0 = auto: fits a shared machine instead of one thread per core
    set_max_model_gib(cfg.max_model_gib)  # load_model checks it before allocating the policy or reference
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.reference == "adapters":
        raise LmstackError("reference='adapters' needs a policy with adapters attached, which a plain model "
                           "directory has not; the CLI supports reference=copy or precomputed (use the Python "
                           "API with lmstack.adapt for LoRA + adapters-off reference)")
    if cfg.method in ONLINE:
        summary = _online(cfg, device, out)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "evals")}, indent=2))
        print(f"wrote {out / 'model'}")
        return summary
    built = None
    if cfg.from_feedback:
        train, val, skipped, built = _feedback_data(cfg)
    else:
        train, val, skipped = _load_data(cfg)
    policy, tok = _load_policy(cfg, device)
    save_config(cfg, out / "config.yaml")
    if cfg.method == "rm":
        # lazy: heavy, pulls torch.distributed.tensor (via train.optim): +0.6 s on `lmstack align --help`
        from lmstack.align.reward_model import RewardModel, train_reward_model

        rm = RewardModel(policy, seed=cfg.train.seed)
        summary = train_reward_model(rm, tok, train, val, cfg, out_dir=out)
        rm.save(out / "model", tok, cfg.template)
    else:
        reference = ref_tok = None
        if cfg.reference_path:
            ref_tok = load_tokenizer(cfg.reference_path)
            reference = load_model(cfg.reference_path, lazy=False, device=device)
        # lazy: heavy, pulls torch.distributed.tensor (via train.optim): +0.6 s on `lmstack align --help`
        from lmstack.align.dpo import PreferenceTrainer

        trainer = PreferenceTrainer(policy, tok, cfg, reference=reference, reference_tokenizer=ref_tok)
        summary = trainer.fit(train, val, out_dir=out)

        _save_policy(policy, tok, cfg, out)
    summary["skipped_rows"] = skipped
    if built is not None:
        summary["feedback"] = {"db": cfg.from_feedback, **built.summary(), "train_pairs": len(train),
                               "val_pairs": len(val)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    print(f"wrote {out / 'model'}")
    return summary


COMMANDS = ConfigCommand(AlignConfig, align)
