"""The model runner: one engine step as one forward pass over a flattened batch, with K/V in a paged pool.

Every scheduled sequence contributes its next chunk of tokens (a prompt chunk, a single decode token,
or a speculative window); the runner concatenates them into one (1, N) input, so the whole step is a
single model call whatever the mix (continuous batching with chunked prefill). One exception: a step
of a single sequence whose chunk is short and whose blocks are contiguous goes through FastDecoder
(fast_decode.py) when the config allows, the same math in fewer ops. The runner neither schedules nor
samples: the scheduler and block manager choose the batch and its blocks, the engine samples.

PagedKVCache is the cache object the model's attention layers see. It holds one preallocated pool
per K and V, shaped (layers, kv_heads, num_blocks * block_size, head_dim): a block is a run of
block_size slots, and a sequence's block table maps its positions to slots. Its `attend` hook (see
model/attention.py) writes the step's new K/V into their slots and computes attention:
- short chunks (at most SHORT_QUERY tokens that extend a context: decode tokens, speculative windows)
  are batched into one padded SDPA per layer: their keys are gathered from the pool into a padded
  (B, kv_heads, L, D) tensor; a single sequence whose blocks are contiguous reads the pool in place.
  GQA is done by folding the query heads of a group into rows, so K/V are never repeated. With a
  attention softcap or ALiBi they go one sequence at a time through the model's backend instead.
- prefill chunks go one sequence at a time through the model's own attention backend and mask
  rules (causal, sliding window, ALiBi, softcap), with keys gathered from the pool.
Logits are computed only for the flat rows the caller asks for (the last position, or every position for
prompt logprobs and speculative verification), in fp32 on the CPU, where sampling runs.

Usage:
    runner = ModelRunner(model, num_blocks=256, block_size=16)
    logits = runner.run([(seq, token_ids, first_position), ...], logit_rows)   # (len(logit_rows), vocab)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.infer.fast_decode import FastDecoder
from lmstack.infer.sequence import Sequence
from lmstack.infer.threads import threads_for
from lmstack.model.masks import AttentionMask


SHORT_QUERY = 16
"""Chunks of at most this many tokens that extend an existing context (decode steps, speculative
windows) are batched into one padded attention per layer; longer prompt chunks run one by one."""


@dataclass
class _Prefill:
    start: int  # first row of the chunk in the flat batch
    n: int
    positions: torch.Tensor  # (n,) positions of its queries
    ctx_len: int  # keys visible after this step: positions [0, ctx_len)
    key_slots: torch.Tensor | None  # (ctx_len,) slots, None when the chunk is the whole context


@dataclass
class _Short:
    """Short chunks batched together: B sequences, up to Tq queries each, up to L keys each."""

    rows: torch.Tensor  # (B, Tq) flat rows of the queries (padding repeats a real row)
    valid: torch.Tensor  # (B, Tq) bool: which of those are real
    q_pos: torch.Tensor  # (B, Tq) positions of the queries
    key_slots: torch.Tensor  # (B, L) slots of positions 0..L-1 (padding points at slot 0)
    contig: tuple[int, int] | None  # (first slot, L) when B == 1 and its blocks are contiguous
    out_rows: torch.Tensor  # (R,) = rows[valid]


@dataclass
class StepMeta:
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) where each new token's K/V goes
    short: _Short | None
    prefills: list[_Prefill]


class PagedKVCache:
    """The paged K/V pool plus the per-step metadata its attend() hook uses."""

    rotated_keys = True  # keys are stored after RoPE, so decoding never re-rotates them
    window = 0
    n_sink = 0

    def __init__(self, cfg, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.meta: StepMeta | None = None
        self.alibi = None

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    # ---- the protocol the Transformer calls
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.meta.positions, self.meta.positions

    def advance(self, t: int) -> None:
        pass

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) from src to dst."""
        bs = self.block_size
        for src, dst in pairs:
            self.k[:, :, dst * bs:(dst + 1) * bs] = self.k[:, :, src * bs:(src + 1) * bs]
            self.v[:, :, dst * bs:(dst + 1) * bs] = self.v[:, :, src * bs:(src + 1) * bs]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) for the flat batch -> attention output (1, H, N, D)."""
        m = self.meta
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(1, m.slots, k[0])
        vc.index_copy_(1, m.slots, v[0])
        window = self.cfg.window_for_layer(layer)
        out = torch.empty_like(q)
        if m.short is not None:
            sh = m.short
            if attn.softcap or self.alibi is not None:  # rare configs: one sequence at a time
                for b in range(sh.rows.shape[0]):
                    n = int(sh.valid[b].sum())
                    rows = sh.rows[b, :n]
                    length = int(sh.q_pos[b, n - 1]) + 1
                    out[:, :, rows] = self._one(q[:, :, rows], kc, vc, sh.key_slots[b, :length], sh.q_pos[b, :n],
                                                attn, window)
            else:
                out[0, :, sh.out_rows] = self._short(q, kc, vc, sh, attn.scale, window)
        for p in m.prefills:
            qs = q[:, :, p.start:p.start + p.n]
            if p.key_slots is None:  # the chunk is the whole context: use its own K/V directly
                ks, vs = k[:, :, p.start:p.start + p.n], v[:, :, p.start:p.start + p.n]
                k_pos = p.positions
            else:
                ks, vs = kc.index_select(1, p.key_slots)[None], vc.index_select(1, p.key_slots)[None]
                k_pos = torch.arange(p.ctx_len, device=kc.device)
            mask = AttentionMask(q_pos=p.positions, k_pos=k_pos, causal=True, window=window,
                                 block_size=self.cfg.attn_block_size)
            out[:, :, p.start:p.start + p.n] = attn.backend(qs, ks, vs, mask, attn.scale, slopes=self.alibi,
                                                            softcap=attn.softcap, **attn.backend_kwargs)
        return out

    def _short(self, q, kc, vc, sh: _Short, scale: float, window: int) -> torch.Tensor:
        """All short chunks in one SDPA; returns (H, R, D) for the real query rows."""
        b, tq = sh.rows.shape
        hkv, d = kc.shape[0], kc.shape[-1]
        if sh.contig is not None:
            s0, length = sh.contig
            keys, values = kc[None, :, s0:s0 + length], vc[None, :, s0:s0 + length]
        else:
            length = sh.key_slots.shape[1]
            flat = sh.key_slots.flatten()
            keys = kc.index_select(1, flat).view(hkv, b, length, d).transpose(0, 1)
            values = vc.index_select(1, flat).view(hkv, b, length, d).transpose(0, 1)
        k_pos = torch.arange(length, device=kc.device)
        visible = k_pos[None, None, :] <= sh.q_pos[:, :, None]  # (B, Tq, L): causal, and hides padding keys
        if window:
            visible &= k_pos[None, None, :] > sh.q_pos[:, :, None] - window
        h = q.shape[1]
        group = h // hkv
        # GQA without copying K/V: the `group` query heads of a KV head become extra query rows.
        qs = q[0][:, sh.rows]  # (H, B, Tq, D)
        qs = qs.permute(1, 0, 2, 3).reshape(b, hkv, group * tq, d)
        mask = None if (tq == 1 and sh.contig is not None and not window) else visible.repeat(1, group, 1)[:, None]
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale)
        o = o.view(b, h, tq, d).permute(1, 0, 2, 3)  # (H, B, Tq, D)
        return o[:, sh.valid]

    def _one(self, q, kc, vc, slots, q_pos, attn, window):
        mask = AttentionMask(q_pos=q_pos, k_pos=torch.arange(len(slots), device=kc.device), causal=True, window=window,
                             block_size=self.cfg.attn_block_size)
        return attn.backend(q, kc.index_select(1, slots)[None], vc.index_select(1, slots)[None], mask, attn.scale,
                            slopes=self.alibi, softcap=attn.softcap, **attn.backend_kwargs)


class ModelRunner:
    """Owns the model and its paged K/V pool. `run(batch, logit_rows)` runs one step of the scheduled
    sequences (each: the sequence with its block table, the token ids to run, their first position) and
    returns fp32 CPU logits for the flat rows asked for. Blocks are allocated by the block manager, not here."""

    def __init__(self, model, num_blocks: int, block_size: int, device: str | torch.device = "cpu",
                 fast_decode: bool = True, share_weights: bool = False):
        cfg = model.config
        if not cfg.causal or cfg.head != "lm":
            raise LmstackError("the inference engine needs a causal language model (causal=True, head='lm')")
        if cfg.attention != "softmax":
            raise LmstackError(f"attention={cfg.attention!r} has no KV cache; the engine needs softmax attention")
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype=p.dtype, device=p.device)
        self.cache.alibi = model.alibi_slopes if cfg.position == "alibi" else None
        self.block_size = block_size
        self.max_len = cfg.max_seq_len if cfg.position in ("learned", "sinusoidal") else None
        self.lora_context = None  # set by the engine when adapters are in use (lora_hook.py)
        self.fast = FastDecoder.build(model, self.cache, share_weights) if fast_decode else None
        self.matmul_size = cfg.d_model * max(cfg.d_ff, cfg.moe_d_ff if cfg.n_experts else 0)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def _contiguous(self, seq: Sequence, length: int) -> bool:
        table = seq.block_table[: -(-length // self.block_size)]
        return table[-1] - table[0] == len(table) - 1 and all(b - a == 1 for a, b in zip(table, table[1:]))

    def build(self, batch: list[tuple[Sequence, list[int], int]]) -> tuple[torch.Tensor, StepMeta]:
        """batch: (seq, token ids to run, their first position). Returns (input ids (1, N), metadata)."""
        dev = self.device
        ids, positions, slots, prefills = [], [], [], []
        short = []  # (seq, first flat row, n, start)
        for seq, tokens, start in batch:
            n = len(tokens)
            row = len(ids)
            ids.extend(tokens)
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
            if n == 1 or (start > 0 and n <= SHORT_QUERY):
                short.append((seq, row, n, start))
            else:
                ctx = start + n
                key_slots = None if start == 0 else torch.tensor(self._slots(seq, 0, ctx), device=dev)
                prefills.append(_Prefill(row, n, torch.arange(start, ctx, device=dev), ctx, key_slots))
        if self.max_len is not None and positions and max(positions) >= self.max_len:
            raise LmstackError(f"position {max(positions)} is past max_seq_len={self.max_len} of a model with "
                               "learned positions")
        meta = StepMeta(torch.tensor(positions, device=dev), torch.tensor(slots, device=dev),
                        self._short_meta(short) if short else None, prefills)
        return torch.tensor([ids], device=self.device), meta

    def _short_meta(self, short) -> _Short:
        tq = max(n for _, _, n, _ in short)
        length = max(start + n for _, _, n, start in short)
        rows, valid, q_pos, key_slots = [], [], [], []
        for seq, row, n, start in short:
            pad = tq - n
            rows.append(list(range(row, row + n)) + [row + n - 1] * pad)
            valid.append([True] * n + [False] * pad)
            q_pos.append(list(range(start, start + n)) + [start + n - 1] * pad)
            ctx = start + n
            key_slots.append(self._slots(seq, 0, ctx) + [0] * (length - ctx))  # padding keys are masked
        contig = None
        if len(short) == 1 and self._contiguous(short[0][0], length):
            contig = (short[0][0].block_table[0] * self.block_size, length)
        dev = self.device
        rows_t, valid_t = torch.tensor(rows, device=dev), torch.tensor(valid, device=dev)
        return _Short(rows_t, valid_t, torch.tensor(q_pos, device=dev), torch.tensor(key_slots, device=dev), contig,
                      rows_t[valid_t])

    def run(self, batch: list[tuple[Sequence, list[int], int]], logit_rows: list[int]) -> torch.Tensor:
        """Run one step; returns fp32 logits (len(logit_rows), vocab) for the flat rows asked for.

        Big steps use every thread the engine may use; small ones run on one thread (see threads.py)."""
        work = self.matmul_size * sum(len(tokens) for _, tokens, _ in batch)
        with threads_for(work):
            return self._run(batch, logit_rows)

    @torch.inference_mode()
    def _run(self, batch: list[tuple[Sequence, list[int], int]], logit_rows: list[int]) -> torch.Tensor:
        if self.fast is not None and len(batch) == 1 and not (self.lora_context is not None and
                                                                self.lora_context.active):
            seq, tokens, pos = batch[0]
            t = len(tokens)
            tail = logit_rows == list(range(t - len(logit_rows), t))
            if (t == 1 or (pos > 0 and t <= SHORT_QUERY)) and logit_rows and tail and self._contiguous(seq, pos + t):
                return self.fast.step(tokens, pos, seq.block_table[0] * self.block_size, len(logit_rows)).float().cpu()
        ids, meta = self.build(batch)
        self.cache.meta = meta
        try:
            hidden = self.model(ids, cache=self.cache, return_hidden=True)
        finally:
            self.cache.meta = None
        if not logit_rows:
            return torch.zeros((0, self.model.config.vocab_size))
        rows = hidden[0, logit_rows] if len(logit_rows) != hidden.shape[1] else hidden[0]
        return self.model.head(rows).float().cpu()  # sampling runs on the CPU
