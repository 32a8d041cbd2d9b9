"""kNN memory, the Memorizing Transformer (Wu et al. 2022), for a plain lmstack Transformer.

One chosen layer attends twice: locally (causal, over the current segment, the model's own attention) and
over an external store of earlier segments' (key, value) pairs, from which each query retrieves its top-k
keys per head. A learned per-head gate mixes the two: sigmoid(g) * memory + (1 - sigmoid(g)) * local.
The store is not differentiable (keys and values are detached when stored; the gradient reaches W_q through
the retrieval scores, and the gate), it is bounded (FIFO eviction of the oldest pairs) and it persists across
calls, and across processes with save()/load(): the "persistent context" of a chat that recalls a fact
stated in an earlier conversation.

Positions: every call is its own local frame 0..t-1. The memory is position-free, as in the paper: keys are
stored and queries are matched *unrotated* (with RoPE the layer hands this cache raw keys and the query is
rotated back), so a stored fact is found by content, wherever and whenever it was said.

Search: exact top-k by one matmul per (row, kv head) in torch, or FAISS (IndexFlatIP, also exact) when
installed and backend='faiss'. GQA: query heads of one group search their shared kv head's store.

The gate is a small nn.Module, `model.knn_gate`, added by attach_knn_gate(): it trains with the model's
parameters and is saved and loaded with safetensors (save_knn_gate / load_knn_gate). (Detach it with detach_knn_gate() before lmstack.save_model.) The memory's save()
records a fingerprint of the model (its config and the memory layer's key projection), and load() refuses a
memory written by another model, whose keys would be meaningless here.

Usage:
    gate = attach_knn_gate(model, init=0.0)
    memory = KNNMemory(model, layer=1, capacity=4096, top_k=32)
    model(earlier_conversation, cache=memory)            # its keys/values go to the store
    memory.save("mem/")                                  # ... a later process:
    memory = KNNMemory.load("mem/", model)
    logits = model(later_question, cache=memory)         # the layer retrieves from the store
    logits, loss = knn_forward(model, ids, seg_len=64, memory=memory, targets=targets)   # segment by segment
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.memory.running import check_segment_call, run_segments, segment_loss
from lmstack.model.positions import apply_rotary

BACKENDS = ("exact", "faiss")
_TENSORS, _META, _GATE = "knn_memory.safetensors", "knn_memory.json", "knn_gate"


def _faiss():
    try:
        import faiss  # lazy: faiss-cpu is optional; the exact torch search needs nothing
    except ImportError:
        raise LmstackError("kNN memory backend='faiss' needs faiss-cpu: pip install faiss-cpu "
                           "(or use backend='exact', the same top-k by matmul)") from None
    return faiss


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LmstackError(f"kNN memory file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmstackError(f"{path} is not a readable safetensors file: {e}") from None


class KNNStore:
    """Earlier segments' keys and values per batch row and kv head, (B, Hkv, N, D) each, at most `capacity`
    pairs per row (FIFO). search() gives each query head's exact top-k keys and their values."""

    def __init__(self, capacity: int, backend: str = "exact"):
        if capacity < 1:
            raise LmstackError(f"kNN memory capacity must be >= 1, got {capacity}")
        if backend not in BACKENDS:
            raise LmstackError(f"unknown kNN memory backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "faiss":
            _faiss()
        self.capacity, self.backend = capacity, backend
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def clear(self) -> None:
        self.keys = self.values = None

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v (B, Hkv, T, D); the oldest pairs beyond capacity are evicted."""
        k, v = k.detach(), v.detach()
        if self.keys is not None:
            if self.keys.shape[:2] != k.shape[:2] or self.keys.shape[3] != k.shape[3]:
                raise LmstackError(f"the kNN memory holds (batch, kv heads) {tuple(self.keys.shape[:2])} but this "
                                   f"segment has {tuple(k.shape[:2])}; call memory.reset() before a new batch")
            k, v = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
        n = k.shape[2]
        self.keys, self.values = k[:, :, max(0, n - self.capacity):], v[:, :, max(0, n - self.capacity):]

    def search(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) -> the top-k stored keys and values for every query, (B, H, T, k, D) each,
        best first; k = min(top_k, len(self))."""
        if self.keys is None:
            raise LmstackError("the kNN memory is empty: nothing to search")
        b, h, t, d = q.shape
        hkv = self.keys.shape[1]
        if b != self.keys.shape[0] or h % hkv:
            raise LmstackError(f"queries of shape {tuple(q.shape)} do not fit the memory's (batch, kv heads) "
                               f"{tuple(self.keys.shape[:2])}; call memory.reset() before a new batch")
        k = min(top_k, len(self))
        qg = q.detach().reshape(b, hkv, (h // hkv) * t, d)  # head h reads kv head h // (H / Hkv)
        idx = self._top_k(qg, k)
        rows = torch.arange(b, device=idx.device)[:, None, None, None]
        heads = torch.arange(hkv, device=idx.device)[None, :, None, None]
        keys, values = self.keys[rows, heads, idx], self.values[rows, heads, idx]  # (B, Hkv, G*T, k, D)
        return keys.view(b, h, t, k, d), values.view(b, h, t, k, d)

    def _top_k(self, qg: torch.Tensor, k: int) -> torch.Tensor:
        if self.backend == "exact":
            scores = qg @ self.keys.to(qg.dtype).transpose(-1, -2)  # (B, Hkv, G*T, N)
            return scores.topk(k, dim=-1).indices
        faiss = _faiss()
        b, hkv = qg.shape[:2]
        out = torch.empty(b, hkv, qg.shape[2], k, dtype=torch.long)
        for row in range(b):
            for head in range(hkv):
                index = faiss.IndexFlatIP(qg.shape[-1])  # exact inner product, as the matmul
                index.add(self.keys[row, head].float().cpu().numpy())
                _, found = index.search(qg[row, head].float().cpu().numpy(), k)
                out[row, head] = torch.from_numpy(found)
        return out.to(qg.device)


class KNNGate(nn.Module):
    """The memory layer's per-head mixing gate: weight() = sigmoid(logit), one per query head."""

    def __init__(self, n_heads: int, init: float = 0.0):
        super().__init__()
        self.logit = nn.Parameter(torch.full((n_heads,), float(init)))

    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


def attach_knn_gate(model: nn.Module, init: float = 0.0) -> KNNGate:
    """Add `model.knn_gate` (a KNNGate over the model's query heads, on its device) and return it;
    init is the gate's logit (0: an even mix; -inf: local attention only)."""
    p = next(model.parameters())
    gate = KNNGate(model.config.n_heads, init).to(p.device)
    model.knn_gate = gate
    return gate


def detach_knn_gate(model: nn.Module) -> KNNGate:
    """Remove and return `model.knn_gate`, from a plain model given a gate by attach_knn_gate: load_model
    refuses a tensor its config does not name, so save the gate with save_knn_gate, detach it, then save the
    model (load_knn_gate re-attaches it after load_model). A memory='knn' model owns its gate: keep it."""
    gate = _gate_of(model)
    del model.knn_gate
    return gate


def save_knn_gate(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's kNN gate to `path` (safetensors, atomically)."""
    _save_tensors(_gate_of(model).state_dict(), Path(path))


def load_knn_gate(model: nn.Module, path: str | os.PathLike) -> KNNGate:
    """Attach a kNN gate to the model with the weights at `path`; return it."""
    tensors = _load_tensors(Path(path))
    if set(tensors) != {"logit"} or tensors["logit"].shape != (model.config.n_heads,):
        raise LmstackError(f"{path} does not hold a kNN gate for {model.config.n_heads} heads "
                           f"(found {', '.join(f'{k}{tuple(v.shape)}' for k, v in tensors.items())})")
    gate = attach_knn_gate(model)
    with torch.no_grad():
        gate.logit.copy_(tensors["logit"])
    return gate


def _gate_of(model: nn.Module) -> KNNGate:
    gate = getattr(model, "knn_gate", None)
    if not isinstance(gate, KNNGate):
        raise LmstackError("the model has no kNN gate: call attach_knn_gate(model) (or load_knn_gate) first")
    return gate


def model_fingerprint(model: nn.Module, layer: int) -> str:
    """sha256 over the model's config and the memory layer's key-projection weight: stored keys only mean
    something to the model (and the W_k) that made them. The projections' layout is left out (same numbers)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "fused_projections"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    attn = model.blocks[layer % len(model.blocks)].attn
    if attn.qkv_proj is not None:
        q_rows, k_rows, _ = attn.qkv_proj.split_sizes()
        weight = attn.qkv_proj.weight[q_rows:q_rows + k_rows]
    elif attn.k_proj is not None:
        weight = attn.k_proj.weight
    else:
        raise LmstackError("kNN memory needs a key projection; this layer shares queries and keys (lsh_shared_qk)")
    digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class KNNMemory(AttentionCache):
    """An AttentionCache for model(ids, cache=...): every layer attends locally over the call's tokens, and
    layer `layer` also over the top_k stored pairs, gated by model.knn_gate; the call's K/V are then stored."""

    long_memory = True  # a memory model may run with this cache (Transformer.forward checks)
    rotated_keys = False  # raw keys: stored unrotated (position-free), rotated here for local attention

    def __init__(self, model: nn.Module, layer: int, capacity: int = 4096, top_k: int = 32, backend: str = "exact"):
        cfg = model.config
        if cfg.attention != "softmax" or not cfg.causal:
            raise LmstackError(f"kNN memory needs a causal softmax-attention model, got attention={cfg.attention!r}, "
                               f"causal={cfg.causal}")
        if not 0 <= layer < cfg.n_layers:
            raise LmstackError(f"kNN memory layer must be in 0..{cfg.n_layers - 1}, got {layer}")
        if top_k < 1:
            raise LmstackError(f"kNN memory top_k must be >= 1, got {top_k}")
        _gate_of(model)
        self.model, self.layer, self.top_k = model, layer, top_k
        self.store = KNNStore(capacity, backend)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._read_only = False

    def reset(self) -> None:
        """Forget everything stored (a new user, a new batch)."""
        self.store.clear()
        self._pending = None

    def __len__(self) -> int:
        return len(self.store)

    # ---- the AttentionCache contract
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.model.config.max_seq_len:
            raise LmstackError(f"a segment of {t} tokens exceeds the model's max_seq_len="
                               f"{self.model.config.max_seq_len}; run it in shorter segments (knn_forward)")
        pos = torch.arange(t, device=None if self.store.keys is None else self.store.keys.device)
        return pos, pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        rope = ctx.cos_q is not None
        local = attn.attend_all(q, apply_rotary(k, *ctx.rope_k()) if rope else k, v, ctx, layer)
        if layer != self.layer:
            return local
        self._pending = (k, v)
        if not len(self.store):
            return local
        # match by content: undo the query's rotation (rotating by -angle), as the stored keys carry none
        q_raw = apply_rotary(q, ctx.cos_q, -ctx.sin_q) if rope else q
        keys, values = self.store.search(q_raw, self.top_k)
        scores = (q_raw.unsqueeze(3) * keys.to(q.dtype)).sum(-1) * attn.scale  # (B, H, T, k): grad reaches W_q
        memory = (F.softmax(scores.float(), dim=-1).to(q.dtype).unsqueeze(-1) * values.to(q.dtype)).sum(3)
        g = _gate_of(self.model).weight().to(q.dtype)[None, :, None, None]
        return g * memory + (1 - g) * local

    @contextlib.contextmanager
    def read_only(self):
        """Retrieve from the store but add nothing to it: decoding re-runs an open segment each step, and
        only a finished segment may be stored (once)."""
        self._read_only = True
        try:
            yield self
        finally:
            self._read_only = False
            self._pending = None

    def advance(self, t: int) -> None:
        # stored after the forward: a call never retrieves its own tokens (local attention covers them)
        if self._read_only:
            self._pending = None
            return
        if self._pending is not None:
            self.store.add(*self._pending)
            self._pending = None

    def key_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        raise LmstackError("kNN memory does not take doc_ids: packed documents would share one store; "
                           "give each document (or user) its own row or its own memory")

    def nbytes(self) -> int:
        return 0 if self.store.keys is None else self.store.keys.nbytes + self.store.values.nbytes

    # ---- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the store (safetensors) and its settings plus the model's fingerprint (JSON) into directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {} if self.store.keys is None else {"keys": self.store.keys, "values": self.store.values}
        _save_tensors(tensors, directory / _TENSORS)
        meta = dict(fingerprint=model_fingerprint(self.model, self.layer), layer=self.layer,
                    capacity=self.store.capacity, top_k=self.top_k, backend=self.store.backend, size=len(self))
        atomic_write_text(directory / _META, json.dumps(meta, indent=2) + "\n")
        return directory

    @staticmethod
    def saved_in(directory: str | os.PathLike) -> bool:
        """Whether directory holds a saved kNN memory (its description file)."""
        return (Path(directory) / _META).is_file()

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module, backend: str | None = None) -> "KNNMemory":
        """The memory saved in directory, for `model`; refused when another model (config or W_k) wrote it."""
        directory = Path(directory)
        meta_path = directory / _META
        if not meta_path.is_file():
            raise LmstackError(f"no kNN memory in {directory}: {_META} not found")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            layer, capacity, top_k = int(meta["layer"]), int(meta["capacity"]), int(meta["top_k"])
            saved_fp = str(meta["fingerprint"])
        except (ValueError, KeyError, TypeError) as e:
            raise LmstackError(f"{meta_path} is not a kNN memory description: {e!r}") from None
        if not 0 <= layer < model.config.n_layers or model_fingerprint(model, layer) != saved_fp:
            raise LmstackError(f"the kNN memory in {directory} was saved from another model (its config or the "
                               f"layer-{layer} key projection differ: fingerprint {saved_fp[:12]}...); its keys "
                               "mean nothing to this model, so it is refused")
        memory = cls(model, layer, capacity, top_k, backend or meta.get("backend", "exact"))
        tensors = _load_tensors(directory / _TENSORS)
        if tensors:
            keys, values = tensors.get("keys"), tensors.get("values")
            cfg = model.config
            if keys is None or values is None or keys.shape != values.shape or keys.dim() != 4 \
                    or keys.shape[1] != cfg.n_kv_heads or keys.shape[3] != cfg.head_dim:
                raise LmstackError(f"{directory / _TENSORS} does not hold keys/values of shape (batch, "
                                   f"{cfg.n_kv_heads}, n, {cfg.head_dim})")
            p = next(model.parameters())
            memory.store.add(keys.to(p.device, p.dtype), values.to(p.device, p.dtype))
        return memory


def knn_forward(model: nn.Module, ids: torch.Tensor, seg_len: int, memory: KNNMemory,
                targets: torch.Tensor | None = None,
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ids (B, T) segment by segment through `memory` (updated in place): (logits (B, T, vocab), mean
    cross-entropy over targets != ignore_index or None)."""
    check_segment_call(ids, seg_len, targets)
    logits, aux = run_segments(model, ids, seg_len, memory)
    if targets is None:
        return logits, None
    return logits, segment_loss(logits, targets, ignore_index) + aux
