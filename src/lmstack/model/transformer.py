"""The one Transformer class. Every family (llama, mistral, mixtral, qwen2/3, gemma/gemma2, phi3, gpt2, bert) is a
ModelConfig.

A block is attention + MLP (or MoE) with pre-norm, post-norm, sandwich (Gemma-2) or parallel residuals. Blocks can be
shared across layers (ALBERT). A Mixture-of-Depths block (RoutedBlock, mixture_of_depths.py) runs on the
top-k tokens its router picks. The model returns logits (B, T, vocab), or hidden states for
encoders without an LM head.

Usage:
    from lmstack.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    logits = model(idx)                                   # (B, T, vocab)
    cache = model.new_cache(batch_size=1, max_len=64)
    logits = model(prompt, cache=cache)                   # prefill, then one token at a time
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + model.aux_loss   # MoE / MoD router losses
    out = model(input_ids=idx, attention_mask=mask, labels=idx)   # HF style: out.loss, out.logits (model/outputs.py)
    model.fuse_projections()                              # one qkv_proj / gate_up_proj matmul (same numbers)

A cache is any AttentionCache (attention_cache.py): the model's own KVCache/SinkCache, or one a caller
brings (a serving engine's paged pool). The same forward and block math serve training, `generate` and
the engine; the decode step (T = 1 with a cache) is kept cheap: RoPE tables are looked up once per
forward, masks are built only when a layer's attention asks for them, fp32 RMSNorm is one fused op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.errors import LmstackError
from lmstack.model.linear import Linear, linear
from lmstack.model.attention import Attention
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.config import ModelConfig
from lmstack.model.fused_projections import fuse_module, unfuse_module
from lmstack.model.kv_cache import KVCache, SinkCache
from lmstack.model.masks import AttentionMask, mask_for
from lmstack.model.mixture_of_depths import MoDRouter
from lmstack.model.memory.compressive import Compressor
from lmstack.model.memory.knn import KNNGate
from lmstack.model.memory.segments import segment_forward
from lmstack.model.mlp import ACTIVATIONS, MLP
from lmstack.model.moe import MoE
from lmstack.model.mup import mup_init_, output_mult
from lmstack.model.norms import make_norm
from lmstack.model.outputs import CausalLMOutput, causal_lm_loss
from lmstack.model.positions import RotaryEmbedding, SinusoidalPositions, alibi_slopes
from lmstack.model.vocab import mask_padded_logits, real_vocab


class ForwardContext:
    """What every layer of one forward pass shares: positions, RoPE tables, masks, ALiBi slopes, cache."""

    def __init__(self, model: "Transformer", q_pos, k_pos, cache, doc_ids, key_padding, prefix_len=None):
        self.cfg, self.cache = model.config, cache
        self.q_pos, self.k_pos = q_pos, k_pos
        self.slopes = model.alibi_slopes if model.config.position == "alibi" else None
        self._rope = model.rope
        self.cos_q = self.sin_q = self.cos_t = self.sin_t = None
        if model.rope is not None:  # one table lookup per forward, shared by every layer
            self.cos_q, self.sin_q = model.rope(q_pos)
            self.cos_t, self.sin_t = self.cos_q[:, None], self.sin_q[:, None]  # (T, 1, D): for (B, T, H, D) heads
        self._doc, self._padding, self._prefix = doc_ids, key_padding, prefix_len
        # A cache that puts keys of its own in front (prefix tuning) says which documents see them.
        self._doc_k = cache.key_doc_ids(doc_ids) if doc_ids is not None and cache is not None else doc_ids
        self.has_batch_rules = doc_ids is not None or key_padding is not None or prefix_len is not None
        self._masks: dict[int, AttentionMask] = {}

    def rope_k(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rope(self.k_pos)

    def mask(self, layer: int) -> AttentionMask:
        window = self.cfg.window_for_layer(layer)
        n_sink = 0
        if self.cache is not None and self.cache.window:
            window = min(w for w in (window, self.cache.window) if w)
            n_sink = self.cache.n_sink
        if window not in self._masks:
            self._masks[window] = mask_for(self.cfg, self.q_pos, self.k_pos, window, n_sink=n_sink,
                                           doc_q=self._doc, doc_k=self._doc_k, key_padding=self._padding,
                                           prefix_len=self._prefix)
        return self._masks[window]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.norm_position, self.parallel = cfg.norm_position, cfg.parallel_residual
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)
        if cfg.norm_position == "sandwich":  # Gemma 2: each sublayer's output is normed before the residual add
            self.attn_post_norm = make_norm(cfg, cfg.d_model)
            self.mlp_post_norm = make_norm(cfg, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        # an inactive dropout is skipped, not called: at inference it is two no-op calls per layer
        drop = self.drop if self.training and self.drop.p else _keep
        if self.parallel:
            return x + drop(self.attn(self.attn_norm(x), ctx, layer)) + drop(self.mlp(self.mlp_norm(x)))
        if self.norm_position == "post":
            x = self.attn_norm(x + drop(self.attn(x, ctx, layer)))
            return self.mlp_norm(x + drop(self.mlp(x)))
        if self.norm_position == "sandwich":
            x = x + drop(self.attn_post_norm(self.attn(self.attn_norm(x), ctx, layer)))
            return x + drop(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))
        x = x + drop(self.attn(self.attn_norm(x), ctx, layer))
        return x + drop(self.mlp(self.mlp_norm(x)))


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


class RoutedBlock(Block):
    """A Mixture-of-Depths block (mixture_of_depths.py): its router sends the top-k tokens of each sequence
    through the block above and lets the rest skip it. A subclass, so unrouted blocks pay nothing."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.router = MoDRouter(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        return self.router(super().forward, x, ctx, layer)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = self.config = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = None
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.position == "sinusoidal":
            self.pos_emb = SinusoidalPositions(cfg.d_model, cfg.max_seq_len)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg, cfg.d_model) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList((RoutedBlock if cfg.is_mod_layer(i) else Block)(cfg, i)
                                    for i in range(cfg.n_unique_layers or cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.d_model) if cfg.norm_position != "post" else None
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.lm_head = None
        if cfg.head in ("lm", "mlm") and not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.head == "mlm":  # BERT's prediction head: dense + activation + LayerNorm, then the decoder
            self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
            self.mlm_norm = make_norm(cfg, cfg.d_model)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.memory == "knn":  # the Memorizing Transformer's learned gate between memory and local attention
            self.knn_gate = KNNGate(cfg.n_heads)
        elif cfg.memory == "compressive":  # the compression function of evicted memories (per layer)
            self.cmem_compress = Compressor(cfg)
        self.checkpoint_blocks = False  # activation checkpointing: distributed.place_model switches it on
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    # ---- init
    def reset_parameters(self) -> None:
        cfg = self.config
        std = math.sqrt(2 / (5 * cfg.d_model)) if cfg.init == "small" else cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_in, 0.0, std)
                nn.init.normal_(module.w_out, 0.0, std)
        if cfg.init in ("gpt2", "small"):
            # Residual branches add up over 2 * n_layers sublayers; scaling their output projections keeps
            # the residual stream's variance independent of depth (GPT-2).
            scaled = std / math.sqrt(2 * cfg.n_layers)
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "w_out")):
                    nn.init.normal_(p, 0.0, scaled)
        if cfg.parametrization == "mup":  # width-scaled init, 1/m logits, 1/d attention (model/mup.py)
            mup_init_(self)

    def materialize_buffers(self, device: str | torch.device = "cpu") -> None:
        """Recompute the non-persistent buffers (RoPE tables, ALiBi slopes, sinusoidal table) on `device`.

        load_model builds the model on the meta device and assigns loaded weights; buffers are not in
        the checkpoint, so they are rebuilt here."""
        cfg = self.config
        with torch.device(device):
            if self.rope is not None:
                self.rope = RotaryEmbedding(cfg)
            if cfg.position == "alibi":
                self.alibi_slopes = alibi_slopes(cfg.n_heads)
            if cfg.position == "sinusoidal":
                self.pos_emb = SinusoidalPositions(cfg.d_model, cfg.max_seq_len)
            self.aux_loss = torch.zeros(())

    # ---- caches
    def new_cache(self, batch_size: int = 1, max_len: int | None = None, kind: str = "contiguous",
                  window: int | None = None, n_sink: int | None = None):
        """A KV cache for incremental decoding: kind 'contiguous' (max_len positions) or 'sink' (bounded)."""
        cfg = self.config
        if kind == "contiguous":
            p = next(self.parameters())
            return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len or cfg.max_seq_len,
                           dtype=p.dtype, device=p.device)
        if kind == "sink":
            if cfg.position in ("learned", "sinusoidal"):
                raise LmstackError(f"a sink cache re-assigns positions, which position={cfg.position!r} cannot do; "
                                   "use rope, alibi or none")
            return SinkCache(cfg.n_layers, window or cfg.sliding_window or cfg.max_seq_len // 2,
                             cfg.n_sink_tokens if n_sink is None else n_sink)
        raise LmstackError(f"unknown cache kind {kind!r}; choose 'contiguous' or 'sink'")

    # ---- forward
    def forward(self, idx: torch.Tensor | None = None, cache=None, *, doc_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None, logits_to_keep: int = 0,
                return_hidden: bool = False, input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                layer_hook=None) -> torch.Tensor | CausalLMOutput:
        """idx (B, T) token ids -> logits (B, T, vocab), or hidden states (B, T, d_model) for head='none'.

        HF style: input_ids=... as a keyword, or labels=..., returns a CausalLMOutput (.loss, .logits)
        with transformers' shifted next-token loss, so transformers' Trainer and TRL can drive the model.

        cache: a KVCache/SinkCache from new_cache(); the call appends T positions to it.
        doc_ids: (B, T) document ids of packed sequences; attention never crosses documents.
        attention_mask: (B, Tk) 1 for real tokens, 0 for padding keys.
        prefix_len: (B,) prefix-LM: the first prefix_len[b] tokens attend to each other bidirectionally.
        logits_to_keep: only compute logits for the last N positions (0 = all); saves work when decoding.
        inputs_embeds: (B, T, d_model) input vectors in place of ids (a VLM's image tokens spliced into text);
            position and type embeddings, scaling and the embedding norm still apply, as in transformers.
        layer_hook: hook(layer, x) -> x, run on the residual stream before each block (Flamingo's gated
            cross-attention layers sit there, multimodal/fusion.py).
        """
        cfg = self.config
        if sum(v is not None for v in (idx, input_ids, inputs_embeds)) != 1:
            raise LmstackError("pass the input once: model(ids), model(input_ids=ids) or model(inputs_embeds=x)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.d_model:
                raise LmstackError(f"inputs_embeds must have shape (batch, time, d_model={cfg.d_model}), "
                                   f"got {tuple(inputs_embeds.shape)}")
            if cfg.memory != "none":
                raise LmstackError(f"memory={cfg.memory!r} reads token ids segment by segment; it takes no "
                                   "inputs_embeds")
        if idx is None and inputs_embeds is None or labels is not None:  # the HF-style call, wrapped with its loss
            if labels is not None and (return_hidden or cfg.head == "none"):
                raise LmstackError("labels need logits from the LM head; this call returns hidden states")
            # self.forward, not self(...): module hooks (FSDP2's unshard/reshard) must fire once per call
            logits = self.forward(input_ids if idx is None else idx, cache, doc_ids=doc_ids,
                                  attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  prefix_len=prefix_len, logits_to_keep=logits_to_keep, return_hidden=return_hidden,
                                  inputs_embeds=inputs_embeds, layer_hook=layer_hook)
            loss = None if labels is None else causal_lm_loss(logits, labels, real_vocab(cfg))
            has_aux = cfg.mod_capacity > 0 or any(isinstance(block.mlp, MoE) for block in self.blocks)
            if loss is not None and has_aux:
                loss = loss + self.aux_loss  # already weighted by the routers' coefficients, as our Trainer adds it
            return CausalLMOutput(logits, loss, self.aux_loss if has_aux else None)
        if inputs_embeds is None and idx.dim() != 2:
            raise LmstackError(f"input ids must have shape (batch, time), got {tuple(idx.shape)}")
        b, t = idx.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = idx.device if inputs_embeds is None else inputs_embeds.device
        if cache is not None and not isinstance(cache, AttentionCache):
            raise LmstackError(f"cache must be an lmstack.model.attention_cache.AttentionCache (e.g. from "
                               f"model.new_cache()), got {type(cache).__name__}")
        if cfg.memory != "none" and cache is not None and not getattr(cache, "long_memory", False):
            raise LmstackError(f"memory={cfg.memory!r} model given a {type(cache).__name__}: it would run without its "
                               "memory, a different model; pass a memory (memory.segments.new_memory) or decode with "
                               "lmstack.model.memory.generate_with_memory")
        if cfg.memory != "none" and cache is None:
            # A memory model reads a long input segment by segment through a fresh memory (memory/segments.py).
            if doc_ids is not None or attention_mask is not None or prefix_len is not None:
                raise LmstackError(f"memory={cfg.memory!r} runs one document per row across segments; it takes no "
                                   "doc_ids, attention_mask or prefix_len (pad nothing, pack nothing)")
            x = segment_forward(self, idx)
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            return x if cfg.head == "none" or return_hidden else self.head(x)
        if cache is None:
            q_pos = k_pos = torch.arange(t, device=device)
        else:
            q_pos, k_pos = cache.positions(t)
            if q_pos.device != device:
                q_pos, k_pos = q_pos.to(device), k_pos.to(device)
        x = self.tok_emb(idx) if inputs_embeds is None else inputs_embeds
        if cfg.scale_embeddings:  # Gemma: sqrt(d_model), rounded to the weights' dtype as transformers does
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        if self.pos_emb is not None:
            if cfg.position == "learned" and int(q_pos[-1]) >= cfg.max_seq_len:
                raise LmstackError(f"position {int(q_pos[-1])} is past max_seq_len={cfg.max_seq_len}, "
                                   "the last learned position embedding; shorten the input")
            pos = q_pos
            if attention_mask is not None and cache is None:
                # Absolute positions count real tokens only, so a left-padded row embeds like an unpadded one
                # (RoPE and ALiBi are relative and need nothing).
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).to(device)
            x = x + self.pos_emb(pos)
        if self.type_emb is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros((b, t), dtype=torch.long,
                                                                                    device=device)
            x = x + self.type_emb(types)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        if self.training and self.drop.p:
            x = self.drop(x)
        padding = attention_mask.bool() if attention_mask is not None else None
        ctx = ForwardContext(self, q_pos, k_pos, cache, doc_ids, padding, prefix_len)
        aux = x.new_zeros((), dtype=torch.float32)
        blocks = list(self.blocks)  # (a list: indexing a ModuleList per layer costs a Python call)
        moe, mod = cfg.n_experts > 0, cfg.mod_capacity > 0
        for layer in range(cfg.n_layers):
            block = blocks[layer % len(blocks)]
            if layer_hook is not None:
                x = layer_hook(layer, x)
            if self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, ctx, layer, use_reentrant=False)
            else:
                x = block(x, ctx, layer)
            if moe and isinstance(block.mlp, MoE):
                aux = aux + block.mlp.aux_loss
            if mod and isinstance(block, RoutedBlock):
                aux = aux + block.router.aux_loss
        self.aux_loss = aux
        if cache is not None:
            cache.advance(t)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if cfg.head == "none" or return_hidden:
            return x
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> logits (..., vocab)."""
        cfg = self.config
        bias = None
        if cfg.head == "mlm":
            x = self.mlm_norm(ACTIVATIONS[cfg.mlp](self.mlm_dense(x)))
            bias = self.mlm_bias
        if self.lm_head is None or isinstance(self.lm_head, nn.Linear):
            weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
            logits = linear(x, weight, bias)  # the skinny kernel inside the engine's decode_kernels() scope
        else:  # a quantized head (compress.qlinear.QuantLinear) computes from its own codes
            logits = self.lm_head(x) if bias is None else self.lm_head(x) + bias
        if cfg.parametrization == "mup":  # µP's readout multiplier 1/m, before any soft cap
            logits = logits * output_mult(cfg)
        if cfg.final_logit_softcap:
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        # Padded rows (past real_vocab_size) get zero probability here, the one place every consumer passes.
        return mask_padded_logits(logits, cfg)

    def head_weight(self) -> torch.Tensor:
        """The (vocab, d_model) output matrix as floats: the tied embedding, the head's weight, or a quantized
        head's dequantized codes (then a fresh tensor, not a parameter); under µP times the readout multiplier."""
        if self.lm_head is None:
            weight = self.tok_emb.weight
        elif isinstance(self.lm_head, nn.Linear):
            weight = self.lm_head.weight
        else:
            weight = self.lm_head.weight_fp32()
        # µP's readout multiplier folded in (then a fresh tensor), so fused losses over this weight match head()
        return weight * output_mult(self.config) if self.config.parametrization == "mup" else weight

    # ---- layout of the projections
    def fuse_projections(self) -> "Transformer":
        """Convert in place to one qkv_proj per attention and one gate_up_proj per gated MLP (Phi-3's layout):
        the same numbers with fewer matmuls. The parts' weights are concatenated and freed, one module at a
        time, so no second copy of the model is kept. Sets config.fused_projections. Returns self."""
        if self.config.fused_projections:
            return self
        return self._set_layout(True)

    def unfuse_projections(self) -> "Transformer":
        """Convert back in place to separate q/k/v and gate/up Linears (what training adapters target)."""
        if not self.config.fused_projections:
            return self
        return self._set_layout(False)

    def _set_layout(self, fused: bool) -> "Transformer":
        if fused and self.config.attention == "lsh" and self.config.lsh_shared_qk:
            raise LmstackError("a shared-QK (attention='lsh', lsh_shared_qk) model has no k_proj to fuse")
        convert = fuse_module if fused else unfuse_module
        for name, module in list(self.named_modules()):  # a list: the loop replaces submodules
            prefix = f"{name}." if name else ""
            if isinstance(module, Attention):
                convert(module, "qkv_proj", prefix)
            elif isinstance(module, MLP) and module.gated:
                convert(module, "gate_up_proj", prefix)
        self.config = self.config.replace(fused_projections=fused)
        return self

    # ---- facts
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n
