"""HFTrainerAdapter: the surface transformers' Trainer and TRL's SFTTrainer / DPOTrainer read, around our model.

Trainer alone needs nothing of us: any nn.Module whose forward takes input_ids/attention_mask/labels and
returns .loss works (Transformer's HF-style forward, model/outputs.py). TRL's trainers need more. They
replace the model's forward with a "fused LM head" that runs the backbone (`model.base_model(...)
.last_hidden_state`), then scores the labels against `model.get_output_embeddings().weight` in chunks
without building the logits; and they read and write `model.config.get_text_config()` (pad/eos ids,
logit soft-capping), `model.generation_config` and `model.add_model_tags`. This adapter provides exactly
those, over one Transformer, and is not a PreTrainedModel: it has no from_pretrained, no hub, no
generate. Parameters are the Transformer's own (the adapter holds it as `.model`), so training the
adapter trains the model. TRL's packing (padding-free rows whose position_ids restart at 0) becomes our
doc_ids, so packed documents never attend to each other.

Saving: Trainer.save_model writes only the adapter's state dict for a non-PreTrainedModel, so the adapter
puts our config into it (get_extra_state; model/trainer_save.py) and lmstack.load_model reads that
directory back. save_pretrained writes the usual HF-layout directory (lmstack.save_model).

Usage:
    from lmstack.model.hf_trainer import HFTrainerAdapter
    model = HFTrainerAdapter(lmstack.load_model("dir"))
    trl.SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=hf_tokenizer).train()
    trainer.save_model("out"); lmstack.load_model("out")       # or model.save_pretrained("out")
    model.model                                                 # the trained Transformer
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from lmstack.config import to_dict
from lmstack.errors import LmstackError
from lmstack.model.hf_io import save_model
from lmstack.model.outputs import CausalLMOutput
from lmstack.model.trainer_save import PREFIX, decode_config, encode_config
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import real_vocab


def _through(name: str) -> property:
    """A property that reads and writes our ModelConfig's field `name`."""
    return property(lambda self: getattr(self._cfg, name), lambda self, value: setattr(self._cfg, name, value))


class ConfigView:
    """The transformers-config fields the trainers read, over our ModelConfig (HF names -> ours).

    Token ids read and write through, so a pad id TRL sets is saved with the model. Fields trainers only
    probe with getattr (logit_scale, output_router_logits, ...) are absent, as on a plain Llama config."""

    use_cache = False  # Trainer sets it from TrainingArguments; a training forward never builds a cache
    _name_or_path = ""  # no hub id: TRL cannot reload a reference model by name, pass ref_model=

    def __init__(self, cfg):
        self._cfg = cfg

    model_type = property(lambda self: self._cfg.hf_model_type or "lmstack")
    vocab_size = property(lambda self: self._cfg.vocab_size)
    # TRL's fused head applies it to the logits; 0.0 (off) in our config is None (off) in theirs
    final_logit_softcapping = property(lambda self: self._cfg.final_logit_softcap or None)

    bos_token_id = _through("bos_token_id")
    eos_token_id = _through("eos_token_id")
    pad_token_id = _through("pad_token_id")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> "ConfigView":
        return self  # one decoder: the text config is the config

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "lmstack": to_dict(self._cfg)}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class GenerationIds:
    """model.generation_config as TRL uses it: a place for bos/eos/pad ids (eos may be a list)."""

    def __init__(self, cfg):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id


class BackboneOutput(dict):
    """What `model.base_model(...)` returns: the final-norm hidden states, as BaseModelOutput names them."""

    def __init__(self, last_hidden_state: torch.Tensor):
        super().__init__(last_hidden_state=last_hidden_state)

    last_hidden_state = property(lambda self: self["last_hidden_state"])


class Backbone:
    """model.base_model: our Transformer up to the final norm (the LM head is applied by the caller)."""

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, use_cache: bool | None = None,
                 **varlen) -> BackboneOutput:
        check_varlen(varlen)
        doc_ids = doc_ids_from_positions(position_ids, input_ids, self.model.config)
        return BackboneOutput(self.model(input_ids, attention_mask=attention_mask, doc_ids=doc_ids,
                                         return_hidden=True))


class OutputHead:
    """get_output_embeddings(): the LM head's weight cut to the real vocabulary.

    Rows past real_vocab_size are padding that Transformer.head gives zero probability; TRL's fused head
    multiplies by .weight directly, so handing it only the real rows gives the same distribution."""

    bias = None

    def __init__(self, model: Transformer):
        self.model = model

    @property
    def weight(self) -> torch.Tensor:
        m = self.model
        weight = m.head_weight()
        real = real_vocab(m.config)
        return weight if real >= weight.shape[0] else weight[:real]


# What TRL's padding-free collator sends beside position_ids for flash-attention's varlen kernels. They say
# what position_ids say (where each packed document starts), so they are accepted and not used.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def check_varlen(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(VARLEN_KWARGS))
    if unknown:
        raise LmstackError(f"unexpected argument {unknown[0]!r}; besides input_ids, attention_mask, labels, "
                           f"position_ids and use_cache the model takes only {', '.join(VARLEN_KWARGS)}")


def doc_ids_from_positions(position_ids: torch.Tensor | None, input_ids: torch.Tensor, cfg) -> torch.Tensor | None:
    """Packed rows (padding-free packing) as our doc_ids: a document starts wherever position_ids restart at 0.

    Attention then never crosses documents, and with relative positions (RoPE, ALiBi, none) each document's
    logits equal those it gets alone. Absolute positions (learned, sinusoidal) would keep counting across
    documents, so a packed row is refused for them. None when there is one document per row."""
    if position_ids is None:
        return None
    if position_ids.shape != input_ids.shape:
        raise LmstackError(f"position_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                           f"got {tuple(position_ids.shape)}")
    starts = position_ids == 0
    steps = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if not bool(starts[:, 0].all()) or not bool((steps | starts[:, 1:]).all()):
        raise LmstackError("position_ids must count 0, 1, 2, ... from the start of each packed document")
    if not bool(starts[:, 1:].any()):
        return None
    if cfg.position in ("learned", "sinusoidal"):
        raise LmstackError(f"packed rows (position_ids restarting at 0) need relative positions; position="
                           f"{cfg.position!r} would count on across documents (use packing=False)")
    return starts.long().cumsum(-1).to(input_ids.device)


class HFTrainerAdapter(nn.Module):
    main_input_name = "input_ids"
    # The loss is a per-batch mean; Trainer then averages it over gradient-accumulation steps itself.
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None

    def __init__(self, model: Transformer):
        super().__init__()
        if not isinstance(model, Transformer):
            raise LmstackError(f"HFTrainerAdapter wraps an lmstack Transformer, got {type(model).__name__}")
        if model.config.head != "lm":
            raise LmstackError(f"HFTrainerAdapter needs a causal LM head; this model has head={model.config.head!r}")
        self.model = model
        self.config = ConfigView(model.config)
        self.generation_config = GenerationIds(model.config)
        self.model_tags: list[str] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                use_cache: bool | None = None, **varlen) -> CausalLMOutput:
        check_varlen(varlen)
        doc_ids = doc_ids_from_positions(position_ids, input_ids, self.model.config)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, doc_ids=doc_ids)

    # ---- what TRL's fused LM head reads
    @property
    def base_model(self) -> Backbone:
        return Backbone(self.model)

    def get_output_embeddings(self) -> OutputHead:
        return OutputHead(self.model)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_emb

    def add_model_tags(self, tags: str | list[str]) -> None:
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    # ---- TrainingArguments(gradient_checkpointing=True); transformers 5 calls it activation checkpointing
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs or every_n_layers != 1 or offload:
            raise LmstackError(f"activation checkpointing with kwargs={activation_checkpointing_kwargs}, "
                               f"every_n_layers={every_n_layers}, offload={offload}: our blocks checkpoint every "
                               "layer, non-reentrantly, in memory, with no options")
        self.model.checkpoint_blocks = True

    def activation_checkpointing_disable(self) -> None:
        self.model.checkpoint_blocks = False

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.model.checkpoint_blocks

    # TRL 1.16 still calls the pre-5.0 names
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    gradient_checkpointing_disable = activation_checkpointing_disable
    is_gradient_checkpointing = is_activation_checkpointing

    # ---- saving
    def get_extra_state(self) -> torch.Tensor:
        return encode_config(self.model.config)

    def set_extra_state(self, state: torch.Tensor) -> None:
        # A resumed Trainer checkpoint must be of this very architecture, not merely of matching shapes.
        saved = decode_config(state, "the checkpoint")
        if to_dict(saved) != to_dict(self.model.config):
            raise LmstackError("the checkpoint was saved from a model with another config than this one")

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        tokenizer: Any = None) -> None:
        """An HF-layout directory (config.json, model.safetensors, ...), as lmstack.save_model writes."""
        if state_dict is not None:
            state_dict = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
        save_model(self.model, save_directory, tokenizer=tokenizer, state_dict=state_dict)
