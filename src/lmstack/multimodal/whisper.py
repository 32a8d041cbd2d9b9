"""A Whisper-style encoder-decoder speech recogniser (Radford et al. 2022), sized for a CPU.

Encoder: log-mel (n_mels, frames) -> conv1 (k3) + GELU -> conv2 (k3, stride 2) + GELU -> Whisper's sinusoidal
positions -> the ONE lmstack `Transformer` as a bidirectional encoder (ModelConfig(causal=False, head="none"),
pre-norm LayerNorm with bias, GELU MLP, biased projections) -> its final LayerNorm.

Decoder: token + learned positions, then per block self-attention (causal), cross-attention to the encoder
output, MLP (each pre-norm with a residual), a final LayerNorm and an output layer tied to the token embedding.
The block is built here from lmstack's MLP and LayerNorm because the Transformer's blocks have no
cross-attention sublayer, and its `layer_hook` runs before a block, which would put cross-attention ahead of
self-attention (Whisper's order is self, cross, MLP: transformers' weights would not carry over). The small
attention below is Whisper's: q, v and out projections with bias, k without.

Decoding is not quadratic: `DecoderState` keeps each layer's self-attention K/V in a preallocated buffer (one
token appended per step) and the cross-attention K/V of the encoder output, computed once per utterance.
`reorder` picks rows for beam search.

Word timestamps (opt-in): `decode_with_cross_weights` is `decode` with the cross-attention computed explicitly
(softmax(q k^T / sqrt(d)) v) so its weights come back; asr_timing aligns them to the audio. The SDPA path above
is unchanged.

Batches of different lengths: `encode(mel, frames)` masks the padded encoder positions, both in the encoder's
self-attention and in the decoder's cross-attention, so a padded row gives the same output as alone.

Usage:
    from lmstack.multimodal.whisper import WhisperConfig, Whisper
    model = Whisper(WhisperConfig(d_model=64, n_heads=2, n_encoder_layers=2, n_decoder_layers=2, vocab_size=100))
    logits = model(mel, tokens)                          # mel (B, 80, frames), tokens (B, L) -> (B, L, vocab)
    enc, mask = model.encode(mel, frames)                # frames: (B,) real mel frames per row, or None
    state = model.new_state(enc, mask, max_len=64)
    logits = model.step(prompt, state)                   # prefill, then one token at a time
    logits, weights = model.decode_with_cross_weights(tokens, enc, mask)  # + per block (B, heads, L, S)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.mlp import MLP
from lmstack.runtime.validation import check_range, need


@dataclass
class WhisperConfig:
    n_mels: int = 80
    """Mel bands of the input features (audio.log_mel gives 80, Whisper's)."""
    n_audio_ctx: int = 300
    """Encoder positions (mel frames / 2); 300 positions = 6 s of audio (Whisper: 1500 = 30 s)."""
    d_model: int = 128
    """Width of encoder and decoder."""
    n_heads: int = 4
    """Attention heads in every attention."""
    n_encoder_layers: int = 4
    """Encoder blocks."""
    n_decoder_layers: int = 2
    """Decoder blocks (self-attention, cross-attention, MLP)."""
    vocab_size: int = 100
    """Token ids of the decoder (the asr tokenizer's size)."""
    n_text_ctx: int = 128
    """Longest token sequence the decoder reads (learned positions), prompt included."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model (Whisper's)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""

    def __post_init__(self):
        for name in ("n_mels", "n_audio_ctx", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                     "vocab_size", "n_text_ctx"):
            check_range(name, getattr(self, name), low=1)
        check_range("d_ff", self.d_ff, low=0)
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not self.d_ff:
            self.d_ff = 4 * self.d_model

    @property
    def max_frames(self) -> int:
        """Longest mel input (frames): conv2's stride halves it to n_audio_ctx."""
        return 2 * self.n_audio_ctx

    def encoder_config(self) -> ModelConfig:
        """The one Transformer as Whisper's encoder: bidirectional, pre-norm LayerNorm, GELU, biases."""
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_layers=self.n_encoder_layers, n_heads=self.n_heads,
                           d_ff=self.d_ff, max_seq_len=self.n_audio_ctx, norm="layernorm", norm_eps=self.layer_norm_eps,
                           position="none", causal=False, qkv_bias=True, out_bias=True, mlp="gelu", mlp_bias=True,
                           head="none", tie_embeddings=False, dropout=0.0)

    def mlp_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, mlp="gelu",
                           mlp_bias=True, head="none")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder positions: (length, channels), sines in the first half of the channels, cosines after."""
    need(channels % 2 == 0 and channels >= 4, f"sinusoidal positions need an even width >= 4, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class WhisperAttention(nn.Module):
    """Multi-head attention with Whisper's biases (q, v, out; none on k), for self- or cross-attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool = False) -> torch.Tensor:
        q = self.heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def attend_weights(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` without a causal mask, computed explicitly: (output, the weights (B, heads, t, keys)).
        The opt-in path of word timestamps; `attend` (SDPA) stays the fast default."""
        q = self.heads(self.q_proj(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1)
        out = weights @ v
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1)), weights


class DecoderBlock(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.self_attn = WhisperAttention(cfg.d_model, cfg.n_heads)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.cross_attn = WhisperAttention(cfg.d_model, cfg.n_heads)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.mlp_config())


class DecoderState:
    """What decoding one batch of utterances keeps: per layer the cross K/V (computed once) and a self-attention
    K/V buffer of max_len positions, filled left to right."""

    def __init__(self, cross: list[tuple[torch.Tensor, torch.Tensor]], enc_mask: torch.Tensor | None,
                 n_heads: int, head_dim: int, max_len: int):
        self.cross, self.max_len, self.length = cross, max_len, 0
        b, dtype, device = cross[0][0].shape[0], cross[0][0].dtype, cross[0][0].device
        self.cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
        self.keys = [torch.zeros(b, n_heads, max_len, head_dim, dtype=dtype, device=device) for _ in cross]
        self.values = [torch.zeros_like(k) for k in self.keys]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and duplicate) the given batch rows, as beam search needs after each step."""
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, rows)


class Whisper(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        cfg = self.config = config
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("audio_pos", sinusoids(cfg.n_audio_ctx, cfg.d_model), persistent=False)
        self.encoder = Transformer(cfg.encoder_config())
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_text_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        for module in [self.tok_emb, self.pos_emb, *self.blocks.modules()]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ---- encoder
    def front_end(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_mels, frames) -> (B, ceil(frames / 2), d_model) with positions added. With `frames` (B,) the
        first conv's outputs past each row's end are zeroed, as the second conv's zero padding sees alone."""
        cfg = self.config
        if mel.dim() != 3 or mel.shape[1] != cfg.n_mels:
            raise LmstackError(f"mel features must have shape (batch, n_mels={cfg.n_mels}, frames), "
                               f"got {tuple(mel.shape)}")
        if mel.shape[2] > cfg.max_frames:
            raise LmstackError(f"{mel.shape[2]} mel frames is over the model's limit of {cfg.max_frames} "
                               f"({cfg.max_frames / 100:g} s); cut the audio")
        h = F.gelu(self.conv1(mel))
        if frames is not None:
            h = h * (torch.arange(h.shape[2], device=h.device)[None, :] < frames.to(h.device)[:, None])[:, None]
        x = F.gelu(self.conv2(h)).transpose(1, 2)
        return x + self.audio_pos[: x.shape[1]].to(x.dtype)

    def encode(self, mel: torch.Tensor, frames: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder output (B, S, d) and its key mask (B, S) (True = a real position), None when unpadded."""
        x = self.front_end(mel, frames)
        mask = None
        if frames is not None:
            valid = (frames.to(x.device) + 1) // 2  # conv2 (stride 2, padding 1) maps f frames to ceil(f/2)
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
            if bool(mask.all()):
                mask = None
        return self.encoder(inputs_embeds=x, attention_mask=mask), mask

    # ---- decoder
    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        end = start + tokens.shape[1]
        if end > self.config.n_text_ctx:
            raise LmstackError(f"the decoder reads at most n_text_ctx={self.config.n_text_ctx} tokens, got {end}")
        return self.tok_emb(tokens) + self.pos_emb.weight[start:end]

    def decode(self, tokens: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab) of whole token sequences (training, scoring)."""
        x = self._embed(tokens, 0)
        cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
        for block in self.blocks:
            h = block.self_attn_norm(x)
            x = x + block.self_attn.attend(h, *block.self_attn.kv(h), None, causal=True)
            h = block.cross_attn_norm(x)
            x = x + block.cross_attn.attend(h, *block.cross_attn.kv(enc), cross_mask)
            x = x + block.mlp(block.mlp_norm(x))
        return self.head(self.final_norm(x))

    def decode_with_cross_weights(self, tokens: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`decode` that also returns every block's cross-attention weights, (B, heads, L, S) per block
        (padded encoder positions get weight 0): the teacher-forced pass behind word timestamps (asr_timing)."""
        x = self._embed(tokens, 0)
        cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
        weights = []
        for block in self.blocks:
            h = block.self_attn_norm(x)
            x = x + block.self_attn.attend(h, *block.self_attn.kv(h), None, causal=True)
            h = block.cross_attn_norm(x)
            out, w = block.cross_attn.attend_weights(h, *block.cross_attn.kv(enc), cross_mask)
            x = x + out
            weights.append(w)
            x = x + block.mlp(block.mlp_norm(x))
        return self.head(self.final_norm(x)), weights

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.tok_emb.weight.t()  # tied output embedding

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        enc, mask = self.encode(mel, frames)
        return self.decode(tokens, enc, mask)

    # ---- incremental decoding
    def new_state(self, enc: torch.Tensor, enc_mask: torch.Tensor | None = None, max_len: int | None = None
                  ) -> DecoderState:
        """Cross K/V of the encoder output for every layer, computed once, plus empty self-attention buffers."""
        max_len = max_len or self.config.n_text_ctx
        cross = [block.cross_attn.kv(enc) for block in self.blocks]
        head_dim = self.config.d_model // self.config.n_heads
        return DecoderState(cross, enc_mask, self.config.n_heads, head_dim, min(max_len, self.config.n_text_ctx))

    def step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Logits (B, t, vocab) of the next t tokens given what `state` holds; appends them to the state."""
        start, t = state.length, tokens.shape[1]
        end = start + t
        if end > state.max_len:
            raise LmstackError(f"the decoder state holds {state.max_len} tokens; {end} asked")
        x = self._embed(tokens, start)
        mask = None
        if t > 1:  # a prefill: each new token sees the cache and the new tokens up to itself
            q_pos = torch.arange(start, end, device=x.device)
            mask = torch.arange(end, device=x.device)[None, :] <= q_pos[:, None]
        for i, block in enumerate(self.blocks):
            h = block.self_attn_norm(x)
            k, v = block.self_attn.kv(h)
            state.keys[i][:, :, start:end] = k
            state.values[i][:, :, start:end] = v
            x = x + block.self_attn.attend(h, state.keys[i][:, :, :end], state.values[i][:, :, :end], mask)
            h = block.cross_attn_norm(x)
            x = x + block.cross_attn.attend(h, *state.cross[i], state.cross_mask)
            x = x + block.mlp(block.mlp_norm(x))
        state.length = end
        return self.head(self.final_norm(x))

    def num_parameters(self) -> int:
        """Parameters that compute something (the encoder Transformer's unused 1-row token table left out)."""
        return sum(p.numel() for p in self.parameters()) - self.encoder.tok_emb.weight.numel()


__all__ = ["WhisperConfig", "Whisper", "WhisperAttention", "DecoderState", "sinusoids"]
