"""The wire format of one tensor-parallel engine step: (input ids, StepMeta) <-> one int64 tensor.

Rank 0 plans every step (its scheduler and block tables exist only there) and sends the workers exactly
what its ModelRunner.build produced, so every rank runs the same forward on the same inputs. Everything
in a StepMeta is integer (ids, positions, KV slots, row maps, lengths) or bool (the padding mask), so one
int64 tensor carries it: a small header of sizes, then the tensors flattened in a fixed order.

    header: [n_tokens, n_prefills, B, Tq, L, contig_first_slot, contig_len, has_tree, then per prefill:
             row, n, ctx_len, n_key_slots]       (B = 0: no short chunks; contig_first_slot = -1: none)
    body:   ids, positions, slots, [rows, valid, q_pos, key_slots, [tree (B x Tq x Tq)] (B x ...)],
            [each prefill's key slots]

Usage:
    buf = pack_step(ids, meta)                   # rank 0, after runner.build(plan)
    ids, meta = unpack_step(buf, device)         # a worker; equal tensors, ready for model(ids, cache=...)
"""
from __future__ import annotations

import dataclasses

import torch

from lmstack.errors import LmstackError
from lmstack.infer.paged_attention import PrefillChunk, ShortChunks, StepMeta

_SENT = {StepMeta: {"positions", "slots", "short", "prefills"},
         ShortChunks: {"rows", "valid", "q_pos", "key_slots", "contig", "tree"},
         PrefillChunk: {"start", "n", "positions", "ctx_len", "key_slots"}}
# Fields rebuilt on the far side from the sent ones (out_rows, valid_index: the real queries of the (B, Tq)
# grid), and fields left at their defaults (the per-layer mask cache; `static`, the CUDA-graph path's flag:
# graph replay is off under tensor parallelism).
_DERIVED = {"out_rows": lambda rows, valid: rows.flatten()[valid.flatten()],
            "valid_index": lambda rows, valid: valid.flatten().nonzero()[:, 0]}
_DEFAULTED = {"masks", "static"}
_FIXED = 8  # header fields before the per-prefill ones
_PER_PREFILL = 4


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_fields() -> None:
    # A field added to the step metadata must be sent too, or the workers would run a different step.
    for cls, sent in _SENT.items():
        unknown = _names(cls) - sent - set(_DERIVED) - _DEFAULTED
        if unknown or not sent <= _names(cls):
            raise LmstackError(f"{cls.__name__} has fields {sorted(_names(cls))}; tp_step.py sends {sorted(sent)} "
                               f"and rebuilds {sorted(set(_DERIVED) | _DEFAULTED)}: teach it the new ones")


def pack_step(ids: torch.Tensor, meta: StepMeta) -> torch.Tensor:
    """(ids (1, N), meta) -> one CPU int64 tensor (header, then body)."""
    _check_fields()
    if getattr(meta, "static", False):
        raise LmstackError("a CUDA-graph step (StepMeta.static) cannot be sent to tensor-parallel workers")
    sh = meta.short
    head = [ids.shape[1], len(meta.prefills)]
    body = [ids[0], meta.positions, meta.slots]
    if sh is None:
        head += [0, 0, 0, -1, 0, 0]
    else:
        b, tq = sh.rows.shape
        first, length = sh.contig if sh.contig is not None else (-1, 0)
        head += [b, tq, sh.key_slots.shape[1], first, length, int(sh.tree is not None)]
        body += [sh.rows.flatten(), sh.valid.flatten(), sh.q_pos.flatten(), sh.key_slots.flatten()]
        if sh.tree is not None:  # a speculative token tree's visibility (spec_tree.py)
            body.append(sh.tree.flatten())
    for p in meta.prefills:
        # p.positions is arange(ctx_len - n, ctx_len) (ModelRunner.build): rebuilt on the far side
        head += [p.start, p.n, p.ctx_len, 0 if p.key_slots is None else p.key_slots.numel()]
        if p.key_slots is not None:
            body.append(p.key_slots)
    return torch.cat([torch.tensor(head, dtype=torch.int64)] + [t.to("cpu", torch.int64) for t in body])


def unpack_step(buf: torch.Tensor, device: str | torch.device = "cpu") -> tuple[torch.Tensor, StepMeta]:
    """The inverse of pack_step, with the tensors on `device`."""
    vals = buf.tolist()
    n, n_prefill, b, tq, length, first, contig_len, has_tree = vals[:_FIXED]
    prefill_head = vals[_FIXED:_FIXED + _PER_PREFILL * n_prefill]
    data = buf[_FIXED + _PER_PREFILL * n_prefill:].to(device)
    at = 0

    def take(count: int) -> torch.Tensor:
        nonlocal at
        at += count
        return data[at - count:at]

    ids, positions, slots = take(n)[None], take(n), take(n)
    short = None
    if b:
        rows = take(b * tq).view(b, tq)
        valid = take(b * tq).view(b, tq).bool()
        q_pos = take(b * tq).view(b, tq)
        key_slots = take(b * length).view(b, length)
        tree = take(b * tq * tq).view(b, tq, tq).bool() if has_tree else None
        contig = (first, contig_len) if first >= 0 else None
        derived = {name: rule(rows, valid) for name, rule in _DERIVED.items() if name in _names(ShortChunks)}
        short = ShortChunks(rows=rows, valid=valid, q_pos=q_pos, key_slots=key_slots, contig=contig, tree=tree,
                            **derived)
    prefills = []
    for i in range(n_prefill):
        row, count, ctx_len, n_keys = prefill_head[i * _PER_PREFILL:(i + 1) * _PER_PREFILL]
        key_slots = take(n_keys) if n_keys else None
        prefills.append(PrefillChunk(row, count, torch.arange(ctx_len - count, ctx_len, device=device), ctx_len,
                                     key_slots))
    if at != data.numel():
        raise LmstackError(f"a tensor-parallel step message has {data.numel()} body values, its header says {at}")
    return ids, StepMeta(positions, slots, short, prefills)
