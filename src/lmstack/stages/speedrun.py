"""`lmstack speedrun`: the main job, end to end on the built-in synthetic world, on a laptop CPU.

1. generate the synthetic world (lmstack.world);
2. run the data pipeline on its pretraining corpus (filters, dedup, decontamination against the
   held-out QA, shards), training
3. the byte-level BPE tokenizer on the cleaned text just before sharding;
4. pretrain a small llama-style model with a wall-clock budget;
5. sample from it;
6. evaluate it briefly (synthetic-world tasks and bits-per-byte on the world's validation text, within
   eval_seconds) into eval_base.json;
7. fine-tune it on the world's chat data (QA, arithmetic, instructions, personas) for sft_seconds and score
   base vs SFT on held-out world tasks (lmstack.stages.sft) into sft/;
   With `rag` on, retrieval-formatted chats go into that mix first: the world's bios are indexed into rag/index
   and each QA train question becomes the prompt `RAG.ask` would build (lmstack.stages.rag);
8. align the SFT model for align_seconds: DPO with RPO's NLL term on the world's preference pairs, then GRPO
   on arithmetic and safety requests (math + safety reward, KL anchor), with a validation guard, measured
   before and after (lmstack.stages.align) into align/;
9. RAG: score world QA closed-book against with retrieval, for the SFT and the aligned model, into rag/;
10. write summary.json and the report card runs/<timestamp>/report.md (lmstack.eval.report), which renders
   whatever stages the run directory holds, and name the model to chat with: the aligned one (align/model),
   with the SFT model beside it.

Usage:
    lmstack speedrun                                   # recipes/speedrun.yaml's defaults
    lmstack speedrun --config recipes/speedrun.yaml --pretrain.train.max_seconds 300
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
from pathlib import Path
import threading
import time
from typing import Literal

import torch

from lmstack import kernels
from lmstack.adapt import merge_and_unload
from lmstack.adapt.finetune import load_result
from lmstack.config import atomic_write_text, save_config
from lmstack.data.decontaminate import DecontamConfig
from lmstack.data.filters import FiltersConfig
from lmstack.data.filters.quality import QualityConfig
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.data.readers import read_all
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.shards import ShardConfig, write_shards
from lmstack.eval.evaluator import evaluate
from lmstack.eval.local_lm import LocalLM
from lmstack.eval.report import build_report
from lmstack.eval.task import list_tasks
from lmstack.eval.tasks.perplexity import PerplexityTask
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.reference_decode import reference_decode
from lmstack.errors import LmstackError
from lmstack.stages import rag
from lmstack.stages.align import align_stage
from lmstack.stages.sft import sft_stage
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import LogConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig
from lmstack.train.pretrain import DataConfig, PretrainConfig, pretrain
from lmstack.world import World, generate_world


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
    eval_tasks: list[str] = field(default_factory=lambda: ["bigbench_world_birth_country", "world_qa", "world_arithmetic"])
    """Eval tasks run on the pretrained model, in order (bits-per-byte on the world's validation text is
    always added); a task that is not available is recorded as skipped."""
    eval_limit: int = 50
    """Items per eval task."""
    eval_seconds: float = 120.0
    """Time budget of the eval stage; tasks that would start after it are recorded as skipped (0 = no eval)."""

    sft_seconds: float = 120.0
    """Time budget of the SFT stage on the world's QA, arithmetic, instruction and persona chats (0 = no SFT)."""
    sft_method: Literal["full", "lora", "dora", "qlora", "adapter", "ia3"] = "full"
    """How the SFT stage fine-tunes (full fine-tuning is the baseline; the others train adapters)."""
    align_seconds: float = 150.0
    """Training budget of the alignment stage after SFT: DPO on the world's preference pairs, then GRPO on
    arithmetic with the math verifier (0 = no alignment stage; it needs the SFT stage)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics beside every stage's metrics.jsonl (pretrain, SFT, DPO, GRPO): --log.tensorboard true,
    --log.wandb true. When set here it replaces pretrain.log."""
    threads: int = 0
    """CPU threads for torch in every stage: 0 = auto (the cores this process may use, minus one and minus
    those other processes keep busy; at least 1), N = exactly N. pretrain.train.threads, if set, wins there."""

    rag: bool = True
    """The RAG stage (lmstack.stages.rag; needs the SFT stage and MiniLM, in lmstack[rag]): index the world's bios,
    mix retrieval-formatted chats into SFT, and score world QA closed-book against with retrieval."""
    rag_k: int = 2
    """Bios retrieved per question (two bios, the question and the answer fit the 256-token context)."""
    rag_mode: Literal["bm25", "dense", "hybrid"] = "bm25"
    """How the RAG stage retrieves, for its training chats and its scores alike."""
    rag_eval_limit: int = 100
    """Held-out QA questions the RAG stage scores, closed-book and with retrieval."""
    rag_mix: float = 3.0
    """Weight of the retrieval-formatted chats in the SFT mix (the world's QA chats weigh 3.0). At the speedrun's
    size they teach the answer's form (a cited value), not finding the value in the context: docs/techniques.md S.5."""

    def __post_init__(self):
        if self.rag_k < 1 or self.rag_eval_limit < 1 or self.rag_mix <= 0:
            raise ValueError(f"rag_k and rag_eval_limit must be >= 1 and rag_mix > 0; got rag_k={self.rag_k}, "
                             f"rag_eval_limit={self.rag_eval_limit}, rag_mix={self.rag_mix}")
        if self.sft_seconds < 0:
            raise ValueError(f"sft_seconds must be >= 0 (0 = no SFT stage), got {self.sft_seconds}")
        if self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1, got {self.eval_limit}")
        if self.align_seconds < 0:
            raise ValueError(f"align_seconds must be >= 0 (0 = no alignment stage), got {self.align_seconds}")
        if self.eval_seconds < 0:
            raise ValueError(f"eval_seconds must be >= 0 (0 = no eval stage), got {self.eval_seconds}")


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def speedrun(cfg: SpeedrunConfig) -> dict:
    """Run the whole pipeline (world -> data -> tokenizer -> pretrain -> samples -> report)."""

    # one decision for the whole run (measured now, before our own stages load the machine)
    threads = set_threads(cfg.threads, log=print)
    if not cfg.pretrain.train.threads:
        cfg.pretrain.train.threads = threads
    start = time.perf_counter()
    run = Path(cfg.out) / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "speedrun.yaml")
    timings: dict[str, float] = {}
    kernel = kernels.info()
    if kernel["enabled"] and kernel["path"] is None:
        # The engine's CPU decode kernels (VIII.16) compile once per machine, ~40 s of compiler time. Start now, in
        # the background beside the data stages, rather than at the engine's first start (eval); the engine waits
        # for this build if it is still running. Later runs load the cached library.
        print("compiling the engine's CPU decode kernels in the background (once per machine)", flush=True)
        threading.Thread(target=kernels.available, name="lmstack-kernel-build", daemon=True).start()

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
    run_pipeline(pipe, before_shards=train_tok)  # writes data/report.json, which the report card reads
    val_docs = read_all([ReaderConfig(path=str(world / "pretrain" / "val.jsonl"), source="world")])
    write_shards(val_docs, data / "val_shards", ShardConfig(tokenizer=str(tok_dir)), workers=1)
    timings["data_and_tokenizer"] = time.perf_counter() - t

    t = _step("4. pretrain")
    pcfg = cfg.pretrain
    pcfg.out = str(run / "pretrain")
    pcfg.data.shards, pcfg.data.val_shards, pcfg.data.tokenizer = str(data / "shards"), str(data / "val_shards"), str(tok_dir)
    pcfg.train.seed = cfg.seed
    if cfg.log != LogConfig():
        pcfg.log = cfg.log
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
        out = reference_decode(model, ids, cfg.sample_tokens, temperature=0.8, top_k=50, eos_id=tok.eos_id, seed=cfg.seed + i)
        text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        samples.append((prompt, text))
        print(f"{prompt!r} -> {text!r}")
    timings["samples"] = time.perf_counter() - t

    if cfg.eval_seconds > 0:
        t = _step("6. eval")
        run_eval_stage(run, model_dir, world, cfg)
        timings["eval"] = time.perf_counter() - t

    sections = []
    models = {"base": str(model_dir)}  # each stage's product; the last one is the model to chat with
    if cfg.sft_seconds > 0:
        seq_len = min(256, pcfg.model.max_seq_len)
        rag_index, extra = None, {}
        rag_world = World(seed=cfg.seed, size=cfg.world_size) if cfg.rag else None  # the world generated above
        if cfg.rag:
            t = _step("7a. RAG: index the world's bios, and write retrieval-formatted chats for SFT")
            rag_index, extra = rag_stage_data(run, cfg, rag_world, tok, seq_len)
            timings["rag_data"] = time.perf_counter() - t
        t = _step("7. supervised fine-tuning (chat)")
        sft = sft_stage(run, model_dir, budget_s=cfg.sft_seconds, world_dir=world, method=cfg.sft_method,
                        seed=cfg.seed, seq_len=seq_len, log_cfg=pcfg.log, extra=extra,
                        extra_mix={rag.KIND: cfg.rag_mix} if extra else None)
        sections.append("sft/report.md")  # base vs SFT on the held-out world tasks, in the report card
        timings["sft"] = time.perf_counter() - t
        if cfg.align_seconds > 0:
            t = _step("8. alignment (DPO on preference pairs, then GRPO on arithmetic)")
            sft_dir = sft_model_dir(model_dir, Path(sft["result"]), run)
            models["sft"] = str(sft_dir)
            align_stage(run, sft_dir, world, budget_s=cfg.align_seconds, seed=cfg.seed, log_cfg=pcfg.log)
            models["aligned"] = str(run / "align" / "model")
            sections.append("align/report.md")  # SFT -> aligned, with the base column
            timings["align"] = time.perf_counter() - t
        else:
            models["sft"] = str(sft_model_dir(model_dir, Path(sft["result"]), run))
        if rag_index is not None:
            t = _step("9. RAG: world QA closed-book against with retrieval")
            chat_models = {k: v for k, v in models.items() if k != "base"}
            rag.rag_stage(run, chat_models, rag_world, rag_index,
                          n_eval=cfg.rag_eval_limit, k=cfg.rag_k, mode=cfg.rag_mode, seed=cfg.seed)
            sections.append("rag/report.md")
            timings["rag"] = time.perf_counter() - t

    total = time.perf_counter() - start
    if tok_seconds.get("seconds") is not None:
        timings["(tokenizer training, inside data)"] = tok_seconds["seconds"]
    write_summary(run, cfg, manifest, summary, samples, timings, total, sections, models)
    path = build_report(run)
    print(f"\nspeedrun finished in {total / 60:.1f} min; report: {path}")
    print(closing_lines(models))
    return {"run": str(run), "report": str(path), "summary": summary, "seconds": total, "samples": samples,
            "models": models}


def rag_stage_data(run: Path, cfg: SpeedrunConfig, world: World, tok, seq_len: int
                   ) -> tuple[object, dict[str, list[dict]]]:
    """(the bios' index, {"train": [...], "val": [...]} retrieval-formatted chats), or (None, {}) where MiniLM
    is not installed or the context is too short: the run goes on without the RAG stage and says why."""
    if seq_len < rag.MIN_CONTEXT:
        print(f"skipping the RAG stage: a {seq_len}-token context cannot hold a bio, a question and an answer "
              f"(it needs {rag.MIN_CONTEXT})", flush=True)
        return None, {}
    try:
        index = rag.build_world_index(world, run / "rag" / "index")
    except LmstackError as e:
        print(f"skipping the RAG stage: {e}", flush=True)
        return None, {}
    extra = {split: rag.training_records(index, tok, world, split, max_model_len=seq_len, k=cfg.rag_k,
                                         mode=cfg.rag_mode, n=n, seed=cfg.seed)
             for split, n in (("train", None), ("val", 200))}
    print(f"RAG: {len(index)} bios indexed; {len(extra['train'])} train / {len(extra['val'])} val retrieval chats")
    return index, extra


def closing_lines(models: dict[str, str]) -> str:
    """Where the run's models are, pointing the user at the last chat model (aligned, else SFT); a base model
    that was never fine-tuned only continues text, so it is offered for generate, not chat."""
    chat = models.get("aligned") or models.get("sft")
    if chat is None:
        return (f"the pretrained base model (no chat fine-tuning ran, so it continues text rather than chats): "
                f"lmstack generate --model {models['base']} --prompt \"Once upon a time\"")
    lines = [f"chat with the {'aligned' if 'aligned' in models else 'SFT'} model: lmstack chat --model {chat}"]
    if "aligned" in models:
        lines.append(f"the SFT model it was aligned from: {models['sft']}")
    lines.append(f"the pretrained base model (text continuation, not chat): {models['base']}")
    return "\n".join(lines)


def sft_model_dir(base_dir: Path, result: Path, run: Path) -> Path:
    """A plain model directory of the SFT result: itself for full fine-tuning, else the base with the adapter
    merged in (written once to run/sft/merged), so the alignment stage trains every weight either way."""
    if (result / "config.json").is_file():
        return result

    merged = run / "sft" / "merged"
    save_model(merge_and_unload(load_result(base_dir, result)), merged, tokenizer=load_tokenizer(base_dir))
    return merged


def run_eval_stage(run: Path, model_dir: Path, world: Path, cfg: SpeedrunConfig, stage: str = "base") -> dict:
    """Evaluate the model on cfg.eval_tasks + bits-per-byte of the world's validation text, within
    cfg.eval_seconds; writes run/eval_<stage>.json (evaluate()'s format) and per-item logs in run/eval_<stage>/."""

    out_dir = run / f"eval_{stage}"
    val_text = out_dir / "world_val.txt"
    docs = [json.loads(line)["text"] for line in (world / "pretrain" / "val.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    atomic_write_text(val_text, "\n\n".join(docs)[:20_000])
    ppl = PerplexityTask(path=str(val_text))
    ppl.name = "world_val_bpb"
    lm = LocalLM(model_dir)
    available = set(list_tasks())
    results: dict = {}
    deadline = time.perf_counter() + cfg.eval_seconds
    for task in [ppl, *cfg.eval_tasks]:
        name = task if isinstance(task, str) else task.name
        if isinstance(task, str) and task not in available:
            results[name] = {"skipped": f"task {name!r} is not available in this build"}
        elif time.perf_counter() > deadline:
            results[name] = {"skipped": f"the eval budget of {cfg.eval_seconds:.0f} s was spent"}
        else:
            results.update(evaluate(lm, [task], limit=cfg.eval_limit, bootstrap_iters=200, out_dir=out_dir,
                                    progress=True)["results"])
    output = {"results": results, "config": {"model": str(model_dir), "limit": cfg.eval_limit, "stage": stage,
                                             "budget_s": cfg.eval_seconds}}
    atomic_write_text(run / f"eval_{stage}.json", json.dumps(output, indent=2, default=str))
    return output


def write_summary(run: Path, cfg: SpeedrunConfig, world_manifest: dict, summary: dict,
                  samples: list[tuple[str, str]], timings: dict[str, float], total: float,
                  sections: list[str] | None = None, models: dict[str, str] | None = None) -> Path:
    """run/summary.json: what the report card shows beside the stage outputs (timings, result, samples)."""

    m = cfg.pretrain.model
    data = {"total_seconds": total, "timings": timings, "pretrain": summary,
            "model": f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} KV), "
                     f"{m.position}, {m.norm}, {m.mlp}; optimizer {cfg.pretrain.optim.name}, "
                     f"schedule {cfg.pretrain.schedule.name}",
            "world": {"size": cfg.world_size, "seed": cfg.seed, "pretrain_bytes": world_manifest.get("pretrain_bytes")},
            "samples": [{"prompt": p, "text": t} for p, t in samples],
            "samples_note": "temperature 0.8, top-k 50", "sections": sections or [], "models": models or {}}
    path = run / "summary.json"
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
    return path


from lmstack.config import ConfigCommand  # noqa: E402

COMMANDS = ConfigCommand(SpeedrunConfig, speedrun)
