"""Draft heads on the target's own hidden states (Medusa, EAGLE): speculative proposals without a second model.

The features are the target's top hidden states *after* its final norm: exactly the rows the engine's
runner computes before the LM head, so reading them costs nothing, and the target's frozen LM head turns a
(predicted) feature straight into a distribution with no extra norm to learn.

- medusa (Cai et al. 2024): K heads; head i maps the feature h_t of the last verified token t to a feature
  whose LM-head distribution is token t+i+1's: h + SiLU(W_i h + b_i). W_i starts at zero, so every head
  starts as the target's own next-token head. All K proposals come from one feature in one batched
  matmul and one LM-head matmul: no extra forward, no roll.
- eagle (Li et al. 2024): one decoder layer at the feature level. The input at position p is
  fc(concat(f_p, emb(x_{p+1}))) with emb the target's frozen token embedding; causal self-attention (RoPE
  over window positions) and a SwiGLU MLP give f^_{p+1}, and the LM head gives token p+2's distribution.
  Proposing rolls k steps: the predicted feature and the guessed token are the next input, their K/V
  appended to the window's. Attention sees the last `window` verified positions (no cache of its own
  across steps, so blocks, preemption and prefix caching need nothing extra).

Both are trained (draft_heads_train.py) on the frozen target's features and distributions over its own
training text; they live in a directory as heads.safetensors + heads.json, apart from the target.

A proposal vocabulary (`restrict(ids)`, e.g. the training stream's most frequent tokens: frequent_ids)
makes each greedy guess's LM-head matmul cover those rows only (FR-Spec, Zhao et al. 2025): at ~4-14M
target parameters the full head is as many bytes per guess as the EAGLE layer itself. It only narrows
what is proposed, never what is accepted, so output stays identical; sampled rows use the full head (q
must cover every token the target can sample).

Usage:
    heads = DraftHeads(HeadsConfig("medusa", d_model=256, vocab_size=4096, num_heads=4))
    heads.save("runs/heads"); heads = load_heads("runs/heads", target)     # checks d_model / vocab
    heads.restrict(frequent_ids(train_tokens, 1024, vocab_size))           # greedy guesses among these
    logits = target.head(heads.medusa(h))               # h (..., d) -> (..., K, vocab)
    f_next, kv = heads.eagle(x_in, kv=None, start=0)    # x_in = heads.eagle_input(feats, token_embeddings)
    llm = LLM(target, speculative={"method": "eagle", "heads": "runs/heads", "num_tokens": 4})
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmstack.config import atomic_write_text, from_dict
from lmstack.errors import LmstackError
from lmstack.model.linear import Linear  # nn.Linear that the engine's decode_kernels() scope runs on the skinny kernel

METHODS = ("medusa", "eagle")


@dataclass
class HeadsConfig:
    method: str = "medusa"
    """medusa (K parallel heads) or eagle (one autoregressive feature-level decoder layer)."""
    d_model: int = 256
    """The target's hidden size."""
    vocab_size: int = 4096
    """The target's vocabulary (the heads use its LM head and token embedding)."""
    num_heads: int = 4
    """medusa: heads, one per proposed token (the most tokens it can propose per step)."""
    n_heads: int = 4
    """eagle: attention heads of its decoder layer."""
    d_ff: int = 512
    """eagle: SwiGLU hidden size of its decoder layer."""
    window: int = 32
    """eagle: verified positions its attention sees when proposing (it is trained on windows this long)."""
    proposal_vocab: int = 0
    """Greedy guesses come from this many token ids (the proposal_ids buffer); 0: the whole vocabulary."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmstackError(f"draft heads method={self.method!r} is not allowed; choose 'medusa' or 'eagle'")
        if not isinstance(self.proposal_vocab, int) or not 0 <= self.proposal_vocab <= self.vocab_size:
            raise LmstackError(f"draft heads proposal_vocab must be in 0..vocab_size={self.vocab_size}, "
                               f"got {self.proposal_vocab!r}")
        for name in ("d_model", "vocab_size", "num_heads", "n_heads", "d_ff", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LmstackError(f"draft heads {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.method == "eagle" and self.d_model % (2 * self.n_heads):
            raise LmstackError(f"eagle: d_model={self.d_model} must split into n_heads={self.n_heads} even halves")


_ROPE: dict = {}  # (head_dim, dtype, device) -> (cos, sin) tables: a roll step should not rebuild them


def _rope(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rotary positions start.. on (B, heads, T, head_dim); window-relative, so only distances matter."""
    t, hd = x.shape[-2], x.shape[-1]
    key = (hd, x.dtype, x.device)
    if key not in _ROPE or _ROPE[key][0].shape[0] < start + t:
        n = max(256, 2 * (start + t))
        with torch.inference_mode(False):  # plain tensors: usable in training and in the engine alike
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
            ang = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv
            _ROPE[key] = (ang.cos().to(x.dtype), ang.sin().to(x.dtype))
    cos, sin = _ROPE[key][0][start:start + t], _ROPE[key][1][start:start + t]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class EagleLayer(nn.Module):
    """fc(concat(feature, embedding)) -> one pre-norm decoder layer -> the next position's feature. Its
    projections are lmstack Linear (nn.Linear's parameters and numbers; the skinny kernel inside the engine)."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.fc = Linear(2 * d, d)
        self.norm1, self.norm2, self.norm_out = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = Linear(d, 3 * d, bias=False)
        self.proj = Linear(d, d, bias=False)
        self.gate_up = Linear(d, 2 * cfg.d_ff, bias=False)
        self.down = Linear(cfg.d_ff, d, bias=False)

    def forward(self, feats: torch.Tensor, emb: torch.Tensor, kv: tuple | None = None, start: int = 0):
        """feats, emb (B, T, d) -> (predicted next features (B, T, d), (k, v) to extend later).
        kv: keys/values of earlier positions (the T new ones see all of them, and each other causally);
        start: the position of the first new one (RoPE only sees distances, so absolute positions work)."""
        x = self.fc(torch.cat([feats, emb], dim=-1))
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, start), _rope(k, start)
        mask = None
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
            if t > 1:  # new position i sees every earlier position and new ones up to i
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kv is None and t > 1)
        x = x + self.proj(o.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.norm_out(x), (k, v)


class DraftHeads(nn.Module):
    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        if cfg.method == "medusa":
            self.weight = nn.Parameter(torch.zeros(cfg.num_heads, d, d))  # zero: each head starts as the LM head
            self.bias = nn.Parameter(torch.zeros(cfg.num_heads, d))
        else:
            self.layer = EagleLayer(cfg)
        self.register_buffer("proposal_ids", torch.zeros(cfg.proposal_vocab, dtype=torch.long)
                             if cfg.proposal_vocab else None)  # None: not in the state dict

    def restrict(self, ids: torch.Tensor) -> "DraftHeads":
        """Greedy guesses only among these token ids (saved with the heads)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise LmstackError(f"proposal ids must be non-empty token ids below vocab_size={self.config.vocab_size}")
        self.config.proposal_vocab = ids.numel()
        self.proposal_ids = ids.clone()  # a registered buffer: saved with the heads
        return self

    @property
    def max_tokens(self) -> int:
        """Most guesses one proposal can make (medusa: its head count; eagle rolls as far as asked)."""
        return self.config.num_heads if self.config.method == "medusa" else 32

    def medusa(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> (..., K, d): head i's feature for the token i+1 places past the next one."""
        return h.unsqueeze(-2) + F.silu(torch.einsum("...d,kde->...ke", h, self.weight) + self.bias)

    def eagle(self, feats: torch.Tensor, emb: torch.Tensor, kv: tuple | None = None, start: int = 0):
        return self.layer(feats, emb, kv, start)

    def save(self, path: str | os.PathLike) -> Path:
        """heads.safetensors + heads.json, each written to a temp file and renamed into place."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".heads.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp)
            os.replace(tmp, path / "heads.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_text(path / "heads.json", json.dumps(asdict(self.config), indent=2) + "\n")
        return path


def frequent_ids(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent ids of a token stream, ascending (a proposal vocabulary for restrict)."""
    counts = torch.bincount(torch.as_tensor(tokens).flatten(), minlength=vocab_size)
    return counts.topk(min(n, vocab_size)).indices.sort().values


def load_heads(heads: Any, target: nn.Module) -> DraftHeads:
    """A heads directory or DraftHeads -> heads on the target's dtype/device, checked against its shape."""
    if isinstance(heads, (str, os.PathLike)):
        path = Path(heads)
        if not (path / "heads.json").is_file() or not (path / "heads.safetensors").is_file():
            raise LmstackError(f"draft heads directory {str(path)!r} has no heads.json + heads.safetensors "
                               "(train them with lmstack.infer.draft_heads_train.train_heads)")
        cfg = from_dict(HeadsConfig, json.loads((path / "heads.json").read_text()))
        module = DraftHeads(cfg)
        try:
            module.load_state_dict(load_file(path / "heads.safetensors"))
        except RuntimeError as e:
            raise LmstackError(f"draft heads in {str(path)!r} do not match their heads.json: {e}") from e
        heads = module
    elif not isinstance(heads, DraftHeads):
        raise LmstackError(f"heads must be a draft heads directory or DraftHeads, got {type(heads).__name__}")
    tc, hc = target.config, heads.config
    if hc.d_model != tc.d_model:
        raise LmstackError(f"the draft heads' d_model ({hc.d_model}) differs from the target's ({tc.d_model}); "
                           "heads are trained on one target's hidden states")
    if hc.vocab_size != tc.vocab_size:
        raise LmstackError(f"the draft heads' vocab_size ({hc.vocab_size}) differs from the target's "
                           f"({tc.vocab_size}); heads are trained on one target's vocabulary")
    p = next(target.parameters())
    heads = heads.to(device=p.device, dtype=p.dtype).eval()
    if heads.proposal_ids is not None:
        heads.proposal_ids = heads.proposal_ids.long()  # .to(dtype) leaves integer buffers alone; be sure
    return heads
