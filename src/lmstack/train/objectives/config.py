"""ObjectiveConfig: which pretraining objective the trainer optimises, and its knobs.

One flat dataclass covers every objective (CLM, MLM, span corruption, prefix LM, ELECTRA, UL2,
distillation) plus the two add-ons that work on top of any of them: the contrastive (InfoNCE)
auxiliary loss and per-token loss re-weighting. Fields an objective does not use are ignored.

Reserved ids: objectives that corrupt text need ids the tokenizer never produces from plain text.
By default the mask id is vocab_size - 1, the span sentinels are the n_sentinels ids just below it
(sentinel_i = mask - 1 - i, as T5 counts down from its last id) and UL2's three mode tokens sit
below the sentinels. Point mask_token_id (and first_sentinel_id) at ids the tokenizer reserves; an
objective that finds one of its reserved ids in the data raises an error rather than train on
ambiguous inputs.

Usage:
    from lmstack.train.objectives import ObjectiveConfig
    cfg = ObjectiveConfig(name="span", noise_density=0.15, mean_span=3.0)
    cfg = ObjectiveConfig.from_dict({"name": "mlm", "mask_prob": 0.2})   # strict: unknown keys raise
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.config import ConfigError, from_dict, to_dict
from lmstack.runtime.validation import check_choices

ObjectiveName = Literal["clm", "mlm", "span", "prefix_lm", "electra", "ul2", "distill"]


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "clm"
    """Objective: clm, mlm (80/10/10), span (T5 span corruption, decoder-only), prefix_lm, electra (replaced-token
    detection), ul2 (mixture of denoisers), distill (KL to a teacher's logits mixed with CE)."""
    # ---- masking (mlm, electra)
    mask_prob: float = 0.15
    """Fraction of eligible positions (not pad, not bos) chosen for prediction in mlm/electra."""
    mask_replace_prob: float = 0.8
    """mlm: of the chosen positions, this share becomes the mask id ..."""
    mask_random_prob: float = 0.1
    """mlm: ... this share becomes a random id, and the rest keep their token (BERT's 80/10/10)."""
    # ---- span corruption (span, ul2's R/X denoisers)
    noise_density: float = 0.15
    """span: fraction of tokens that are corrupted (hidden in the input, predicted in the targets part)."""
    mean_span: float = 3.0
    """span: mean length of a corrupted span."""
    mask_token_id: int | None = None
    """Id of the mask token. None means vocab_size - 1 (the tokenizer must reserve it; see the module docstring)."""
    n_sentinels: int = 100
    """Sentinel ids for span corruption: n ids counting down from first_sentinel_id (sentinel_i = first - i)."""
    first_sentinel_id: int | None = None
    """The highest sentinel id. None means mask_token_id - 1 (the n ids just below the mask id)."""
    # ---- ELECTRA
    electra_gen_layers: int = 0
    """Layers of ELECTRA's generator (a small encoder). 0 means the discriminator's n_layers (ELECTRA shrinks width)."""
    electra_gen_d_model: int = 0
    """Width of ELECTRA's generator. 0 means half the discriminator's heads x its head_dim (the paper: 1/4-1/2)."""
    electra_disc_weight: float = 50.0
    """lambda in loss = generator MLM + lambda * discriminator BCE (50 in the ELECTRA paper)."""
    # ---- UL2 mixture of denoisers
    ul2_weights: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.4])
    """Sampling weights of the R (regular spans), S (prefix LM) and X (extreme spans) denoisers."""
    ul2_r_denoisers: list[list[float]] = field(default_factory=lambda: [[3.0, 0.15], [8.0, 0.15]])
    """(mean_span, noise_density) of each R-denoiser; one is picked uniformly when R is drawn."""
    ul2_x_denoisers: list[list[float]] = field(default_factory=lambda: [[3.0, 0.5], [8.0, 0.5], [64.0, 0.15],
                                                                        [64.0, 0.5]])
    """(mean_span, noise_density) of each X-denoiser (long spans or high density)."""
    ul2_per_row: bool = True
    """Draw the denoiser per row (True) or once per batch (False)."""
    ul2_mode_tokens: bool = False
    """Prepend a mode token ([R], [S] or [X]: the three ids below the sentinels) so the model knows the task."""
    # ---- distillation
    teacher: str | None = None
    """distill: a model directory loaded with lmstack.load_model (same vocabulary as the student)."""
    distill_temperature: float = 2.0
    """distill: temperature T of both softmaxes in the KL term (the term is scaled by T^2)."""
    distill_alpha: float = 0.5
    """distill: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""
    distill_base: Literal["clm", "prefix_lm", "mlm"] = "clm"
    """distill: the objective whose inputs and targets the student and teacher both see."""
    # ---- contrastive auxiliary (on top of any causal / prefix-LM objective)
    contrastive_weight: float = 0.0
    """Weight of the auxiliary InfoNCE loss (0 = off): a prefix's state must pick its true continuation."""
    contrastive_temperature: float = 0.1
    """InfoNCE temperature."""
    contrastive_split: float = 0.5
    """Where the prefix ends, as a fraction of the row, for objectives without a prefix_len of their own."""
    contrastive_corrupt: float = 0.5
    """Share of a continuation's tokens swapped for another row's to make a hard negative (0 = none)."""
    contrastive_dim: int = 64
    """Width of the two InfoNCE projection heads."""
    # ---- token re-weighting (adaptive token sampling)
    token_weighting: Literal["none", "inverse_freq", "focal"] = "none"
    """Per-token loss weights while training: inverse_freq (online EMA counts) or focal ((1-p)^gamma)."""
    token_weight_temperature: float = 2.0
    """inverse_freq: weight = freq^(-1/temperature); 1 = full inverse frequency, 2 = inverse sqrt, large = uniform."""
    token_freq_decay: float = 0.99
    """inverse_freq: the token counts are an exponential moving sum with this decay per step."""
    token_weight_max: float = 10.0
    """Cap on a token's weight (after normalising the batch's weights to mean 1)."""
    focal_gamma: float = 2.0
    """focal: weight = (1 - p_target)^gamma."""
    # ---- fused LM head + loss
    fused_ce: bool = False
    """Compute the LM head and cross-entropy chunk by chunk (model/fused_ce.py), never holding the full
    (tokens, vocab) logits: same loss and gradients, far less memory at large vocabularies."""
    # ---- bookkeeping
    init_seed: int = 0
    """Seed for the objective's own parameters (ELECTRA's generator and head, InfoNCE projections)."""

    def __post_init__(self) -> None:
        check_choices(self, prefix="objective.")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"objective.{msg}")

        for name in ("mask_prob", "noise_density"):
            need(0.0 < getattr(self, name) < 1.0, f"{name}={getattr(self, name)} must be in (0, 1)")
        need(0.0 <= self.mask_replace_prob and 0.0 <= self.mask_random_prob
             and self.mask_replace_prob + self.mask_random_prob <= 1.0,
             f"mask_replace_prob={self.mask_replace_prob} and mask_random_prob={self.mask_random_prob} must be "
             ">= 0 and sum to at most 1")
        need(self.mean_span >= 1.0, f"mean_span={self.mean_span} must be >= 1")
        need(self.n_sentinels >= 1, f"n_sentinels={self.n_sentinels} must be >= 1")
        need(self.mask_token_id is None or self.mask_token_id >= 0, f"mask_token_id={self.mask_token_id} must be >= 0")
        need(self.first_sentinel_id is None or self.first_sentinel_id >= 0,
             f"first_sentinel_id={self.first_sentinel_id} must be >= 0")
        need(self.electra_gen_layers >= 0 and self.electra_gen_d_model >= 0,
             "electra_gen_layers and electra_gen_d_model must be >= 0 (0 = derived)")
        need(self.electra_disc_weight >= 0, f"electra_disc_weight={self.electra_disc_weight} must be >= 0")
        need(len(self.ul2_weights) == 3 and all(w >= 0 for w in self.ul2_weights) and sum(self.ul2_weights) > 0,
             f"ul2_weights={self.ul2_weights} must be three non-negative weights (R, S, X) with a positive sum")
        for name in ("ul2_r_denoisers", "ul2_x_denoisers"):
            specs = getattr(self, name)
            need(len(specs) > 0 and all(len(s) == 2 and s[0] >= 1 and 0 < s[1] < 1 for s in specs),
                 f"{name}={specs} must be a non-empty list of [mean_span >= 1, noise_density in (0, 1)]")
        need(self.distill_temperature > 0, f"distill_temperature={self.distill_temperature} must be > 0")
        need(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha={self.distill_alpha} must be in [0, 1]")
        need(self.contrastive_weight >= 0, f"contrastive_weight={self.contrastive_weight} must be >= 0")
        need(self.contrastive_temperature > 0, f"contrastive_temperature={self.contrastive_temperature} must be > 0")
        need(0.0 < self.contrastive_split < 1.0, f"contrastive_split={self.contrastive_split} must be in (0, 1)")
        need(0.0 <= self.contrastive_corrupt < 1.0, f"contrastive_corrupt={self.contrastive_corrupt} must be in [0, 1)")
        need(self.contrastive_dim >= 1, f"contrastive_dim={self.contrastive_dim} must be >= 1")
        need(self.token_weight_temperature > 0, f"token_weight_temperature={self.token_weight_temperature} must be > 0")
        need(0.0 <= self.token_freq_decay < 1.0, f"token_freq_decay={self.token_freq_decay} must be in [0, 1)")
        need(self.token_weight_max >= 1.0, f"token_weight_max={self.token_weight_max} must be >= 1")
        need(self.focal_gamma >= 0, f"focal_gamma={self.focal_gamma} must be >= 0")
        need(not (self.fused_ce and self.token_weighting != "none"),
             f"fused_ce=true cannot be combined with token_weighting={self.token_weighting!r}: the fused loss "
             "computes its gradient before per-token weights (which need the whole batch's losses) exist")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ObjectiveConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
