"""Compressive Transformer memory (Rae et al. 2020) on top of Transformer-XL's segment recurrence (xl.py).

Each layer keeps two memories of its attention inputs (hidden states), both detached:
- the memory: the last mem_len states, exactly as Transformer-XL keeps them;
- the compressed memory: cmem_len slots, FIFO. States that fall out of the memory are not dropped but
  compressed, `rate` of them into one slot, by the layer's compression function (`Compressor`): a strided
  1-d convolution (kernel = stride = rate, d_model -> d_model, learned) or mean / max pooling.
A segment attends over [compressed; memory; segment] causally. Positions continue across all three in one
local frame (compressed slots at 0..c-1, memory at c..c+m-1, the segment after), so RoPE and ALiBi see
offsets, as in xl.py. A token's reach is mem_len + cmem_len * rate states back per layer, at a cost of only
cmem_len extra keys. When a segment's eviction is not a whole number of groups, the leftover states (fewer
than `rate`) wait for the next eviction, so the compressed memory always holds floor(evicted / rate) slots
(capped at cmem_len).

Training the compression. The memories are detached and the model's loss never reaches the compressor;
it learns only from the paper's attention-reconstruction loss: for each layer, when states `old` are
compressed, the layer's content-based attention (no positions) of the current segment's queries over
`old` versus over `compress(old)`, mean squared error of the two outputs. The hidden states and the
layer's q/k/v weights are stop-gradiented there (the weights through a functional call with detached
copies), so this loss trains the compressor alone. `memory.aux_loss` holds it after each segment, averaged
over the layers that compressed and weighted by cfg.cmem_loss_coef, and zero when nothing was compressed. By
default it is built only when it can train something (gradients on and a learned compressor: not at
inference, not for mean/max pooling); `recon_loss=True` builds it always, as a measurement. The learned convolution starts as mean pooling, so
an untrained compressor already keeps the gist of its group instead of a random projection of it.

Usage:
    compressor = attach_compressor(model)          # model.cmem_compress (built by the model when memory='compressive')
    memory = CompressiveMemory(model, mem_len=64, cmem_len=32, rate=2)
    with memory.attach():
        for segment in ids.split(64, dim=1):
            logits = model(segment, cache=memory)
            loss = task_loss(logits) + memory.aux_loss          # the reconstruction loss trains the compressor
    logits, loss = compressive_forward(model, ids, seg_len=64, targets=targets)   # the same, in one call
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lmstack.errors import LmstackError
from lmstack.model.attention import Attention
from lmstack.model.memory.running import check_segment_call, run_segments, segment_loss
from lmstack.model.memory.xl import XLMemory, _check_model, _project_kv
from lmstack.model.positions import apply_rotary

COMPRESSION_FNS = ("conv", "mean", "max")


class Compressor(nn.Module):
    """The compression function of every layer: (B, N, d_model) states, N a multiple of rate -> (B, N / rate, d)."""

    def __init__(self, cfg, fn: str | None = None, rate: int | None = None):
        super().__init__()
        self.fn = cfg.cmem_fn if fn is None else fn
        self.rate = cfg.cmem_rate if rate is None else rate
        if self.fn not in COMPRESSION_FNS:
            raise LmstackError(f"unknown compression function cmem_fn={self.fn!r}; choose one of {COMPRESSION_FNS}")
        if self.rate < 1:
            raise LmstackError(f"cmem_rate must be >= 1 (states per compressed slot), got {self.rate}")
        self.n_layers, d = cfg.n_layers, cfg.d_model
        self.convs = None
        if self.fn == "conv":
            self.convs = nn.ModuleList(nn.Conv1d(d, d, kernel_size=self.rate, stride=self.rate)
                                       for _ in range(cfg.n_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each convolution starts as mean pooling (identity over channels, 1/rate per tap, no bias)."""
        for conv in self.convs or ():
            conv.weight.zero_()
            conv.weight.diagonal(dim1=0, dim2=1).fill_(1.0 / self.rate)  # weight[o, o, :] = 1 / rate
            conv.bias.zero_()

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        if n % self.rate:
            raise LmstackError(f"the compressor takes whole groups of rate={self.rate} states, got {n}")
        if self.convs is not None:
            conv = self.convs[layer]
            return conv(h.transpose(1, 2).to(conv.weight.dtype)).transpose(1, 2).to(h.dtype)
        groups = h.view(b, n // self.rate, self.rate, d)
        return groups.mean(2) if self.fn == "mean" else groups.amax(2)


def attach_compressor(model: nn.Module, fn: str | None = None, rate: int | None = None) -> Compressor:
    """model.cmem_compress, built (fn and rate from model.config unless given) when the model has none yet;
    an existing one is returned after checking it has the asked fn and rate."""
    existing = getattr(model, "cmem_compress", None)
    if existing is not None:
        for name, want in (("fn", fn), ("rate", rate)):
            if want is not None and getattr(existing, name) != want:
                raise LmstackError(f"the model's compressor has {name}={getattr(existing, name)!r} but {want!r} was "
                                   f"asked; use the model's (model.config.cmem_{'fn' if name == 'fn' else 'rate'})")
        return existing
    ref = next(model.parameters())
    model.cmem_compress = Compressor(model.config, fn, rate).to(device=ref.device, dtype=ref.dtype)
    return model.cmem_compress


class _Projections(nn.Module):
    """Holds an Attention so that torch.func.functional_call can run its projections with detached weights."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.attn = attn

    def forward(self, h: torch.Tensor, with_q: bool = False):
        attn = self.attn
        k, v = _project_kv(attn, h)
        if not with_q:
            return k, v
        b, t, _ = h.shape
        fused = attn.qkv_proj
        q = fused(h).split(fused.split_sizes(), dim=-1)[0] if fused is not None else attn.q_proj(h)
        q = q.view(b, t, -1, attn.head_dim).transpose(1, 2)
        return (q if attn.q_norm is None else attn.q_norm(q)), k, v


def _content_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over every key, GQA heads shared: (B, H, T, D)."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(v.dtype) @ v


def reconstruction_loss(attn: Attention, h: torch.Tensor, old: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """The attention-reconstruction loss of one layer: MSE between the content-based attention of the queries
    of h over `old` and over `compressed`. Only `compressed` (hence the compressor) gets gradient."""
    proj = _Projections(attn)
    with torch.no_grad():  # the target: nothing in it takes gradient, so the module's own weights serve
        q, k_old, v_old = proj(h, with_q=True)
        want = _content_attention(q, k_old, v_old, attn.scale)
    # the compressed branch: gradient flows into `compressed`, not into the layer's weights (detached copies)
    frozen = {f"attn.{name}": p.detach() for name, p in attn.named_parameters()}
    k_c, v_c = functional_call(proj, frozen, (compressed,))
    got = _content_attention(q, k_c, v_c, attn.scale)
    return F.mse_loss(got.float(), want.float())


class CompressiveMemory(XLMemory):
    """Per-layer memory (mem_len states) plus compressed memory (cmem_len slots, FIFO), both detached; an
    AttentionCache for model(ids, cache=...). Sizes default to model.config's mem_len, cmem_len, cmem_rate.

    Reuses XLMemory's hook (`attach()`), batch checks and the memory itself; what it adds is the compressed
    memory in front of the keys and the compression of what the memory evicts."""

    def __init__(self, model: nn.Module, mem_len: int | None = None, cmem_len: int | None = None,
                 rate: int | None = None, recon_loss: bool | None = None):
        cfg = model.config
        _check_model(cfg)
        mem_len = cfg.mem_len if mem_len is None else mem_len
        cmem_len = cfg.cmem_len if cmem_len is None else cmem_len
        if cmem_len < 1:
            raise LmstackError(f"cmem_len must be >= 1 (compressed slots per layer), got {cmem_len}; set "
                               "ModelConfig.cmem_len or pass cmem_len=")
        if mem_len < 0:
            raise LmstackError(f"mem_len must be >= 0, got {mem_len}")
        if mem_len + cmem_len >= cfg.max_seq_len:
            raise LmstackError(f"mem_len={mem_len} + cmem_len={cmem_len} leave no room for a segment in the model's "
                               f"max_seq_len={cfg.max_seq_len} window (memories + segment must fit in it); lower them")
        super().__init__(model, mem_len)
        self.compressor = attach_compressor(model, rate=rate)
        self.rate, self.cmem_len = self.compressor.rate, cmem_len
        self.loss_coef = cfg.cmem_loss_coef
        # None: build the reconstruction loss when it can train something (gradients on, a learned compressor);
        # True: always, as a measurement (mean/max pooling, or under no_grad); False: never.
        self.recon_loss = recon_loss
        self.cmem: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.waiting: list[torch.Tensor | None] = [None] * cfg.n_layers  # evicted, < rate, not compressed yet
        self.clength = 0   # compressed slots held (the same in every layer)
        self.evicted = 0   # states the memory has evicted so far (per layer)
        self.aux_loss = torch.zeros(())
        self._attns: dict[int, Attention] = {}

    def reset(self) -> None:
        super().reset()
        self.cmem = [None] * len(self.cmem)
        self.waiting = [None] * len(self.waiting)
        self.clength = self.evicted = 0
        self.aux_loss = torch.zeros(())
        self._attns.clear()

    # ---- the AttentionCache contract
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._attached:
            raise LmstackError("CompressiveMemory needs the layers' attention inputs: run the model inside "
                               "`with memory.attach():` (or use compressive_forward)")
        held = self.clength + self.length
        if held + t > self.max_len:
            raise LmstackError(f"compressed memory ({self.clength}) + memory ({self.length}) + segment ({t}) = "
                               f"{held + t} positions exceed the model's max_seq_len={self.max_len}; use shorter "
                               "segments or smaller mem_len / cmem_len")
        device = next((m.device for m in self.memory + self.cmem if m is not None), None)
        k_pos = torch.arange(held + t, device=device)
        return k_pos[held:], k_pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        x = self._inputs.pop(layer, None)
        if x is None:
            raise LmstackError(f"CompressiveMemory got no attention input for layer {layer}: run the model inside "
                               "`with memory.attach():` (or use compressive_forward)")
        parts = [m for m in (self.cmem[layer], self.memory[layer]) if m is not None]
        if parts:
            if parts[0].shape[0] != x.shape[0]:
                raise LmstackError(f"the memory holds batch size {parts[0].shape[0]} but this segment has "
                                   f"{x.shape[0]}; call memory.reset() before a new batch")
            held = torch.cat(parts, dim=1).to(x.dtype) if len(parts) > 1 else parts[0].to(x.dtype)
            k_mem, v_mem = _project_kv(attn, held)
            if ctx.cos_q is not None:  # RoPE: rotate the held keys at their slots 0..c+m-1
                cos, sin = ctx.rope_k()
                k_mem = apply_rotary(k_mem, cos[:held.shape[1]], sin[:held.shape[1]])
            k, v = torch.cat((k_mem, k), dim=2), torch.cat((v_mem, v), dim=2)
        self._pending[layer] = x
        self._attns[layer] = attn
        return attn.attend_all(q, k, v, ctx, layer)

    def advance(self, t: int) -> None:
        # Every layer has read the old memories: slide the memory, compress what it evicts, score the compression.
        want_loss = self.recon_loss
        if want_loss is None:
            want_loss = torch.is_grad_enabled() and any(p.requires_grad for p in self.compressor.parameters())
        losses = []
        n_out = 0
        for layer, x in self._pending.items():
            old = self.memory[layer]
            held = x if old is None else torch.cat((old, x), dim=1)
            n_out = max(held.shape[1] - self.mem_len, 0)
            self.memory[layer] = held[:, n_out:].detach() if self.mem_len else None
            if not n_out:
                continue
            wait = held[:, :n_out].detach()
            if self.waiting[layer] is not None:
                wait = torch.cat((self.waiting[layer], wait), dim=1)
            whole = wait.shape[1] // self.rate * self.rate
            self.waiting[layer] = wait[:, whole:] if whole < wait.shape[1] else None
            if not whole:
                continue
            squeezed = self.compressor(layer, wait[:, :whole])
            if want_loss:
                losses.append(reconstruction_loss(self._attns[layer], x, wait[:, :whole], squeezed))
            cm = squeezed.detach() if self.cmem[layer] is None else torch.cat((self.cmem[layer], squeezed.detach()), 1)
            self.cmem[layer] = cm[:, max(cm.shape[1] - self.cmem_len, 0):]
        if self._pending:
            self.evicted += n_out
            self.clength = min(self.evicted // self.rate, self.cmem_len)
        self._pending.clear()
        self._attns.clear()
        self.length = min(self.length + t, self.mem_len)
        self.aux_loss = self.loss_coef * torch.stack(losses).mean() if losses else torch.zeros(())

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.memory + self.cmem + self.waiting if m is not None)


def compressive_forward(model: nn.Module, ids: torch.Tensor, seg_len: int, targets: torch.Tensor | None = None,
                        memory: CompressiveMemory | None = None,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ids (B, T) segment by segment with a compressive memory: (logits (B, T, vocab), loss or None).

    `memory` defaults to CompressiveMemory(model) (sizes from model.config); pass one to carry it across
    calls. The loss is the mean cross-entropy over targets != ignore_index plus, averaged over segments,
    the model's auxiliary loss and the memory's attention-reconstruction loss (memory.aux_loss)."""
    check_segment_call(ids, seg_len, targets)
    memory = CompressiveMemory(model) if memory is None else memory
    window = memory.mem_len + memory.cmem_len + seg_len
    if window > memory.max_len:
        raise LmstackError(f"mem_len={memory.mem_len} + cmem_len={memory.cmem_len} + seg_len={seg_len} = {window} "
                           f"exceed the model's max_seq_len={memory.max_len}, the window one segment attends; "
                           "lower one of them")
    logits, aux = run_segments(model, ids, seg_len, memory)
    if targets is None:
        return logits, None
    return logits, segment_loss(logits, targets, ignore_index) + aux
