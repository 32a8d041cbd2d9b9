"""`lmstack explain`: why does the model predict its next token? Attention maps, rollout, gradient×input and
integrated gradients for one prompt, written as PNG heatmaps, JSON and one HTML page (safety/explain.py,
safety/explain_report.py).

Usage:
    lmstack explain --model runs/sft/model --prompt "The capital of France is" --out runs/explain
    lmstack explain runs/sft/model --prompt "M x ... =" --target x --steps 64 --baseline zero
    lmstack explain --model runs/sft/model --prompt "How do I pick a lock?" --chat --out runs/why

The prompt is encoded as text (with the tokenizer's BOS, as generation does), or with --chat as one user turn
of the model's chat template, ready for the assistant's reply. --target names the next token to explain (text
that is one token of the vocabulary); by default it is the model's greedy choice. The special tokens (BOS, the
template's markers) are held in the integrated-gradients baseline, so the attributions are over the content
(--no_keep_special lets them move too). Writes into --out: index.html, attention_heads.png (or
attention_layerNN.png for a model with more than 64 heads), attention_mean.png, rollout.png, attributions.png,
attributions.json, rollout.json, attention.safetensors and config.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import ConfigCommand, save_config
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.model.load_guard import set_max_model_gib
from lmstack.model.vocab import check_vocab
from lmstack.runtime.device import resolve_device
from lmstack.safety.explain import explain as explain_ids
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer


@dataclass
class ExplainConfig:
    model: str = ""
    """Model directory (ours or Hugging Face's, with its tokenizer.json)."""
    prompt: str = ""
    """The text whose next token is explained."""
    out: str = "explain"
    """Directory for index.html, the PNG heatmaps and the JSON files."""
    target: str = ""
    """The next token to explain, as text that is one vocabulary token; empty = the model's greedy choice."""
    chat: bool = False
    """Render the prompt as a user turn of the chat template (with the assistant's opener) instead of raw text."""
    steps: int = 32
    """Integrated gradients: points on the path from the baseline to the prompt's embeddings."""
    baseline: Literal["pad", "zero", "mean"] = "pad"
    """Integrated gradients' start: the pad token's embedding, zeros, or the mean token embedding. Zeros sit on
    RMSNorm's spike at the origin, which a grid integrates badly (the completeness gap says how badly)."""
    keep_special: bool = True
    """Hold the special tokens (BOS, the chat template's markers) at their input in the baseline, so the
    gradient attributions are over the content tokens; --no_keep_special lets every token move."""
    rule: Literal["trapezoid", "riemann"] = "trapezoid"
    """Quadrature along the path: trapezoid (both ends) or midpoint Riemann sums."""
    residual: float = 0.5
    """Attention rollout: the weight of the identity (the residual stream) mixed into each layer's attention."""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda or cuda:N."""
    threads: int = 0
    """CPU threads for torch (0 = the process default)."""
    max_model_gib: float | None = None
    """Refuse a model whose weights need more memory than this (None = the process default)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise LmstackError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.residual <= 1.0:
            raise LmstackError(f"residual must lie in [0, 1], got {self.residual}")


def _prompt_ids(tok, cfg: ExplainConfig) -> list[int]:
    if not cfg.prompt.strip():
        raise LmstackError("--prompt is empty: give the text whose next token should be explained")
    if cfg.chat:
        ids, _ = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)
        return list(ids)
    return tok.encode_prompt(cfg.prompt)


def _target_id(tok, text: str, vocab_size: int) -> int | None:
    """The id of --target: a vocabulary entry as spelled, else text that encodes to exactly one token."""
    if not text:
        return None
    tid = tok.token_to_id(text)
    if tid is None:
        ids = tok.encode(text)
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise LmstackError(f"--target {text!r} is not one token of the vocabulary (it encodes to {len(ids)}: "
                               f"{pieces}); give a single token's text, e.g. one of those pieces")
        tid = ids[0]
    if tid >= vocab_size:
        raise LmstackError(f"--target {text!r} is token {tid}, outside the model's vocabulary of {vocab_size}")
    return tid


def _baseline(tok, name: str):
    if name != "pad":
        return name
    if tok.pad_id is None:
        raise LmstackError("the tokenizer has no pad token for --baseline pad; use --baseline zero or mean")
    return tok.pad_id


def _token_texts(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def explain(cfg: ExplainConfig) -> dict:
    """Explain the model's next token after a prompt: attention maps, rollout, gradient×input and integrated
    gradients, as heatmaps, JSON and an HTML page."""
    # lazy: matplotlib is only needed once there is something to draw, not for `lmstack explain --help`
    from lmstack.safety.explain_report import write_report

    if not cfg.model:
        raise LmstackError("--model is required: the model directory to explain (with its tokenizer.json)")
    if not Path(cfg.model).is_dir():
        raise LmstackError(f"--model {cfg.model} is not a model directory")
    set_threads(cfg.threads)
    set_max_model_gib(cfg.max_model_gib)
    tok = load_tokenizer(cfg.model)
    ids = _prompt_ids(tok, cfg)
    model = load_model(cfg.model, device=resolve_device(cfg.device))
    check_vocab(model, tok, model_path=cfg.model, tokenizer_path=cfg.model, what="explain")
    target = _target_id(tok, cfg.target, model.config.vocab_size)
    keep = tok.special_ids if cfg.keep_special else ()
    ex = explain_ids(model, ids, target=target, steps=cfg.steps, baseline=_baseline(tok, cfg.baseline),
                     rule=cfg.rule, residual=cfg.residual, keep_ids=keep)
    out = Path(cfg.out)
    target_text = tok.decode([ex.target_id])
    paths = write_report(ex, _token_texts(tok, ex.ids), out, target_text=target_text)
    save_config(cfg, out / "config.yaml")
    top = int(ex.integrated_gradients.argmax())
    print(f"next token {target_text!r}: integrated gradients peak on token {top} "
          f"{tok.decode([ex.ids[top]])!r}; completeness gap {100 * ex.ig_relative_gap:.2f}%")
    print(f"wrote {paths['html']}")
    return {"html": str(paths["html"]), "target": target_text, "target_id": ex.target_id, "top_token": top,
            "ig_relative_gap": ex.ig_relative_gap}


COMMANDS = ConfigCommand(ExplainConfig, explain)
