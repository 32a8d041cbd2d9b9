"""`lmstack speedrun`: the main job, end to end on the built-in synthetic world, on a laptop CPU.

1. generate the synthetic world (lmstack.data.world);
2. run the data pipeline on its pretraining corpus (filters, dedup, decontamination against the
   held-out QA, shards), training
3. the byte-level BPE tokenizer on the cleaned text just before sharding;
4. pretrain a small llama-style model with a wall-clock budget;
5. sample from it;
6. write runs/<timestamp>/report.md with the config, parameter count, tokens seen, time, final
   validation loss, the loss curve and the samples.

Usage:
    lmstack speedrun                                   # recipes/speedrun.yaml's defaults
    lmstack speedrun --config recipes/speedrun.yaml --pretrain.train.max_seconds 300
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmstack.config import save_config, to_dict
from lmstack.model.config import ModelConfig
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig
from lmstack.train.pretrain import DataConfig, PretrainConfig


def _default_pretrain() -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                          mlp="swiglu", norm="rmsnorm", position="rope", qk_norm=True, tie_embeddings=True,
                          hf_model_type="llama", name="speedrun"),
        train=TrainConfig(steps=2000, max_seconds=420, eval_every=250, eval_batches=16, log_every=10,
                          save_every=500, keep_checkpoints=2, clip_grad_norm=1.0),
        optim=OptimizerConfig(name="muon", lr=3e-3, weight_decay=0.0),
        schedule=ScheduleConfig(name="wsd", warmup_steps=50, decay_fraction=0.3, min_lr_ratio=0.05),
        data=DataConfig(batch_size=16, seq_len=256),
    )


@dataclass
class SpeedrunConfig:
    out: str = "runs"
    """Parent directory; each run gets a timestamped folder inside."""
    world_size: Literal["small", "medium", "large"] = "small"
    """Size of the synthetic world to generate."""
    seed: int = 0
    """Seed of the world, the data order and the model."""
    vocab_size: int = 4096
    """Size of the BPE vocabulary trained on the cleaned text."""
    workers: int = 2
    """Worker processes for the data pipeline."""
    pretrain: PretrainConfig = field(default_factory=_default_pretrain)
    """The pretraining run (its data paths are filled in by the speedrun)."""
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Once upon a time", "The capital of", "Question: What is 12 plus 7?", "She was born on"])
    """Prompts sampled at the end."""
    sample_tokens: int = 48
    """Tokens generated per sample."""


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def speedrun(cfg: SpeedrunConfig) -> dict:
    """Run the whole pipeline (world -> data -> tokenizer -> pretrain -> samples -> report)."""
    import torch

    from lmstack.data.decontaminate import DecontamConfig
    from lmstack.data.filters import FiltersConfig
    from lmstack.data.filters.quality import QualityConfig
    from lmstack.data.pipeline import PipelineConfig, run_pipeline
    from lmstack.data.readers import ReaderConfig, read_all
    from lmstack.data.shards import ShardConfig, write_shards
    from lmstack.data.world import generate_world
    from lmstack.model.generate import generate
    from lmstack.model.hf_io import load_model
    from lmstack.tokenizer import load_tokenizer, train_tokenizer
    from lmstack.train.pretrain import pretrain

    start = time.perf_counter()
    run = Path(cfg.out) / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "speedrun.yaml")
    timings: dict[str, float] = {}

    t = _step("1. synthetic world")
    world = run / "world"
    manifest = generate_world(world, size=cfg.world_size, seed=cfg.seed, progress=False)
    timings["world"] = time.perf_counter() - t

    t = _step("2-3. data pipeline, with the BPE tokenizer trained on the cleaned text before sharding")
    tok_dir = run / "tokenizer"
    tok_seconds = {}

    def train_tok(clean: Path) -> str:
        t0 = time.perf_counter()
        texts = [json.loads(line)["text"] for line in clean.read_text(encoding="utf-8").splitlines() if line]
        tok = train_tokenizer(texts=texts, type="bpe", vocab_size=cfg.vocab_size)
        tok.save(tok_dir)
        tok_seconds["seconds"] = time.perf_counter() - t0
        print(f"tokenizer: {tok.vocab_size} tokens from {len(texts)} documents in {tok_seconds['seconds']:.1f}s")
        return str(tok_dir)

    data = run / "data"
    pipe = PipelineConfig(
        inputs=[ReaderConfig(path=str(world / "pretrain" / "train.jsonl"), source="world")], out=str(data),
        workers=cfg.workers,
        # The world's documents are short and clean (one-line QA, worked arithmetic): Gopher's web-scale
        # thresholds (50+ words, 80% alphabetic words) would drop most of them, so they are relaxed here.
        filters=FiltersConfig(quality=QualityConfig(min_words=5, min_chars=20, min_alpha_words=0.5,
                                                    min_stop_words=0)),
        decontam=DecontamConfig(paths=[str(world / "qa" / "test.jsonl")]),
        shards=ShardConfig(tokenizer="bytes"), progress=True)
    report = run_pipeline(pipe, before_shards=train_tok)
    val_docs = read_all([ReaderConfig(path=str(world / "pretrain" / "val.jsonl"), source="world")])
    write_shards(val_docs, data / "val_shards", ShardConfig(tokenizer=str(tok_dir)), workers=1)
    timings["data_and_tokenizer"] = time.perf_counter() - t

    t = _step("4. pretrain")
    pcfg = cfg.pretrain
    pcfg.out = str(run / "pretrain")
    pcfg.data.shards, pcfg.data.val_shards, pcfg.data.tokenizer = str(data / "shards"), str(data / "val_shards"), str(tok_dir)
    pcfg.train.seed = cfg.seed
    tok = load_tokenizer(tok_dir)
    pcfg.model = pcfg.model.replace(vocab_size=max(pcfg.model.vocab_size, tok.vocab_size))
    summary = pretrain(pcfg)
    timings["pretrain"] = time.perf_counter() - t

    t = _step("5. samples")
    model_dir = Path(summary["checkpoint"]) / "model"
    model = load_model(model_dir)
    samples = []
    for i, prompt in enumerate(cfg.sample_prompts):
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)]) if tok.bos_id is not None else torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, cfg.sample_tokens, temperature=0.8, top_k=50, eos_id=tok.eos_id, seed=cfg.seed + i)
        text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        samples.append((prompt, text))
        print(f"{prompt!r} -> {text!r}")
    timings["samples"] = time.perf_counter() - t

    total = time.perf_counter() - start
    path = write_report(run, cfg, manifest, report, summary, samples, timings, total, tok_seconds.get("seconds"))
    print(f"\nspeedrun finished in {total / 60:.1f} min; report: {path}")
    print(f"chat with the model: lmstack model generate --model {model_dir} --prompt 'Once upon a time'")
    return {"run": str(run), "report": str(path), "summary": summary, "seconds": total, "samples": samples}


def write_report(run: Path, cfg: SpeedrunConfig, world_manifest: dict, data_report, summary: dict,
                 samples: list[tuple[str, str]], timings: dict[str, float], total: float,
                 tokenizer_seconds: float | None) -> Path:
    from lmstack.config import atomic_write_text

    m = cfg.pretrain.model
    loss_png = Path(cfg.pretrain.out) / "loss.png"
    lines = [
        f"# Speedrun report — {run.name}", "",
        f"Total time: **{total / 60:.1f} min** on this machine.", "",
        "## Result", "",
        "| | |", "|---|---|",
        f"| parameters | {summary['parameters']:,} |",
        f"| tokens seen | {summary['tokens_seen']:,} |",
        f"| optimizer steps | {summary['steps']} ({summary['skipped_steps']} skipped) |",
        f"| training time | {summary['train_seconds']:.0f} s |",
        f"| final validation loss | {summary.get('val_loss', float('nan')):.4f} nats/token |",
        f"| validation perplexity | {summary.get('val_ppl', float('nan')):.2f} |",
        f"| validation bits per byte | {summary.get('val_bpb', float('nan')):.4f} |", "",
        f"![loss curve]({loss_png.relative_to(run)})", "",
        "## Samples (temperature 0.8, top-k 50)", "",
    ]
    for prompt, text in samples:
        lines += [f"- **{prompt}** {text.strip()}"]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    if tokenizer_seconds is not None:
        lines += [f"| (tokenizer training, inside data) | {tokenizer_seconds:.1f} |"]
    lines += ["", "## Data", "", f"World: size {cfg.world_size}, seed {cfg.seed}.", "",
              "Pipeline funnel (kept/dropped per step): see `data/report.md` and `data/funnel.png`.", "",
              "## Model and training config", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(to_dict(cfg.pretrain), sort_keys=False).rstrip(), "```", ""]
    lines += [f"Model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} KV), "
              f"{m.position}, {m.norm}, {m.mlp}; optimizer {cfg.pretrain.optim.name}, schedule {cfg.pretrain.schedule.name}."]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


from lmstack.config import ConfigCommand  # noqa: E402

COMMANDS = ConfigCommand(SpeedrunConfig, speedrun)
