"""Training a retrieval encoder contrastively: queries against the passages that answer them.

The objective is III.6's InfoNCE (`lmstack.train.objectives.contrastive.info_nce`), in its dense-retrieval form
(DPR, Karpukhin et al. 2020): a batch holds B (query, positive passage) pairs plus `hard_negatives` BM25 hard
negatives per query; query i must rank its own positive first among all B * (1 + hard_negatives) passages, so
the other queries' positives are in-batch negatives and the BM25 passages are hard ones (they share the query's
words but do not answer it). Both sides go through the same encoder (mean pooling, L2 norm: embed.py), and
the loss is cross-entropy over cosine similarity / temperature.

- Hard negatives are mined once, before training: for each pair, BM25's top `hard_pool` passages for the
  query minus the positive (and any passage with the positive's text); each step samples from them.
- Batches never hold two pairs with the same positive, which would make one query's positive another's
  negative.
- `init` picks the start: "minilm" (fine-tune the packaged all-MiniLM-L6-v2), "scratch" (a small bert-style
  encoder on MiniLM's WordPiece vocabulary) or an encoder directory (continue training).

`train_cross_encoder` trains rag/rerank.py's CrossEncoderReranker on the same data, listwise: each query's
positive against `hard_negatives` BM25 hard negatives (no in-batch negatives: a cross-encoder scores pairs,
not vectors), softmax cross-entropy over the group's logits.

The world supplies the data: `world_training_data` pairs every train-split QA question with a bio of its
person (the test split's people and question phrasings stay held out for benchmarks/rag_retrieval.py).

Usage:
    from lmstack.rag.encoder_train import EncoderTrainConfig, train_encoder, world_training_data
    passages, pairs = world_training_data(World(seed=0))
    out = train_encoder(passages, pairs, "runs/encoder", EncoderTrainConfig(init="minilm", steps=100))
    emb = load_embedder(out)      # lmstack.rag.embed
    ce = load_reranker(train_cross_encoder(passages, pairs, "runs/ce", hard_negatives=3))   # rag.rerank
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.progress import BudgetBar
from lmstack.rag.bm25 import BM25
from lmstack.rag.embed import MINILM, TransformerEmbedder, load_embedder, minilm_path, save_embedder
from lmstack.rag.rerank import CrossEncoderReranker
from lmstack.rag.types import Chunk
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer
from lmstack.train.objectives.contrastive import info_nce
from lmstack.world.bios import paraphrase_bio
from lmstack.world.config import sub_rng
from lmstack.world.qa import build_qa

INITS = ("minilm", "scratch")


@dataclass
class EncoderTrainConfig:
    """How the retrieval encoder is trained."""
    init: str = "minilm"
    """minilm (fine-tune all-MiniLM-L6-v2) | scratch (a small new encoder on MiniLM's vocabulary) | an encoder
    directory to continue from"""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """(query, positive) pairs per step; every other pair's passage is an in-batch negative."""
    hard_negatives: int = 1
    """BM25 hard negatives per query and step (0 = in-batch negatives only)."""
    hard_pool: int = 10
    """Hard negatives are drawn from BM25's top hard_pool non-positive passages."""
    lr: float = 0.0
    """Peak learning rate; 0 = 3e-5 when fine-tuning, 1e-3 from scratch (a cross-encoder's new head: >= 1e-3)."""
    warmup: float = 0.1
    """Fraction of the steps with a linear warm-up; the rest decays linearly to 0."""
    temperature: float = 0.05
    """InfoNCE temperature on cosine similarities (0.05 = sentence-transformers' scale of 20)."""
    max_length: int = 128
    """Tokens per text during training (passages are truncated)."""
    scratch_d_model: int = 256
    """Width of the encoder trained from scratch."""
    scratch_layers: int = 2
    """Layers of the encoder trained from scratch."""
    seed: int = 0
    """Seed of the model init, negative sampling and batch order."""
    threads: int = 0
    """CPU threads for torch: 0 = auto, N = exactly N."""
    max_seconds: float = 0.0
    """Stop after this many seconds (0 = no limit); the encoder is saved either way."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.init not in INITS and not Path(self.init).is_dir():
            raise LmstackError(f"init={self.init!r} is neither one of {', '.join(INITS)} nor an encoder directory")
        for name in ("steps", "batch_size", "max_length", "hard_pool", "scratch_d_model", "scratch_layers"):
            if getattr(self, name) < 1:
                raise LmstackError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2 and self.hard_negatives == 0:
            raise LmstackError("batch_size 1 without hard negatives leaves no negative to contrast with")
        if self.hard_negatives < 0 or self.temperature <= 0 or self.lr < 0 or not 0 <= self.warmup < 1:
            raise LmstackError("hard_negatives >= 0, temperature > 0, lr >= 0 and 0 <= warmup < 1 are required")


def world_training_data(world, bios_per_person: int = 1, seed: int = 0,
                        split: str = "train") -> tuple[list[str], list[tuple[str, int]]]:
    """(passages, pairs) from the world: one or more fresh bio paraphrases of each `split` person, and each of
    that person's `split` QA questions paired with every one of their bios."""
    rng = sub_rng(seed, "encoder-train-bios")
    passages: list[str] = []
    by_person: dict[str, list[int]] = {}
    for person in world.people_in(split):
        for _ in range(bios_per_person):
            by_person.setdefault(person.name, []).append(len(passages))
            passages.append(paraphrase_bio(person, rng, world))
    pairs = [(rec["question"], idx) for rec in build_qa(world) if rec["split"] == split
             for idx in by_person.get(rec["person"], [])]
    if not pairs:
        raise LmstackError(f"the world has no {split!r} QA to train an encoder on")
    return passages, pairs


def _texts(passages: Sequence[str | Chunk]) -> list[str]:
    return [p.text if isinstance(p, Chunk) else str(p) for p in passages]


def _resolve_pairs(pairs: Sequence[tuple[str, int | str]], texts: list[str]) -> list[tuple[str, int]]:
    index = {t: i for i, t in enumerate(texts)}
    out = []
    for query, pos in pairs:
        if isinstance(pos, str):
            if pos not in index:
                raise LmstackError(f"the positive passage of {query!r} is not among the passages")
            pos = index[pos]
        if not 0 <= int(pos) < len(texts):
            raise LmstackError(f"the positive of {query!r} is passage {pos}, but there are {len(texts)} passages")
        out.append((str(query), int(pos)))
    if not out:
        raise LmstackError("train_encoder needs at least one (query, positive passage) pair")
    return out


def mine_hard_negatives(texts: list[str], pairs: list[tuple[str, int]], pool: int) -> list[list[int]]:
    """For each pair, BM25's top `pool` passages for its query that are not (a copy of) its positive."""
    bm = BM25()
    bm.add([str(i) for i in range(len(texts))], texts)
    out = []
    for query, pos in pairs:
        ranked = [int(d) for d, _ in bm.search(query, k=pool + 4)]
        out.append([i for i in ranked if i != pos and texts[i] != texts[pos]][:pool])
    return out


def _batches(pairs: list[tuple[str, int]], batch_size: int, rng: random.Random):
    """Endless batches of pair indices, reshuffled each epoch, no positive twice in one batch."""
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        while order:
            batch, used, rest = [], set(), []
            for i in order:
                if len(batch) < batch_size and pairs[i][1] not in used:
                    batch.append(i)
                    used.add(pairs[i][1])
                else:
                    rest.append(i)
            order = rest
            yield batch


def _start(cfg: EncoderTrainConfig) -> TransformerEmbedder:
    if cfg.init == "scratch":
        tok = load_tokenizer(minilm_path())
        torch.manual_seed(cfg.seed)
        d = cfg.scratch_d_model
        heads = max(1, d // 64)
        mcfg = preset("bert-small", vocab_size=tok.vocab_size, d_model=d, n_layers=cfg.scratch_layers,
                      n_heads=heads, n_kv_heads=heads, head_dim=d // heads, d_ff=4 * d,
                      max_seq_len=max(cfg.max_length, 128))
        return TransformerEmbedder(Transformer(mcfg), tok, name="scratch", max_length=cfg.max_length)
    return load_embedder(MINILM if cfg.init == MINILM else cfg.init)


def _prepare(passages, pairs, out: str | os.PathLike, config, overrides):
    cfg = dataclasses.replace(config or EncoderTrainConfig(), **overrides)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmstackError(f"{out} already exists and is not an empty directory; pick a new --out")
    texts = _texts(passages)
    resolved = _resolve_pairs(pairs, texts)
    set_threads(cfg.threads)
    hard = mine_hard_negatives(texts, resolved, cfg.hard_pool) if cfg.hard_negatives else [[] for _ in resolved]
    return cfg, out, texts, resolved, hard


def _negatives(idx: list[int], hard: list[list[int]], n: int, n_texts: int, rng: random.Random) -> list[int]:
    """n hard negatives per query of the batch: random picks from its BM25 pool (a random passage if empty)."""
    return [rng.choice(hard[i]) if hard[i] else rng.randrange(n_texts) for i in idx for _ in range(n)]


def _loop(cfg: EncoderTrainConfig, params, resolved, loss_fn, desc: str, new_params=()) -> list[dict]:
    """The optimisation loop both trainers share: AdamW, linear warm-up then decay, clipping, a log per step.
    loss_fn(batch pair indices) -> (loss, accuracy). new_params (a freshly initialised head) learn at least at
    1e-3: at a fine-tuning rate a random head would barely move in a short run."""
    lr = cfg.lr or (1e-3 if cfg.init == "scratch" else 3e-5)
    params, new_params = list(params), list(new_params)
    groups = [{"params": params, "lr": lr}] + ([{"params": new_params, "lr": max(lr, 1e-3)}] if new_params else [])
    params = params + new_params
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))))
    batches = _batches(resolved, cfg.batch_size, random.Random(cfg.seed + 1))
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc=desc, enabled=cfg.progress)
    log, start = [], time.perf_counter()
    for step in range(cfg.steps):
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            break
        loss, acc = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LmstackError(f"the training loss became {value} at step {step}; lower lr (now {lr})")
        log.append({"step": step + 1, "loss": round(value, 5), "acc": round(float(acc), 4),
                    "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)})
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", acc=f"{float(acc):.2f}")
    bar.close()
    return log


def train_encoder(passages: Sequence[str | Chunk], pairs: Sequence[tuple[str, int | str]], out: str | os.PathLike,
                  config: EncoderTrainConfig | None = None, **overrides) -> Path:
    """Train an encoder on (query, positive) pairs over `passages` and save it to `out` (an encoder directory
    that load_embedder opens). A positive is a passage index or its text. `overrides` are config fields.
    Writes train_log.jsonl (loss, in-batch accuracy per step) and train_config.json beside the weights."""
    cfg, out, texts, resolved, hard = _prepare(passages, pairs, out, config, overrides)
    rng = random.Random(cfg.seed)
    emb = _start(cfg)  # saved with its own max length; training truncates to cfg.max_length for speed
    train = TransformerEmbedder(emb.model, emb.tokenizer, emb.name, max_length=min(cfg.max_length, emb.max_length),
                                pooling=emb.pooling, device=emb.device)
    emb.model.train()
    token_cache = dict(enumerate(train.tokenize(texts)))

    def loss_fn(idx):
        queries = train.tokenize([resolved[i][0] for i in idx])
        keys = [resolved[i][1] for i in idx] + _negatives(idx, hard, cfg.hard_negatives, len(texts), rng)
        return info_nce(train.encode_ids(queries), train.encode_ids([token_cache[k] for k in keys]),
                        cfg.temperature)

    log = _loop(cfg, emb.model.parameters(), resolved, loss_fn, "train-encoder")
    emb.model.eval()
    _publish(out, lambda d: save_embedder(emb, d, name=out.name), cfg, log, n_pairs=len(resolved),
             n_passages=len(texts))
    return out


def train_cross_encoder(passages: Sequence[str | Chunk], pairs: Sequence[tuple[str, int | str]],
                        out: str | os.PathLike, config: EncoderTrainConfig | None = None, **overrides) -> Path:
    """Train a CrossEncoderReranker (rag/rerank.py) on (query, positive) pairs: each query's positive against
    config.hard_negatives BM25 hard negatives, softmax cross-entropy over the group (temperature unused). Saves
    a directory that rag.rerank.load_reranker opens."""
    cfg, out, texts, resolved, hard = _prepare(passages, pairs, out, config, overrides)
    if cfg.hard_negatives < 1:
        raise LmstackError("a cross-encoder learns from its hard negatives; set hard_negatives >= 1")
    rng = random.Random(cfg.seed)
    emb = _start(cfg)
    torch.manual_seed(cfg.seed)
    ce = CrossEncoderReranker(emb.model, emb.tokenizer, max_length=cfg.max_length)
    ce.model.train()
    group = 1 + cfg.hard_negatives

    def loss_fn(idx):
        negs = _negatives(idx, hard, cfg.hard_negatives, len(texts), rng)
        rows = []
        for j, i in enumerate(idx):
            query, pos = resolved[i]
            rows += ce.pairs(query, [texts[pos]] + [texts[n] for n in negs[j * cfg.hard_negatives:
                                                                           (j + 1) * cfg.hard_negatives]])
        logits = ce.logits(rows).view(len(idx), group)
        target = torch.zeros(len(idx), dtype=torch.long, device=logits.device)
        return torch.nn.functional.cross_entropy(logits, target), (logits.argmax(-1) == 0).float().mean()

    log = _loop(cfg, ce.model.parameters(), resolved, loss_fn, "train-cross-encoder", new_params=ce.head.parameters())
    ce.model.eval()
    _publish(out, ce.save, cfg, log, n_pairs=len(resolved), n_passages=len(texts))
    return out


def _publish(out: Path, save, cfg: EncoderTrainConfig, log: list[dict], **info) -> None:
    """save(tmp dir), plus the log and config, under a temporary name; then move the directory into place."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save(tmp)
        atomic_write_text(tmp / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        atomic_write_text(tmp / "train_config.json",
                          json.dumps({**dataclasses.asdict(cfg), **info, "steps_done": len(log)}, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
