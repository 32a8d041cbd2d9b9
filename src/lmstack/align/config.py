"""AlignConfig: one run of `lmstack align` (reward model or offline preference optimisation).

Offline methods (rm, dpo, cdpo, ipo, kto) read preference pairs; online methods (ppo, grpo, rloo, rft) read
prompt records, sample from the policy through the inference engine and learn from a reward (`reward`: a
verifier such as math, a weighted mix, or a trained reward model directory).

The loop, the optimizer and the schedule are the same configs as pretrain's and finetune's (TrainConfig,
OptimizerConfig, ScheduleConfig), so `--train.steps`, `--optim.lr`, `--optim.weight_decay` and
`--schedule.warmup_steps` mean the same in all three commands, and every optimizer and schedule name works
here too. Align's defaults differ (lr 1e-5, no weight decay, 200 steps, warmup 10 then cosine to 10%), and
the nested configs may be given as partial dicts, merged into those defaults. Align runs its own small loops,
not the pretraining Trainer, so TrainConfig's checkpoint, averaging, accumulation and gradient-noise knobs
do not apply: a non-default value of one is an error, never silently ignored. The flat flags of earlier
versions (--steps, --lr, ...) and --policy are refused with their new names (RENAMED).

Usage:
    from lmstack.align.config import AlignConfig
    cfg = AlignConfig(method="dpo", model="runs/sft/model", data="prefs.jsonl", out="runs/dpo", beta=0.1)
    cfg = AlignConfig(method="dpo", model="runs/sft/model", from_feedback="feedback.db", out="runs/dpo-fb")
    cfg = AlignConfig(method="grpo", model="runs/sft/model", data="world/chat/train.jsonl", kind="arithmetic",
                      reward="math", group_size=8, train={"steps": 40}, optim={"lr": 3e-4})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from lmstack.config import ConfigError, from_dict
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import LogConfig
from lmstack.train.optim.config import OptimizerConfig
from lmstack.train.optim.schedules import ScheduleConfig
from lmstack.runtime.validation import check_choices, check_range, need

Method = Literal["rm", "dpo", "cdpo", "ipo", "kto", "ppo", "trpo", "grpo", "rloo", "rft"]
ONLINE = ("ppo", "trpo", "grpo", "rloo", "rft")
METHOD_LOSS = {"dpo": "dpo", "cdpo": "cdpo", "ipo": "ipo"}  # paired methods -> losses.PAIR_LOSSES name

# Old flat keys -> their nested names (lmstack.config refuses the old ones in flags, recipes and dicts, naming these).
RENAMED = {"policy": "model", "lr": "optim.lr", "weight_decay": "optim.weight_decay", "steps": "train.steps",
           "max_seconds": "train.max_seconds", "warmup_steps": "schedule.warmup_steps",
           "clip_grad_norm": "train.clip_grad_norm", "eval_every": "train.eval_every",
           "log_every": "train.log_every", "seed": "train.seed", "device": "train.device",
           "progress": "train.progress", "threads": "train.threads"}

# The TrainConfig fields align's loops honour; every other one must keep TrainConfig's default.
TRAIN_FIELDS_USED = ("steps", "max_seconds", "clip_grad_norm", "eval_every", "log_every", "seed", "device",
                     "threads", "progress")
# ... except these, where a value align also obeys is fine (align trains in fp32; "auto" means fp32 here).
TRAIN_VALUES_OBEYED = {"precision": ("auto", "fp32")}


def default_train() -> TrainConfig:
    return TrainConfig(steps=200, eval_every=50, log_every=10)


def default_optim() -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=1e-5, weight_decay=0.0)


def default_schedule() -> ScheduleConfig:
    return ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)


def check_train_fields_used(train: TrainConfig) -> None:
    """ConfigError naming the first TrainConfig knob align would ignore that is not at its default."""
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(train, f.name)
        if f.name in TRAIN_FIELDS_USED or value == getattr(default, f.name) \
                or value in TRAIN_VALUES_OBEYED.get(f.name, ()):
            continue
        raise ConfigError(f"train.{f.name}={value!r}: align does not use train.{f.name} (its loops honour only "
                          f"train.{', train.'.join(TRAIN_FIELDS_USED)}); leave it at {getattr(default, f.name)!r}")


@dataclass
class AlignConfig:
    renamed_keys = RENAMED  # a class attribute, not a field: lmstack.config names the new key for an old one
    method: Method = "dpo"
    """rm (Bradley-Terry reward model), dpo (sigmoid), cdpo (DPO + label smoothing), ipo, kto (unpaired);
    online: ppo (value head + GAE), trpo (PPO's advantages, a natural-gradient step under a KL limit),
    grpo (group-normalised), rloo (leave-one-out), rft (rejection-sampling SFT rounds)."""
    model: str = ""
    """Model directory to start from: ours (the SFT checkpoint) or an HF one; must hold tokenizer.json too."""
    max_model_gib: float | None = None
    """Refuse a policy or reference whose config.json needs more memory than this many GiB, estimated before
    allocating; default: 64 or this machine's RAM, the smaller. Weights load in fp32 whatever the checkpoint holds."""
    data: str = ""
    """Preference JSONL: prompt, chosen, rejected [, confidence] (kto also takes prompt, completion, label);
    online methods: prompt records (`prompt` or chat `messages`, plus what the reward checks, e.g. `answer`)."""
    from_feedback: str | None = None
    """A feedback database written by `lmstack serve --feedback_db` (lmstack.safety.feedback): its users' flags
    become the preference pairs (a correction beats the flagged reply, the house refusal beats a reply flagged
    unsafe, an up-rated reply beats a down-rated one to the same prompt). Instead of --data; rm, dpo, cdpo, ipo."""
    out: str = "runs/align"
    """Output directory: the trained model (or reward model), metrics.jsonl, summary.json, config.yaml."""
    val_data: str = ""
    """Held-out preference JSONL for accuracy/margins; empty = hold out val_fraction of `data`."""
    split: str = ""
    """Read only rows whose `split` field equals this (e.g. 'train' for a world file); empty = all rows."""
    kind: str = ""
    """Read only rows whose `kind` field equals this (e.g. 'arithmetic' in the world's chat file); empty = all."""
    val_fraction: float = 0.1
    """Share of `data` held out for evaluation when val_data is empty."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """How prompts are rendered: the tokenizer's chat template (auto when it has one) or plain text."""
    # ---- preference optimisation
    beta: float = 0.1
    """Strength of the KL anchor to the reference (TRL's default 0.1); implicit rewards are β·log-ratios."""
    label_smoothing: float = 0.0
    """cDPO: probability that a pair's label is flipped, in [0, 0.5); cdpo needs it > 0."""
    rpo_alpha: float = 0.0
    """RPO (Pang et al. 2024; TRL's rpo_alpha): add rpo_alpha x the per-token NLL of the chosen replies to a paired
    loss, so the chosen replies' likelihood is anchored and cannot fall while the margin grows. 0 = off."""
    confidence_as: Literal["weight", "smoothing", "ignore"] = "weight"
    """Per-pair `confidence` c: weight the pair's loss by c, or smooth its label by ε = 1 - c, or ignore it."""
    ipo_average: bool = True
    """IPO on per-token mean log-probs (TRL's choice; keeps 1/(2β) meaningful across lengths)."""
    kto_desirable_weight: float = 1.0
    """KTO λ_D: weight of desirable completions' losses."""
    kto_undesirable_weight: float = 1.0
    """KTO λ_U: weight of undesirable completions' losses."""
    reference: Literal["copy", "precomputed", "adapters"] = "copy"
    """Reference policy: a frozen copy, log-probs precomputed once (no copy kept in memory), or the policy
    itself with its adapters disabled (LoRA training; needs lmstack.adapt.disable_adapters)."""
    reference_path: str = ""
    """A different reference model directory (empty = the policy's starting weights); its tokenizer must match."""
    # ---- online RL (ppo, grpo, rloo, rft)
    reward: str = "math"
    """What scores a sample: a registered reward (math, format, instruction, factuality, safety, length, ...),
    a weighted mix 'math=1,format=0.2', or a reward model directory written by --method rm: 'rm:DIR' (or DIR),
    also inside a mix: 'math=1,rm:runs/rm/model=0.5'. Each part of a mix is logged as score_<name>."""
    monitor: str = ""
    """Rewards scored on every rollout and held-out evaluation and logged as score_<name>, never optimised
    (comma-separated names or rm:DIR), e.g. 'math' beside --reward rm:DIR to see reward over-optimisation."""
    prompts_per_step: int = 8
    """Prompts rolled out per RL step (each gets group_size samples; ppo and rft: samples per prompt too)."""
    group_size: int = 8
    """Samples per prompt: the GRPO/RLOO group, PPO's samples per prompt, RFT's best-of-n."""
    max_tokens: int = 128
    """Longest sampled reply."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs for the ratio use the same temperature)."""
    top_k: int = 0
    """Top-k truncation of rollouts (0 = off)."""
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch (1 = on-policy: the ratio is 1 and the clip inactive)."""
    minibatches: int = 1
    """Minibatches per pass over a rollout batch (more = more, smaller optimizer steps per rollout)."""
    clip: float = 0.2
    """PPO/GRPO ratio clip ε: the ratio π/π_old is kept in [1-ε, 1+ε]."""
    kl_coef: float = 0.0
    """KL(π || π_ref) weight: GRPO/RLOO add it to the loss (k3 per token), PPO subtracts it from the per-token
    reward. 0 = no reference model is kept."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """PPO's per-token KL penalty estimator: k1 = log π - log π_ref, k3 = (r - 1) - log r with r = π_ref/π.
    Keep k1 for PPO: as a reward, k3's policy gradient is not the KL gradient (see ppo.py)."""
    kl_target: float = 0.0
    """PPO adaptive KL controller target (nats per sequence); 0 = fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon (samples): how fast kl_coef moves toward the target."""
    gamma: float = 1.0
    """PPO discount."""
    lam: float = 0.95
    """PPO GAE λ."""
    vf_coef: float = 0.1
    """PPO value loss weight."""
    value_clip: float = 0.2
    """PPO value clip (the value may move at most this far from its rollout value per step)."""
    whiten_advantages: bool = True
    """PPO: whiten advantages over the batch's generated tokens."""
    max_kl: float = 0.01
    """TRPO trust region: the largest mean per-token KL(π_old || π) an accepted policy step may have."""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations (Fisher-vector products) per natural-gradient step."""
    cg_damping: float = 0.1
    """TRPO: damping λ added to the Fisher (solves (F + λI) x = g), which keeps CG stable."""
    line_search_steps: int = 10
    """TRPO: backtracking halvings tried before the step is rejected (the policy then stays put)."""
    rounds: int = 3
    """RFT: rounds of (sample best-of-n, fine-tune on the winners)."""
    rft_prompts: int = 256
    """RFT: training prompts sampled per round (capped at the training set)."""
    rft_min_reward: float = 1.0
    """RFT: a winner must score at least this (with the math verifier: only correct answers are kept)."""
    eval_prompts: int = 64
    """Held-out prompts scored greedily before and after (and every eval_every steps); 0 = no evaluation."""
    # ---- reward model
    margin: float = 0.0
    """Bradley-Terry margin m in -log σ(r_c - r_r - m); a row's own `margin` field overrides it."""
    center_coef: float = 0.0
    """Reward centering: adds center_coef · mean((r_c + r_r)²) (TRL suggests 0.01)."""
    # ---- rows and the loop
    batch_size: int = 8
    """Pairs (or KTO rows) per step."""
    max_len: int = 256
    """Longest prompt + completion in tokens; longer rows lose the prompt's start first."""
    train: TrainConfig = field(default_factory=default_train)
    """The loop, as in pretrain and finetune: steps (online methods: RL steps, each a rollout and its updates;
    rft: SFT steps per round), max_seconds (a time budget, as the speedrun uses; align's schedule still follows
    steps), clip_grad_norm, eval_every (held-out evaluation every N steps, 0 = only at the end), log_every, seed
    (data order, the validation split, head initialisation), device, threads, progress. Align's defaults: 200
    steps, eval_every 50. Its other knobs (checkpoints, EMA/SWA, accumulation, ...) must keep their defaults."""
    optim: OptimizerConfig = field(default_factory=default_optim)
    """The optimizer over the trained parameters, built as pretrain and finetune build it (any optim.name);
    align's defaults: adamw, lr 1e-5, weight_decay 0."""
    schedule: ScheduleConfig = field(default_factory=default_schedule)
    """The learning-rate schedule over train.steps optimizer steps; align's default: 10 warmup steps, then
    cosine to 10%."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics beside metrics.jsonl: TensorBoard (--log.tensorboard true), W&B (--log.wandb true)."""

    def __setattr__(self, name: str, value) -> None:
        if name in RENAMED:  # `cfg.steps = 5` would otherwise add an attribute nothing reads
            raise ConfigError(f"AlignConfig.{name} is now AlignConfig.{RENAMED[name]}")
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        # a partial dict (Python callers, tests) is merged into align's defaults, as a recipe's mapping is
        for name, cls, default in (("train", TrainConfig, default_train), ("optim", OptimizerConfig, default_optim),
                                   ("schedule", ScheduleConfig, default_schedule)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, from_dict(cls, getattr(self, name), _prefix=name + ".", _base=default()))
        check_choices(self)
        check_train_fields_used(self.train)
        check_range("beta", self.beta, low=0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        need(self.rpo_alpha >= 0, f"rpo_alpha must be >= 0 (0 = no NLL term), got {self.rpo_alpha}")
        need(not (self.from_feedback and self.data), f"give either data ({self.data!r}) or from_feedback "
             f"({self.from_feedback!r}), not both: the feedback database is the preference data")
        need(not self.from_feedback or self.method in ("rm", "dpo", "cdpo", "ipo"),
             f"from_feedback builds preference pairs, which method={self.method!r} does not train on; use rm, dpo, "
             "cdpo or ipo")
        need(self.method != "cdpo" or self.label_smoothing > 0,
             "method='cdpo' needs label_smoothing in (0, 0.5) (label_smoothing=0 is plain dpo)")
        check_range("val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        need(self.kto_desirable_weight > 0 and self.kto_undesirable_weight > 0,
             "kto_desirable_weight and kto_undesirable_weight must be > 0")
        check_range("center_coef", self.center_coef, low=0)
        check_range("train.steps", self.train.steps, low=1)
        need(self.train.max_seconds >= 0,
             f"train.max_seconds must be >= 0 (0 = no limit), got {self.train.max_seconds}")
        check_range("batch_size", self.batch_size, low=1)
        check_range("max_len", self.max_len, low=2)
        need(self.train.eval_every >= 0 and self.train.log_every >= 1,
             "train.eval_every must be >= 0 and train.log_every >= 1")
        check_range("train.clip_grad_norm", self.train.clip_grad_norm, low=0)
        need(not (self.method == "kto" and self.reference == "precomputed"),
             "reference='precomputed' does not fit kto: its mismatched KL pairs change every batch; use 'copy'")
        need(self.method == "rm" or self.reference != "adapters" or not self.reference_path,
             "reference='adapters' uses the policy itself; leave reference_path empty")
        need(self.prompts_per_step >= 1 and self.group_size >= 1, "prompts_per_step and group_size must be >= 1")
        need(self.method not in ("grpo", "rloo") or self.group_size >= 2,
             f"method={self.method!r} compares samples within a group: group_size must be >= 2, got {self.group_size}")
        check_range("max_tokens", self.max_tokens, low=1)
        need(0 < self.temperature <= 10, f"temperature must be in (0, 10] for sampling, got {self.temperature}")
        need(self.ppo_epochs >= 1 and self.minibatches >= 1, "ppo_epochs and minibatches must be >= 1")
        check_range("clip", self.clip, low=0, high=1, low_open=True, high_open=True)
        need(self.kl_coef >= 0 and self.kl_target >= 0, "kl_coef and kl_target must be >= 0")
        need(self.kl_target == 0 or self.kl_coef > 0, "kl_target needs kl_coef > 0 (the controller's starting value)")
        check_range("kl_horizon", self.kl_horizon, low=1)
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        need(self.vf_coef >= 0 and self.value_clip > 0, "vf_coef must be >= 0 and value_clip > 0")
        need(self.rounds >= 1 and self.rft_prompts >= 1, "rounds and rft_prompts must be >= 1")
        check_range("eval_prompts", self.eval_prompts, low=0)
        need(self.max_kl > 0 and self.cg_damping >= 0, f"max_kl must be > 0 and cg_damping >= 0, got "
             f"{self.max_kl} and {self.cg_damping}")
        need(self.cg_iters >= 1 and self.line_search_steps >= 1, "cg_iters and line_search_steps must be >= 1")
