"""`lmstack finetune`: supervised fine-tuning of a pretrained model on chat data, with any adapter method.

SFT is a data and loss-mask change on the pretraining loop: the same Trainer (accumulation, clipping, spike
guard, EMA, metrics, progress bar, exact resume) runs over packed chat rows whose loss covers only the
assistant tokens (sft.py). The method -- full fine-tuning or one of lmstack.adapt.METHODS (lora, dora, qlora,
prefix, prompt, adapter, ia3, ...) -- is applied to the loaded base with get_peft_model, and the optimizer
sees only the parameters that train. Checkpoints hold just those parameters (an adapter run does not copy
the frozen base at every save).

The run directory gets config.yaml (the resolved config), data.json (rows kept / skipped / truncated,
packing), metrics.jsonl, loss.png, checkpoints/, summary.json and the result:
  model/     method "full": the whole model in HF layout, with tokenizer.json (lmstack.load_model reads it)
  adapter/   lora / dora / qlora: lmstack.adapt.save_adapter's files (PEFT layout: adapter_config.json +
             adapter_model.safetensors), applied by lmstack.adapt.apply_adapter, served by `lmstack chat --adapter`;
             other methods: lmstack_adapter.json + lmstack_adapter.safetensors (their trainable tensors), which
             load_trainable / load_result put back onto the base

Usage:
    lmstack finetune --method lora --data chat.jsonl --model runs/x/pretrain/checkpoints/step_00002000/model \
        --out runs/sft --train.steps 300 --optim.lr 1e-3
    lmstack finetune --dp.epsilon 8 --dp.max_grad_norm 1.0 --data chat.jsonl --model base/ --out runs/dp   # DP-SGD
    from lmstack.adapt.finetune import FinetuneConfig, finetune
    summary = finetune(FinetuneConfig(method="full", data="chat.jsonl", model="base/", out="runs/sft"))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import random
from typing import Any, Literal

from safetensors.torch import save_file
import torch

from lmstack.adapt.config import METHOD_NAMES, AdapterConfig
from lmstack.adapt.curriculum import CURRICULA, order_examples
from lmstack.adapt.mixing import group_by_task, mix_tasks
from lmstack.adapt.sft import (PACKERS, SFTExample, SFTLoader, SFTObjective, describe, encode_rows, pack_examples,
                               read_chat_jsonl, score_examples)
from lmstack.config import ConfigError, atomic_write_text, save_config, to_dict
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.side_files import keep_source_files
from lmstack.model.load_guard import load_safetensors, read_json, set_max_model_gib
from lmstack.model.vocab import check_vocab
from lmstack.runtime.device import resolve_device
from lmstack.runtime.validation import check_choice
from lmstack.safety.dp import DPConfig, DPTrainerMixin, finish_dp, start_dp
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.core import has_tokenizer
from lmstack.train.averaging import swapped
from lmstack.train.checkpoint import MANIFEST, CheckpointManager, config_differences
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import LogConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier
from lmstack.train.state_io import load_tree, save_tree
from lmstack.train.trainer import Trainer


# Methods that cannot train on packed rows, and why (the run switches packing off for them).
UNPACKED_METHODS = {
    "prefix": "every packed conversation would need its own learned prefix in front of it",
    "prompt": "every packed conversation would need its own soft prompt in front of it",
}


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, eval_every=100, eval_batches=8, log_every=10, keep_checkpoints=2)


@dataclass
class FinetuneConfig:
    renamed_keys = {"base": "model"}  # a class attribute, not a field: lmstack.config refuses --base naming --model
    method: str = "full"
    """full | lora | dora | qlora | prefix | prompt | adapter | ia3 | hyper | sparse (it sets adapter.method)."""
    data: str = ""
    """Chat JSONL: one {"messages": [{"role", "content"}, ...]} object per line (extra keys are kept as metadata;
    `kind` names the task for mixtures, `difficulty` feeds curricula)."""
    model: str = ""
    """The model directory to start from: ours (e.g. a pretrain checkpoint's model/) or an HF one."""
    out: str = "runs/finetune"
    """Run directory."""
    val_data: str = ""
    """Validation chat JSONL (optional; otherwise val_fraction of `data` is held out)."""
    val_fraction: float = 0.05
    """Without val_data: the share of rows held out for validation (0 = no validation)."""
    tokenizer: str = ""
    """Tokenizer directory (default: the --model directory). It needs lmstack's chat special tokens."""
    max_model_gib: float | None = None
    """Refuse a base model whose config.json needs more memory than this many GiB, estimated before allocating;
    default: 64 or this machine's RAM, the smaller. Weights load in fp32 whatever the checkpoint holds."""
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(method="full"))
    """The method's settings (rank, targets, virtual tokens, ...); adapter.method follows `method`."""
    train: TrainConfig = field(default_factory=_default_train)
    """The training loop (steps, max_seconds, grad_accum, clipping, eval, checkpoints, seed, ...)."""
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.0))
    """The optimizer over the trainable parameters (typical lr: 1e-4 full, 1e-3 LoRA, 1e-2 prompt/IA3)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_steps=20))
    """The learning-rate schedule."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics beside metrics.jsonl: TensorBoard (--log.tensorboard true), W&B (--log.wandb true)."""
    batch_size: int = 8
    """Packed rows per micro-batch."""
    seq_len: int = 256
    """Positions per packed row; longer conversations are cut (and counted)."""
    packing: Literal["best_fit", "greedy", "none"] = "best_fit"
    """best_fit: fewest rows; greedy: keep the data order (used automatically with a curriculum); none: one per row."""
    mix: dict[str, float] = field(default_factory=dict)
    """Task weights for a multi-task mixture, keyed by the rows' `kind` (empty = the data's own proportions)."""
    mix_total: int = 0
    """Examples in the mixture (0 = as many as the data has)."""
    curriculum: Literal["random", "easy_to_hard", "hard_to_easy", "staged", "competence"] = "random"
    """Order of the training examples by difficulty (random = shuffled each epoch)."""
    dp: DPConfig = field(default_factory=DPConfig)
    """Differential privacy (DP-SGD, lmstack.safety.dp): --dp.epsilon 8 clips each conversation's gradient to
    dp.max_grad_norm, adds Gaussian noise, samples batches by Poisson sampling and reports the epsilon spent."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHOD_NAMES)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**{**self.adapter, "method": self.method})
        self.adapter.method = self.method
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} is not allowed; it must be in [0, 1)")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed; it must be an integer >= 1")
        if self.mix_total < 0:
            raise ConfigError(f"mix_total={self.mix_total} is not allowed; it must be >= 0")
        if isinstance(self.dp, dict):
            self.dp = DPConfig(**self.dp)
        if self.dp.enabled and self.curriculum != "random":
            raise ConfigError(f"curriculum={self.curriculum!r} cannot be used with DP-SGD (dp.epsilon / "
                              f"dp.noise_multiplier): its batches are Poisson samples; use curriculum random")
        if self.packing not in PACKERS or self.curriculum not in CURRICULA:
            raise ConfigError(f"packing={self.packing!r} / curriculum={self.curriculum!r}: choose packing from "
                              f"{', '.join(PACKERS)} and curriculum from {', '.join(CURRICULA)}")


# ---- checkpoints that hold only the trainable tensors
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every parameter that trains (tied tensors once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach()
    return out


class TrainableCheckpoints(CheckpointManager):
    """CheckpointManager's layout, verification and pruning, but the model part is only the trainable tensors
    (an adapter's few thousand numbers, not the frozen base)."""

    def write_model(self, model, folder: Path, model_state: dict[str, torch.Tensor] | None) -> None:
        save_tree(trainable_state(model), folder / "trainable")

    def model_files(self, path: Path, files: dict) -> list[str]:
        return ["trainable.safetensors", "trainable.json"]  # verification requires these in the manifest


class SFTTrainer(Trainer):
    """The Trainer over packed chat batches: batches come ready-made from an SFTLoader (no objective.prepare),
    validation scores whole assistant replies, checkpoints hold the trainable tensors only."""

    def __init__(self, *args, val_examples: list[SFTExample] | None = None, seq_len: int = 256, pad_id: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.val_examples, self.seq_len, self.pad_id = val_examples or [], seq_len, pad_id
        self.ckpts = TrainableCheckpoints(self.out / "checkpoints", keep=self.cfg.keep_checkpoints)

    def _micro_batches(self):
        for i in range(self.accum):
            batch = next(self.train_loader)
            yield i, {k: v.to(self.device) for k, v in batch.items()}, int(batch["lengths"].sum())

    @torch.no_grad()
    def evaluate(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if not self.val_examples:
            return {}
        n = self.cfg.eval_batches * self.train_loader.batch_size
        with (swapped(self.raw, state) if state is not None else _null()):
            s = score_examples(self.model, self.val_examples[:n], self.seq_len, self.pad_id,
                               objective=self.objective)
        return {"val_loss": s["loss"], "val_ppl": float(torch.tensor(min(s["loss"], 50.0)).exp()),
                "val_token_acc": s["token_acc"], "val_exact": s["exact"]}

    def save(self) -> Path | None:
        return self.ckpts.save(self.step, self.raw, self.optimizer.state_dict(), self._extra_state())

    def try_resume(self) -> bool:
        found = self.ckpts.latest(log=self.log_fn)
        if found is None:
            return False
        manifest = json.loads((found / MANIFEST).read_text())
        diffs = config_differences(manifest["model_config"], to_dict(self.raw.config))
        if diffs:
            raise LmstackError(f"refusing to resume from {found}: the base model differs ({'; '.join(diffs)})")
        saved, mine = load_tree(found / "trainable"), trainable_state(self.raw)
        if set(saved) != set(mine):
            extra = sorted(set(saved) ^ set(mine))[:3]
            raise LmstackError(f"refusing to resume from {found}: it trained other tensors than this run "
                               f"(method or adapter settings changed; e.g. {extra})")
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(saved[name])
        self.optimizer.load_state_dict(load_tree(found / "optimizer"))
        self._restore(load_tree(found / "state"))
        self.log_fn(f"resumed from {found} at step {self.step}")
        return True


class DPSFTTrainer(DPTrainerMixin, SFTTrainer):
    """SFTTrainer whose step is DP-SGD (per-conversation clipping and noise; lmstack.safety.dp)."""


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- the run
def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded `fraction` of the rows held out (at least one when fraction > 0)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prepare_examples(cfg: FinetuneConfig, tok, log=print) -> tuple[list[SFTExample], list[SFTExample], dict]:
    """(ordered training examples, validation examples, data report) from cfg's files and settings."""
    rows = read_chat_jsonl(cfg.data)
    if cfg.val_data:
        train_rows, val_rows = rows, read_chat_jsonl(cfg.val_data)
    else:
        train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.train.seed)
    examples, stats = encode_rows(tok, train_rows, max_len=cfg.seq_len + 1)
    val, val_stats = encode_rows(tok, val_rows, max_len=cfg.seq_len + 1)
    log(f"sft data: {stats.summary()}")
    if not examples:
        raise LmstackError(f"{cfg.data}: no usable chat rows ({stats.summary()})")
    report: dict[str, Any] = {"train": to_dict(stats), "val": to_dict(val_stats)}
    if cfg.mix:
        examples, counts = mix_tasks(group_by_task(examples), cfg.mix, total=cfg.mix_total or None,
                                     seed=cfg.train.seed)
        report["mixture"] = counts
        log(f"sft mixture: {counts}")
    examples = order_examples(examples, cfg.curriculum, seed=cfg.train.seed)
    return examples, val, report


def finetune(cfg: FinetuneConfig, log=print) -> dict[str, Any]:
    """Fine-tune cfg.model on cfg.data with cfg.method; returns a summary (also written to out/summary.json)."""
    # lazy: cycle (lmstack.adapt's __init__ imports fusion, which imports this module)
    from lmstack.adapt import get_peft_model, trainable_report

    if not cfg.data or not cfg.model:
        raise LmstackError("finetune needs --data (a chat JSONL file) and --model (a pretrained model directory)")
    if not Path(cfg.model).is_dir():
        raise LmstackError(f"--model directory not found: {cfg.model}")

    set_threads(cfg.train.threads)  # 0 = auto: fits a shared machine instead of one thread per core
    set_max_model_gib(cfg.max_model_gib)  # load_model checks it before allocating the base model
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, restart=False)),  # restart is one-off
                out / "config.yaml")
    tok_dir = cfg.tokenizer or cfg.model
    if not has_tokenizer(tok_dir):
        raise LmstackError(f"no tokenizer.json (nor tokenizer.model) in {tok_dir}; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model, lazy=False).to(device)

    check_vocab(model, tok, model_path=cfg.model, tokenizer_path=tok_dir, what="finetune")
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    examples, val, report = prepare_examples(cfg, tok, log)
    ordered = cfg.curriculum != "random"
    packing = "greedy" if ordered else cfg.packing  # best_fit would undo the curriculum's order
    if cfg.method in UNPACKED_METHODS and packing != "none":
        log(f"method {cfg.method}: packing off (one conversation per row); {UNPACKED_METHODS[cfg.method]}")
        packing = "none"
    if cfg.dp.enabled and packing != "none":
        log("dp-sgd: packing off (one conversation per row), so a row is one record of the privacy guarantee")
        packing = "none"
    packed = pack_examples(examples, cfg.seq_len, pad_id, strategy=packing)
    report["packing"] = {"strategy": packing, **describe(packed)}
    atomic_write_text(out / "data.json", json.dumps(report, indent=1))
    if cfg.dp.enabled:
        loader, dp = start_dp(cfg.dp, packed, cfg.batch_size, cfg.train.grad_accum, cfg.train.steps,
                              cfg.train.seed, log)
    else:
        loader = SFTLoader(packed, cfg.batch_size, seed=cfg.train.seed, shuffle=not ordered)

    model = get_peft_model(model, cfg.adapter)
    params = trainable_report(model)
    log(f"method {cfg.method}: {params['trainable']:,} of {params['total']:,} parameters train "
        f"({params['trainable_pct']:.3f}%)")
    optimizer = build_optimizer(model, cfg.optim)
    steps = cfg.train.steps

    def lr_at(progress: float) -> float:
        return lr_multiplier(cfg.schedule, int(progress * steps), steps)

    # unpacked rows hold one conversation padded at the end, which causal attention never sees: no doc ids needed
    objective = SFTObjective(use_doc_ids=packing != "none")
    trainer = (DPSFTTrainer if cfg.dp.enabled else SFTTrainer)(model, objective, optimizer, lr_at, cfg.train, loader, None, out, log=log,
                         tokens_per_row=cfg.seq_len, val_examples=val, seq_len=cfg.seq_len, pad_id=pad_id,
                         log_cfg=cfg.log)
    if cfg.dp.enabled:
        trainer.dp = dp
    summary = trainer.fit()
    summary.update(method=cfg.method, out=str(out), data=report, **params)
    if cfg.dp.enabled:
        summary["dp"] = finish_dp(dp, trainer.step, log)
    summary["result"] = str(save_result(model, cfg, tok, out))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


PEFT_METHODS = ("lora", "dora", "qlora")
"""Methods saved in PEFT's file layout (save_adapter); the others as lmstack adapter files (save_trainable)."""
TRAINABLE_CONFIG, TRAINABLE_WEIGHTS = "lmstack_adapter.json", "lmstack_adapter.safetensors"


def save_result(model: torch.nn.Module, cfg: FinetuneConfig, tok, out: Path) -> Path:
    """Full fine-tuning: the model in HF layout (+ tokenizer) under out/model. LoRA/DoRA/QLoRA: PEFT files under
    out/adapter (save_adapter). Other methods: their trainable tensors under out/adapter (save_trainable)."""
    if cfg.method == "full":  # the base's tokenizer, template and generation_config.json stay as they were
        path = save_model(model, out / "model", tokenizer=tok)
        keep_source_files(cfg.model, path, model.config, tokenizer_dir=cfg.tokenizer or cfg.model)
        return path
    if cfg.method in PEFT_METHODS:
        # lazy: cycle (lmstack.adapt's __init__ imports fusion, which imports this module)
        from lmstack.adapt import save_adapter

        return save_adapter(model, out / "adapter", base_model_dir=cfg.model)
    return save_trainable(model, cfg.adapter, out / "adapter", cfg.model)


def save_trainable(model: torch.nn.Module, adapter: AdapterConfig, path: str | os.PathLike, base_dir: str) -> Path:
    """Write the trainable tensors of `model` (by parameter name) and the config that recreates them."""

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
    meta = {"method": adapter.method, "adapter": to_dict(adapter), "base_model_name_or_path": str(base_dir),
            "base_config": to_dict(model.config), "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    tmp = path / f".{TRAINABLE_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / TRAINABLE_WEIGHTS)
    atomic_write_text(path / TRAINABLE_CONFIG, json.dumps(meta, indent=1))
    return path


def load_trainable(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Re-add a save_trainable adapter to a fresh base model (frozen, for inference). An adapter made for another
    base is refused, naming the base it was made for."""
    # lazy: cycle (lmstack.adapt's __init__ imports fusion, which imports this module)
    from lmstack.adapt import get_peft_model

    path = Path(path)
    if not (path / TRAINABLE_CONFIG).is_file():
        raise LmstackError(f"{path} holds no {TRAINABLE_CONFIG}; is it an adapter written by lmstack finetune?")
    # Both files go through load_guard: kept inside the folder, size-capped JSON, safetensors header checked.
    meta = read_json(path, TRAINABLE_CONFIG, "adapter config")
    if not isinstance(meta, dict) or not {"base_config", "adapter", "method"} <= set(meta):
        raise LmstackError(f"{path / TRAINABLE_CONFIG} is not an lmstack adapter config "
                           "(needs base_config, adapter and method)")
    diffs = config_differences(meta["base_config"], to_dict(model.config))
    if diffs:
        raise LmstackError(f"the adapter in {path} was made for the base {meta.get('base_model_name_or_path')!r}, "
                           f"not this model ({'; '.join(diffs[:3])})")
    model = get_peft_model(model, AdapterConfig(**meta["adapter"]))
    saved, mine = load_safetensors(path, TRAINABLE_WEIGHTS, "adapter weights"), trainable_state(model)
    if set(saved) != set(mine) or any(tuple(saved[k].shape) != tuple(mine[k].shape) for k in mine):
        raise LmstackError(f"the adapter in {path} does not fit this model's {meta['method']} parameters")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(saved[name])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_result(base_dir: str | os.PathLike, result: str | os.PathLike) -> torch.nn.Module:
    """The fine-tuned model a finetune run produced: out/model, or the base plus out/adapter."""

    result = Path(result)
    if (result / "config.json").is_file():
        return load_model(result)
    if (result / TRAINABLE_CONFIG).is_file():
        return load_trainable(load_model(base_dir, lazy=False), result)
    # lazy: cycle (lmstack.adapt's __init__ imports fusion, which imports this module)
    from lmstack.adapt import apply_adapter

    return apply_adapter(load_model(base_dir, lazy=False), result).eval()
