"""`lmstack data ...` commands.

Usage:
    lmstack data synth --out data/world --size small --seed 0
    lmstack data synth-vision --out data/vision --n_images 200 --size 64 --seed 0
    lmstack data synth-nav --out data/nav --n_train 400 --grid 5    # navigation maps, instructions, gold paths
    lmstack data synth-emotion --out data/emotion --n 600           # prosody arousal x typed valence (emotion proxy)
    lmstack data run --config pipeline.yaml [--workers 2] [--dedup.near simhash] ...
    lmstack data add --out data/pipeline --inputs '[new/*.jsonl]' --source news
    lmstack data train-classifier --labelled labelled.jsonl --out quality_model
    lmstack data selflabel --labelled labelled.jsonl --unlabelled pool.jsonl --out quality_model
    lmstack data verify --shards data/pipeline/shards

`run` takes exactly the fields of PipelineConfig as flags, so `--config pipeline.yaml` is a plain
PipelineConfig YAML and any field can be overridden with a dotted flag.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from lmstack.data.augment import AugmentConfig
from lmstack.data.decontaminate import DecontamConfig
from lmstack.data.dedup import DedupConfig
from lmstack.data.expand import add_sources
from lmstack.data.filters import FiltersConfig
from lmstack.data.filters.classifier import load_labelled, split_heldout, train_classifier as _train
from lmstack.data.mixing import MixConfig
from lmstack.data.pipeline import PipelineConfig, run_pipeline
from lmstack.data.readers import read_documents
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import ReadStats
from lmstack.data.report import bad_record_lines
from lmstack.data.selflabel import self_train
from lmstack.data.shards import ShardConfig, ShardSet, entry_valid, read_manifest
from lmstack.errors import LmstackError
from lmstack.multimodal.emotion_world import synth_emotion
from lmstack.multimodal.nav_world import synth_nav
from lmstack.multimodal.speech_world import synth_speech
from lmstack.multimodal.video_world import synth_video
from lmstack.multimodal.vision_world import synth_vision


def run(inputs: list[ReaderConfig] | None = None, out: str = "data/pipeline", workers: int = 2, batch_size: int = 256,
        filters: FiltersConfig | None = None, dedup: DedupConfig | None = None, decontam: DecontamConfig | None = None,
        augment: AugmentConfig | None = None, mix: MixConfig | None = None, shards: ShardConfig | None = None,
        progress: bool = True, executor: Literal["local", "ray"] = "local", ray_address: str = "") -> None:
    """Run the data pipeline: read -> filter -> dedup -> decontaminate -> mix -> shard.

    Args:
        inputs: Sources to read, e.g. [{path: corpus/*.jsonl, text_fields: [text]}].
        out: Output directory (clean.jsonl, shards/, report.json/.md, funnel.png).
        workers: Worker processes (1 = run in this process).
        batch_size: Documents per batch handed to a worker.
        filters: Filter settings; each filter has `enabled`.
        dedup: Exact and near-duplicate settings.
        decontam: Evaluation sets to decontaminate against.
        augment: Counterfactual and noise augmentation.
        mix: Source weights, language temperature, topic balance.
        shards: Tokenizer and shard layout.
        progress: Show progress bars and the final table.
        executor: local (a process pool here) or ray (Ray Data; same output bytes; needs `pip install -e '.[ray]'`).
        ray_address: executor=ray: '' starts a local Ray instance with `workers` CPUs; 'auto' joins the cluster
            `ray start --head` made on this machine; 'HOST:6379' or 'ray://HOST:10001' a remote one.
    """

    cfg = PipelineConfig(inputs=inputs or [], out=out, workers=workers, batch_size=batch_size,
                         filters=filters or FiltersConfig(), dedup=dedup or DedupConfig(),
                         decontam=decontam or DecontamConfig(), augment=augment or AugmentConfig(),
                         mix=mix or MixConfig(), shards=shards or ShardConfig(), progress=progress,
                         executor=executor, ray_address=ray_address)
    report = run_pipeline(cfg)
    if not progress:  # with progress on, run_pipeline has printed these under its table already

        for line in bad_record_lines(report):
            print(line)
    print(f"wrote {cfg.out}/report.json, report.md, funnel.png; shards in {report.sections['shards']['dir']}")


def add(out: str = "", inputs: list[str] | None = None, source: str = "", text_fields: list[str] | None = None,
        text_mode: Literal["file", "paragraph", "line"] = "file", workers: int | None = None) -> None:
    """Append new sources to an existing shard set (dedup against stored signatures, new shards only).

    Args:
        out: Output directory of an earlier `lmstack data run`.
        inputs: Files, directories or globs to add.
        source: Source name for the new documents (default: each path's stem).
        text_fields: JSONL/CSV fields holding the text (default: [text]).
        text_mode: For text files: file, paragraph or line.
        workers: Worker processes (default: as in the original run).
    """

    if not out or not inputs:
        raise LmstackError("add needs --out (an existing pipeline output) and --inputs")
    readers = [ReaderConfig(path=p, source=source, text_fields=text_fields or ["text"], text_mode=text_mode)
               for p in inputs]
    report = add_sources(out, readers, workers)
    gen = report.sections["generation"]
    print(f"added generation {gen['generation']}: {report.sections['shards']['docs']} documents in "
          f"{report.sections['shards']['shards']} new shard(s) from #{gen['first_shard']}")


def train_classifier(labelled: str = "", out: str = "", positive: str = "good", heldout: float = 0.2,
                     seed: int = 0) -> None:
    """Train the hashed n-gram quality classifier; print precision/recall on a held-out split.

    Args:
        labelled: JSONL ({"text", "label"}) or fastText ('__label__good text') file.
        out: Directory for classifier.json + weights.npy.
        positive: Label name of the positive class (the one the filter keeps).
        heldout: Fraction held out for evaluation.
        seed: Seed of the split.
    """
    if not labelled or not out:
        raise LmstackError("train-classifier needs --labelled and --out")
    result = _train(labelled, out, positive=positive, heldout=heldout, seed=seed)
    m = result["heldout"]
    print(f"trained on {result['train']} examples; held-out ({m['n']}): precision {m['precision']:.3f} "
          f"recall {m['recall']:.3f} f1 {m['f1']:.3f}; saved to {out}")


def selflabel(labelled: str = "", unlabelled: str = "", out: str = "", positive: str = "good", heldout: float = 0.3,
              confidence: float = 0.9, rounds: int = 3, seed: int = 0) -> None:
    """Self-training: pseudo-label confident unlabelled documents, retrain, report P/R before and after.

    Args:
        labelled: Labelled file (as for train-classifier); part of it is held out for evaluation.
        unlabelled: JSONL/text file of unlabelled documents (a 'label' field, if present, only scores the pseudo-labels).
        out: Directory for the final classifier.
        positive: Label name of the positive class.
        heldout: Fraction of the labelled file held out for evaluation.
        confidence: Pseudo-label only where P >= confidence (or <= 1 - confidence).
        rounds: Self-training rounds.
        seed: Seed of the split.
    """

    if not labelled or not unlabelled or not out:
        raise LmstackError("selflabel needs --labelled, --unlabelled and --out")
    texts, labels = load_labelled(labelled, positive)
    train_idx, held_idx = split_heldout(len(texts), heldout, seed, labels)
    docs = list(read_documents(ReaderConfig(path=unlabelled, meta_fields=["label"], text_mode="line"), ReadStats()))
    pool = [d["text"] for d in docs]
    truth = [d["meta"].get("label") for d in docs]
    pool_labels = [int(t == positive or t == 1) for t in truth] if all(t is not None for t in truth) and docs else None
    result = self_train([texts[i] for i in train_idx], [labels[i] for i in train_idx], pool,
                        [texts[i] for i in held_idx], [labels[i] for i in held_idx], confidence, rounds,
                        pool_labels=pool_labels)
    result["classifier"].save(out)
    b, a = result["before"], result["after"]
    print(f"pseudo-labelled {result['pseudo_labelled']} of {len(pool)} documents"
          + (f" (accuracy {result['pseudo_label_accuracy']:.3f})" if "pseudo_label_accuracy" in result else ""))
    print(f"held-out precision {b['precision']:.3f} -> {a['precision']:.3f}, recall {b['recall']:.3f} -> {a['recall']:.3f}, "
          f"f1 {b['f1']:.3f} -> {a['f1']:.3f}; saved to {out}")


def verify(shards: str = "") -> None:
    """Check every shard against its manifest checksums and print the set's totals.

    Args:
        shards: Shard directory (holding manifest.json).
    """
    manifest = read_manifest(shards) if shards else None
    if manifest is None:
        raise LmstackError(f"no shard manifest in {shards!r}")
    bad = [e["file"] for e in manifest["shards"] if not entry_valid(Path(shards), e)]
    if bad:
        raise LmstackError(f"{len(bad)} shard(s) do not match their checksums: {', '.join(bad[:5])}")
    lengths = ShardSet(shards).doc_lengths()
    print(f"{len(manifest['shards'])} shards OK: {manifest['total_docs']:,} documents, {manifest['total_tokens']:,} "
          f"{manifest['dtype']} tokens (mean {float(np.mean(lengths)) if len(lengths) else 0:.0f}/doc), "
          f"{manifest['bytes']:,} bytes on disk ({manifest['compression']}), generations "
          f"{[g['generation'] for g in manifest.get('generations', [])]}")


COMMANDS = {"run": run, "add": add, "train-classifier": train_classifier, "selflabel": selflabel, "verify": verify,
            "synth-vision": synth_vision, "synth-video": synth_video, "synth-nav": synth_nav,
            "synth-speech": synth_speech, "synth-emotion": synth_emotion}

try:  # the synthetic world is built separately; offer `synth` once it exists
    from lmstack.world import synth

    COMMANDS["synth"] = synth
except ModuleNotFoundError as e:
    if e.name != "lmstack.world":
        raise
