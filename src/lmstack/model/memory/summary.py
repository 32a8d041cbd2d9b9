"""AutoCompressor summary vectors (Chevalier et al. 2023): a long context compressed, segment by segment, into
a few soft tokens that later text attends to instead of the raw tokens.

k learned summary-token embeddings are appended to a segment; the model's final hidden states at those k
positions become k *summary vectors*, which are prepended (as input embeddings) to the next segment. The next
segment's tokens attend to the summary vectors and to themselves, never to the raw earlier tokens, so a book
goes through a fixed-size window one segment at a time. Summary accumulation (the paper's default): the soft
prompt of segment i is the concatenation of the summaries of all segments before it (i * k vectors); with
accumulate=False it is only the latest k, each summary having read the one before (a purely recursive chain).
Training is end to end through the chain: the next-token loss of a segment back-propagates into the summary
vectors, hence into the earlier segments that wrote them. Long chains are cut into chunks of `bptt` segments
(truncated back-propagation through time; the paper truncates too, to bound memory): at a chunk's start every
summary so far becomes a constant, so a gradient crosses at most bptt - 1 compression steps.

The wrapper leaves the Transformer untouched: soft vectors reach the blocks through a forward hook on
model.tok_emb that replaces the embedding lookup's output for the duration of one call, so positions, dropout,
embedding scale and norms all run exactly as in a plain forward. The only new parameters are the k summary
embeddings, a small nn.Module (SummaryTokens) saved and loaded with safetensors beside the model, together with a
fingerprint of the model (its config and token embedding): summary embeddings trained with one model are
refused by another.

Usage:
    comp = AutoCompressor(model, k=16)                          # model: a causal lmstack Transformer
    logits, loss, soft = comp(ids, seg_len=128, targets=tgt)    # train: segments chained through summaries
    soft = comp.compress(book_ids, seg_len=128)                 # (B, n_segments * 16, d_model)
    logits, _ = comp.segment(question_ids, soft)                # the question attends to soft + itself only
    out = comp.generate(soft, question_ids, max_new_tokens=8)   # greedy; only the soft tokens' K/V are cached
    save_summary_tokens(comp, "model_dir/summary_tokens.safetensors")
    comp = load_summary_tokens(model, "model_dir/summary_tokens.safetensors")
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.memory.running import check_segment_call


class SummaryTokens(nn.Module):
    """The k learned summary-token embeddings, (k, d_model), in the token-embedding space."""

    def __init__(self, k: int, d_model: int, std: float = 0.02):
        super().__init__()
        if k < 1:
            raise LmstackError(f"summary tokens: k must be >= 1, got {k}")
        self.embedding = nn.Parameter(torch.randn(k, d_model) * std)

    @property
    def k(self) -> int:
        return self.embedding.shape[0]


@contextmanager
def _feeding(model: nn.Module, embeds: torch.Tensor):
    """While inside, model.tok_emb(...) returns `embeds` (the caller passes placeholder ids of its shape)."""
    handle = model.tok_emb.register_forward_hook(lambda module, args, out: embeds)
    try:
        yield
    finally:
        handle.remove()


class AutoCompressor(nn.Module):
    """A causal lmstack Transformer plus k summary tokens; see the module docstring. Its parameters are the
    model's and the summary embeddings', so one optimizer trains both end to end."""

    def __init__(self, model: nn.Module, k: int | None = None, summary: SummaryTokens | None = None,
                 accumulate: bool = True, bptt: int = 2):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or not isinstance(getattr(model, "tok_emb", None), nn.Embedding):
            raise LmstackError("AutoCompressor wraps an lmstack Transformer (a model with .config and .tok_emb)")
        if not cfg.causal or cfg.head != "lm":
            raise LmstackError(f"summary vectors need a causal LM (causal=True, head='lm'), got causal={cfg.causal}, "
                               f"head={cfg.head!r}")
        if getattr(cfg, "memory", "none") != "none":
            raise LmstackError(f"the model already has a long-context memory (memory={cfg.memory!r}); "
                               "summary vectors wrap a plain model (memory='none')")
        if (k is None) == (summary is None):
            raise LmstackError("give the number of summary tokens k, or trained SummaryTokens, not both")
        if bptt < 1:
            raise LmstackError(f"bptt (segments per back-propagation chunk) must be >= 1, got {bptt}")
        p = model.tok_emb.weight
        if summary is None:
            summary = SummaryTokens(k, cfg.d_model, std=float(p.detach().float().std())).to(p.device, p.dtype)
        elif summary.embedding.shape[1] != cfg.d_model:
            raise LmstackError(f"summary tokens of width {summary.embedding.shape[1]} do not fit a model with "
                               f"d_model={cfg.d_model}")
        self.model, self.summary = model, summary
        self.accumulate, self.bptt = accumulate, bptt
        # The block stream sees token embeddings times this scale (Gemma); soft vectors are hidden states already.
        self._scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0

    @property
    def k(self) -> int:
        return self.summary.k

    def _window(self, ids: torch.Tensor, soft: torch.Tensor | None, n_sum: int, extra: int = 0) -> torch.Tensor:
        """The input embeddings [soft vectors, ids, n_sum summary tokens], checked to fit max_seq_len (with
        `extra` positions to come, when decoding)."""
        cfg = self.model.config
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise LmstackError(f"ids must have shape (batch, time) with time >= 1, got {tuple(ids.shape)}")
        b, t = ids.shape
        if soft is not None and (soft.dim() != 3 or soft.shape[0] != b or soft.shape[2] != cfg.d_model):
            raise LmstackError(f"soft vectors must have shape (batch={b}, n, d_model={cfg.d_model}), "
                               f"got {tuple(soft.shape)}")
        n_soft = 0 if soft is None else soft.shape[1]
        total = n_soft + t + n_sum + extra
        if total > cfg.max_seq_len:
            what = f" + {extra} new tokens" if extra else ""
            raise LmstackError(f"{n_soft} soft vectors + {t} tokens + {n_sum} summary tokens{what} = {total} positions "
                               f"exceed max_seq_len={cfg.max_seq_len}; use shorter segments or accumulate=False")
        x = self.model.tok_emb(ids)
        parts = [x]
        if soft is not None:
            parts.insert(0, soft.to(x.dtype) / self._scale)
        if n_sum:
            parts.append(self.summary.embedding.to(x.dtype).expand(b, -1, -1))
        return torch.cat(parts, dim=1)

    def segment(self, ids: torch.Tensor, soft: torch.Tensor | None = None, summarize: bool = False,
                logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One window: [soft vectors, ids, (k summary tokens if summarize)] through the model.

        ids (B, T); soft (B, S, d_model) or None. Returns (logits (B, T, vocab) of the ids' positions or None,
        the k new summary vectors (B, k, d_model) or None). The ids attend to soft and to themselves only."""
        embeds = self._window(ids, soft, self.k if summarize else 0)
        b, t = ids.shape
        n_soft = 0 if soft is None else soft.shape[1]
        with _feeding(self.model, embeds):
            hidden = self.model(torch.zeros(embeds.shape[:2], dtype=torch.long, device=ids.device), return_hidden=True)
        out = self.model.head(hidden[:, n_soft:n_soft + t]) if logits else None
        return out, (hidden[:, n_soft + t:] if summarize else None)

    def _soft(self, summaries: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(summaries, dim=1) if self.accumulate else summaries[-1]

    def _chain(self, ids: torch.Tensor, seg_len: int, soft: torch.Tensor | None, logits: bool):
        """Segment by segment: (each segment's logits or None, the summaries of the given soft and every segment)."""
        summaries = [] if soft is None else [soft]
        outs = []
        for j, seg in enumerate(ids.split(seg_len, dim=1)):
            if j and j % self.bptt == 0:  # a new chunk: what came before is a constant (truncated backprop)
                summaries = [s.detach() for s in summaries]
            out, new = self.segment(seg, self._soft(summaries) if summaries else None, summarize=True, logits=logits)
            outs.append(out)
            summaries.append(new)
        return outs, summaries

    def forward(self, ids: torch.Tensor, seg_len: int, targets: torch.Tensor | None = None,
                soft: torch.Tensor | None = None, ignore_index: int = -100
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run ids (B, T) in segments of seg_len, each reading the summary vectors of those before it (and
        `soft`, summaries of an earlier text, if given). Returns (logits (B, T, vocab), the mean cross-entropy
        over targets != ignore_index or None, the soft prompt that summarizes everything: feed it to segment())."""
        check_segment_call(ids, seg_len, targets)
        outs, summaries = self._chain(ids, seg_len, soft, logits=True)
        logits = torch.cat(outs, dim=1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
        return logits, loss, self._soft(summaries)

    def compress(self, ids: torch.Tensor, seg_len: int, soft: torch.Tensor | None = None) -> torch.Tensor:
        """The soft prompt for ids (B, T) read in segments of seg_len: (B, n_segments * k, d_model) with
        accumulation, else (B, k, d_model). No logits are computed."""
        if ids.dim() != 2 or seg_len < 1:
            raise LmstackError(f"compress needs ids (batch, time) and seg_len >= 1, got {tuple(ids.shape)}, {seg_len}")
        return self._soft(self._chain(ids, seg_len, soft, logits=False)[1])

    @torch.no_grad()
    def generate(self, soft: torch.Tensor | None, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of prompt (B, T) after the soft prompt: (B, max_new_tokens) token ids. The KV
        cache holds the soft vectors' and the new text's keys/values only, never the compressed tokens'."""
        if max_new_tokens < 1:
            raise LmstackError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        embeds = self._window(prompt, soft, 0, extra=max_new_tokens - 1)  # the last new token is never fed
        cache = self.model.new_cache(batch_size=prompt.shape[0], max_len=embeds.shape[1] + max_new_tokens)
        with _feeding(self.model, embeds):
            logits = self.model(torch.zeros(embeds.shape[:2], dtype=torch.long, device=prompt.device),
                                cache=cache, logits_to_keep=1)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            logits = self.model(out[-1][:, None], cache=cache)
            out.append(logits[:, -1].argmax(-1))
        return torch.stack(out, dim=1)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's config (less the projections' layout) and its token embedding: summary
    embeddings live in that embedding space and were trained with that model."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "fused_projections"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(model.tok_emb.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_summary_tokens(compressor: AutoCompressor, path: str | os.PathLike) -> Path:
    """Write the summary embeddings, settings and the model's fingerprint to `path` (safetensors, atomically)."""
    path = Path(path)
    meta = {"k": str(compressor.k), "d_model": str(compressor.model.config.d_model),
            "accumulate": str(int(compressor.accumulate)), "bptt": str(compressor.bptt),
            "fingerprint": model_fingerprint(compressor.model)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"embedding": compressor.summary.embedding.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_summary_tokens(model: nn.Module, path: str | os.PathLike) -> AutoCompressor:
    """An AutoCompressor over `model` with the summary embeddings saved at `path`; refused when they do not fit
    the model's width or another model (config or token embedding) trained them."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"summary tokens file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        k, accumulate, bptt = int(meta["k"]), bool(int(meta["accumulate"])), int(meta["bptt"])
        saved_fp = str(meta["fingerprint"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise LmstackError(f"{path} is not a summary-tokens file: {e!r}") from None
    d = model.config.d_model
    emb = tensors.get("embedding")
    if set(tensors) != {"embedding"} or emb.dim() != 2 or emb.shape != (k, d):
        raise LmstackError(f"{path} does not hold summary embeddings of shape ({k}, d_model={d}) "
                           f"(found {', '.join(f'{n}{tuple(v.shape)}' for n, v in tensors.items())})")
    if model_fingerprint(model) != saved_fp:
        raise LmstackError(f"the summary tokens in {path} were trained with another model (its config or token "
                           f"embedding differ: fingerprint {saved_fp[:12]}...); they mean nothing to this one")
    p = model.tok_emb.weight
    summary = SummaryTokens(k, d).to(p.device, p.dtype)
    with torch.no_grad():
        summary.embedding.copy_(emb)
    return AutoCompressor(model, summary=summary, accumulate=accumulate, bptt=bptt)
