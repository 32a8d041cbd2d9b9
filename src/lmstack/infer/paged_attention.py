"""The engine's paged K/V pool and its attention: PagedKVCache, the engine's AttentionCache.

The model's attention layers talk to it only through lmstack.model.attention_cache.AttentionCache (positions,
attend, advance): the engine passes it as `model(ids, cache=pool)`, and the model never imports the engine.

It holds one preallocated pool per K and V, shaped (layers, kv_heads, num_blocks * block_size, head_dim): a
block is a run of block_size slots, and a sequence's block table maps its positions to slots. Its `attend`
hook (see model/attention.py) writes the step's new K/V into their slots and computes attention:
- inside decode_kernels() (the engine's CPU fp32 steps), short chunks of one new token each (decode, in a pure
  or a mixed step) take one C++ call per layer that reads each sequence's keys in place through its slots
  (kernels/decode_ops.cpp);
- otherwise short chunks (decode tokens, speculative windows) are batched into one padded SDPA per layer: their keys
  are gathered from the pool into a padded (B, kv_heads, L, D) tensor; a single sequence whose blocks are
  contiguous reads the pool in place. GQA is done by folding the query heads of a group into rows, so K/V
  are never repeated. With an attention softcap or ALiBi they go one sequence at a time through the
  model's backend instead.
- prefill chunks go one sequence at a time through the model's own attention backend and mask rules
  (causal, sliding window, ALiBi, softcap), with keys gathered from the pool.
The per-step metadata (StepMeta) is built by the model runner (model_runner.py) and set on `cache.meta`.

With kv_cache_dtype="int8" the pools hold int8 numbers and two more pools, k_scale and v_scale (layers,
kv_heads, slots), hold one fp32 scale per token and head (kv_quant.py has the scheme): writes quantize, and
every read above gathers its slots and dequantizes them (_kv), except the C++ decode call, which reads the int8
pool and its scales in place (kernels/kv_int8.cpp).

Usage:
    cache = PagedKVCache(model.config, num_blocks=256, block_size=16)
    cache = PagedKVCache(model.config, num_blocks=1024, block_size=16, kv_cache_dtype="int8")
    cache.meta = StepMeta(...)                    # per step, from ModelRunner.build
    hidden = model(ids, cache=cache, return_hidden=True)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.infer.flex_paged import flex_short
from lmstack.infer.kv_quant import check_kv_cache_dtype, dequantize_kv, quantize_kv
from lmstack.kernels import decode_ops, kv_int8
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.linear import kernels_on
from lmstack.model.masks import AttentionMask


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    n: int
    positions: torch.Tensor  # (n,) positions of its queries
    ctx_len: int  # keys visible after this step: positions [0, ctx_len)
    key_slots: torch.Tensor | None  # (ctx_len,) slots, None when the chunk is the whole context


@dataclass
class ShortChunks:
    """Short chunks batched together: B sequences, up to Tq queries each, up to L keys each."""

    rows: torch.Tensor  # (B, Tq) flat rows of the queries (padding repeats a real row)
    valid: torch.Tensor  # (B, Tq) bool: which of those are real
    q_pos: torch.Tensor  # (B, Tq) positions of the queries
    key_slots: torch.Tensor  # (B, L) slots of positions 0..L-1 (padding points at slot 0)
    contig: tuple[int, int] | None  # (first slot, L) when B == 1 and its blocks are contiguous
    out_rows: torch.Tensor  # (R,) flat rows of the real queries = rows.flatten()[valid_index]
    valid_index: torch.Tensor  # (R,) indices of the real queries in the flattened (B * Tq) grid
    masks: dict = field(default_factory=dict, repr=False)  # window -> SDPA mask, built by the first layer
    tree: torch.Tensor | None = None
    """(B, Tq, Tq) bool, when a chunk holds a token tree (spec_tree.py): which rows of its own chunk a query row
    sees (besides every key before the chunk); None: causal."""


@dataclass
class StepMeta:
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) where each new token's K/V goes
    short: ShortChunks | None
    prefills: list[PrefillChunk]
    static: bool = False
    """Every shape and branch depends on sizes only, never on values (a CUDA graph replays it: cuda_graphs.py)."""


class PagedKVCache(AttentionCache):
    """The paged K/V pool plus the per-step metadata its attend() uses."""

    rotated_keys = True  # keys are stored after RoPE, so decoding never re-rotates them

    def __init__(self, cfg, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attention_backend: str = "sdpa", kv_cache_dtype: str = "auto"):
        if attention_backend not in ("sdpa", "flex"):
            raise LmstackError(f"attention_backend must be 'sdpa' or 'flex', got {attention_backend!r}")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.attention_backend = attention_backend  # the short chunks' kernel (flex_paged.py for 'flex')
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.dtype = dtype  # what attention computes in (reads of an int8 pool are dequantized to it)
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks * block_size, cfg.head_dim)
        stored = torch.int8 if kv_cache_dtype == "int8" else dtype
        self.k = torch.zeros(shape, dtype=stored, device=device)
        self.v = torch.zeros(shape, dtype=stored, device=device)
        self.k_scale = self.v_scale = None  # (layers, kv_heads, slots) fp32 when int8
        if kv_cache_dtype == "int8":
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.meta: StepMeta | None = None
        self._slot_of, self._slot = None, 0  # the step whose single write slot _slot is
        self._lengths_of, self._lengths = None, None  # the short chunks whose key counts _lengths are
        self.alibi = None

    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else self.k_scale.nbytes + self.v_scale.nbytes
        return self.k.nbytes + self.v.nbytes + scales

    def _pools(self):
        """The pools that hold per-slot state: K, V, and with int8 their scales (slots on dim 2 of each)."""
        return (self.k, self.v) if self.k_scale is None else (self.k, self.v, self.k_scale, self.v_scale)

    # ---- the AttentionCache interface the Transformer calls
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.meta.positions, self.meta.positions

    def advance(self, t: int) -> None:
        pass

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) from src to dst."""
        bs = self.block_size
        for src, dst in pairs:
            for pool in self._pools():
                pool[:, :, dst * bs:(dst + 1) * bs] = pool[:, :, src * bs:(src + 1) * bs]

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """Move single slots' K/V (every layer) from src to dst, all read before any is written: an accepted
        token-tree path into its sequence's positions (spec_tree.py)."""
        s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
        for pool in self._pools():
            pool[:, :, d] = pool[:, :, s]

    def _kv(self, layer: int, slots: torch.Tensor | None = None, span: tuple[int, int] | None = None):
        """One layer's keys and values (Hkv, n, D) in the model's dtype at `slots` (1-D), or at the
        contiguous slots span = (first, n) as views of the pool when it is not int8."""
        kc, vc = self.k[layer], self.v[layer]
        if self.k_scale is None:
            if span is not None:
                return kc[:, span[0]:span[0] + span[1]], vc[:, span[0]:span[0] + span[1]]
            return kc.index_select(1, slots), vc.index_select(1, slots)
        ks, vs = self.k_scale[layer], self.v_scale[layer]
        if span is not None:
            sl = slice(span[0], span[0] + span[1])
            return dequantize_kv(kc[:, sl], ks[:, sl], self.dtype), dequantize_kv(vc[:, sl], vs[:, sl], self.dtype)
        return (dequantize_kv(kc.index_select(1, slots), ks.index_select(1, slots), self.dtype),
                dequantize_kv(vc.index_select(1, slots), vs.index_select(1, slots), self.dtype))

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, m: StepMeta) -> None:
        """Store the step's new K/V (Hkv, N, D) at m.slots (int8: quantized per token and head)."""
        kc, vc = self.k[layer], self.v[layer]
        if self.k_scale is not None:
            ks, vs = self.k_scale[layer], self.v_scale[layer]
            if kernels_on() and kv_int8.write(k, v, m.slots, kc, vc, ks, vs):  # one C++ call, same numbers
                return
            (kq, kscale), (vq, vscale) = quantize_kv(k), quantize_kv(v)
            ks.index_copy_(1, m.slots, kscale)
            vs.index_copy_(1, m.slots, vscale)
            kc.index_copy_(1, m.slots, kq)
            vc.index_copy_(1, m.slots, vq)
            return
        if m.slots.shape[0] == 1 and not m.static:  # one new token (batch-1 decode): a copy, not a scatter
            if self._slot_of is not m:  # read its slot once per step, not once per layer
                self._slot_of, self._slot = m, int(m.slots[0])
            kc[:, self._slot] = k[:, 0]
            vc[:, self._slot] = v[:, 0]
        else:
            kc.index_copy_(1, m.slots, k)
            vc.index_copy_(1, m.slots, v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) for the flat batch -> attention output (1, H, N, D)."""
        m = self.meta
        self._write(layer, k[0], v[0], m)
        window = self.cfg.window_for_layer(layer)
        sh, decoded = m.short, None
        if sh is not None and sh.rows.shape[1] == 1 and kernels_on() and not m.static and not attn.softcap \
                and self.alibi is None and self.attention_backend == "sdpa" and sh.tree is None:
            # one new token per short chunk: one C++ call reads each one's keys in place (decode_ops.cpp)
            if self._lengths_of is not sh:  # keys visible to each query, once per step, not once per layer
                self._lengths_of, self._lengths = sh, sh.q_pos[:, 0] + 1
            queries = q[0].transpose(0, 1)  # (N, H, D)
            if m.prefills:  # a mixed step: the decode rows are some of the flat rows
                queries = queries.index_select(0, sh.out_rows)
            if self.k_scale is None:
                decoded = decode_ops.paged_decode_attention(queries, self.k[layer], self.v[layer], sh.key_slots,
                                                            self._lengths, attn.scale, window or 0)
            else:  # int8: the kernel reads the pool in place (kernels/kv_int8.cpp)
                decoded = kv_int8.paged_decode_attention_int8(queries, self.k[layer], self.v[layer],
                                                              self.k_scale[layer], self.v_scale[layer], sh.key_slots,
                                                              self._lengths, attn.scale, window or 0)
                if decoded is None:  # no kernel: the keys dequantized into a compact pool, renumbered b*L + j
                    kc, vc = self._kv(layer, sh.key_slots.flatten())
                    slots = torch.arange(sh.key_slots.numel(), device=kc.device).view(sh.key_slots.shape)
                    decoded = decode_ops.paged_decode_attention(queries, kc, vc, slots, self._lengths, attn.scale,
                                                                window or 0)
            if decoded is not None and not m.prefills:
                return decoded.transpose(0, 1)[None]  # (1, H, N, D): every row decodes, in order
        if m.short is not None and not m.prefills and m.short.rows.shape[0] == 1 and not attn.softcap \
                and self.alibi is None:
            # one sequence's decode token or window is the whole batch: its queries are q itself, in order
            return self._short(q, layer, m.short, attn.scale, window, whole=True)
        out = torch.empty_like(q)
        if decoded is not None:
            out[0, :, sh.out_rows] = decoded.transpose(0, 1)
        elif sh is not None:
            if attn.softcap or self.alibi is not None:  # rare configs: one sequence at a time
                for b in range(sh.rows.shape[0]):
                    n = int(sh.valid[b].sum())
                    rows = sh.rows[b, :n]
                    length = int(sh.q_pos[b, n - 1]) + 1
                    out[:, :, rows] = self._one(q[:, :, rows], layer, sh.key_slots[b, :length], sh.q_pos[b, :n],
                                                attn, window)
            else:
                out[0, :, sh.out_rows] = self._short(q, layer, sh, attn.scale, window)
        for p in m.prefills:
            qs = q[:, :, p.start:p.start + p.n]
            if p.key_slots is None and self.k_scale is not None:  # int8: its own K/V as stored (rounded)
                ks, vs = self._kv(layer, m.slots[p.start:p.start + p.n])
                ks, vs = ks[None], vs[None]
                k_pos = p.positions
            elif p.key_slots is None:  # the chunk is the whole context: use its own K/V directly
                ks, vs = k[:, :, p.start:p.start + p.n], v[:, :, p.start:p.start + p.n]
                k_pos = p.positions
            else:
                ks, vs = self._kv(layer, p.key_slots)
                ks, vs = ks[None], vs[None]
                k_pos = torch.arange(p.ctx_len, device=q.device)
            mask = AttentionMask(q_pos=p.positions, k_pos=k_pos, causal=True, window=window,
                                 block_size=self.cfg.attn_block_size)
            out[:, :, p.start:p.start + p.n] = attn.backend(qs, ks, vs, mask, attn.scale, slopes=self.alibi,
                                                            softcap=attn.softcap, **attn.backend_kwargs)
        return out

    def _short(self, q, layer: int, sh: ShortChunks, scale: float, window: int, whole: bool = False) -> torch.Tensor:
        """All short chunks in one SDPA; returns (H, R, D) for the real query rows, or (1, H, N, D) when
        `whole` (a single sequence is the whole batch: no row gather, no scatter back)."""
        b, tq = sh.rows.shape
        hkv, d = self.k.shape[1], self.k.shape[-1]
        if sh.contig is not None:
            length = sh.contig[1]
            keys, values = self._kv(layer, span=sh.contig)
            keys, values = keys[None], values[None]
        else:
            length = sh.key_slots.shape[1]
            keys, values = self._kv(layer, sh.key_slots.flatten())
            keys = keys.view(hkv, b, length, d).transpose(0, 1)
            values = values.view(hkv, b, length, d).transpose(0, 1)
        h = q.shape[1]
        group = h // hkv
        # GQA without copying K/V: the `group` query heads of a KV head become extra query rows.
        if whole:
            qs = q.reshape(1, hkv, group * tq, d)  # q (1, H, Tq, D): the heads of a group are adjacent
        else:
            qs = q[0][:, sh.rows]  # (H, B, Tq, D)
            qs = qs.permute(1, 0, 2, 3).reshape(b, hkv, group * tq, d)
        if self.attention_backend == "flex" and sh.tree is None:  # the mask as a rule over indices, not a tensor
            o = flex_short(qs, keys, values, sh.q_pos, window, scale)
        else:
            o = F.scaled_dot_product_attention(qs, keys, values,
                                               attn_mask=self._short_mask(sh, length, group, window), scale=scale)
        if whole:
            return o.view(1, h, tq, d)
        o = o.view(b, h, tq, d).permute(1, 0, 2, 3).reshape(h, b * tq, d)  # (H, B * Tq, D)
        # index arithmetic, not a boolean mask: the output's shape follows from sizes alone (graph-safe)
        return o if sh.valid_index.shape[0] == b * tq else o.index_select(1, sh.valid_index)

    @staticmethod
    def _short_mask(sh: ShortChunks, length: int, group: int, window: int) -> torch.Tensor | None:
        """The (B, 1, group*Tq, L) visibility of the folded query rows; None when every key is visible (one
        decode token over contiguous slots). Built once per step and window, not once per layer."""
        tq = sh.rows.shape[1]
        if tq == 1 and sh.contig is not None and not window:
            return None
        if window not in sh.masks:
            k_pos = torch.arange(length, device=sh.q_pos.device)
            visible = k_pos[None, None, :] <= sh.q_pos[:, :, None]  # (B, Tq, L): causal, and hides padding keys
            if sh.tree is not None:  # token trees: the keys before the chunk, then the chunk's rows sh.tree allows
                rel = k_pos[None, :] - sh.q_pos[:, :1]  # (B, L): key index within its chunk (q_pos = key index)
                own = sh.tree.gather(2, rel.clamp(0, tq - 1)[:, None, :].expand(-1, tq, -1))
                visible = (rel < 0)[:, None, :] | (own & (rel >= 0)[:, None, :] & visible)
            if window:
                visible &= k_pos[None, None, :] > sh.q_pos[:, :, None] - window
            sh.masks[window] = visible.repeat(1, group, 1)[:, None]
        return sh.masks[window]

    def _one(self, q, layer, slots, q_pos, attn, window):
        mask = AttentionMask(q_pos=q_pos, k_pos=torch.arange(len(slots), device=q.device), causal=True, window=window,
                             block_size=self.cfg.attn_block_size)
        keys, values = self._kv(layer, slots)
        return attn.backend(q, keys[None], values[None], mask, attn.scale,
                            slopes=self.alibi, softcap=attn.softcap, **attn.backend_kwargs)
