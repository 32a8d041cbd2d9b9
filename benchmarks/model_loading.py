"""Checkpoint loading: memory-mapped lazy loading vs eager loading (seed VIII.13, serverless cold starts).

A ~123M-parameter llama-base checkpoint (fp32, ~0.5 GB) is saved once; each loader then runs in a
fresh subprocess that loads it and computes logits for 8 tokens, reporting wall time to first
logits and peak RSS. Baselines: our eager path (read every file into memory, then copy into an
initialised model: what most loaders do) and transformers' from_pretrained.
A second measurement loads only the shards of a 4-shard checkpoint that one pipeline stage (the
first half of the layers) needs.

Usage:
    python benchmarks/model_loading.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result


def worker(mode: str, path: str) -> dict:
    import torch

    torch.set_num_threads(2)
    reset_peak_rss()
    rss0 = rss_mb()
    start = time.perf_counter()
    x = torch.randint(0, 32000, (1, 8))
    import lmstack  # imports are not part of loading  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401
    start = time.perf_counter()
    if mode == "hf":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path).eval()
        ready = time.perf_counter() - start
        with torch.no_grad():
            model(x)
    elif mode == "stage":
        from lmstack.model.lazy_safetensors import CheckpointReader

        reader = CheckpointReader(path)
        names = [k for k in reader.keys() if any(f"layers.{i}." in k for i in range(6))]
        total = sum(float(reader.get(k).sum()) for k in names)  # touch every byte the stage needs
        return {"seconds": time.perf_counter() - start, "shards_opened": len(reader.opened), "checksum": total}
    else:
        import lmstack

        model = lmstack.load_model(path, lazy=(mode == "lazy"))
        ready = time.perf_counter() - start
        with torch.no_grad():
            model(x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ready_seconds": ready, "peak_mb": peak_rss_mb() - rss0}


def run(mode: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    import lmstack
    from lmstack.model import Transformer, preset

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as single, tempfile.TemporaryDirectory() as sharded:
        model = Transformer(preset("llama-base"))
        lmstack.save_model(model, single)
        lmstack.save_model(model, sharded, max_shard_bytes=130 * 1024**2)
        del model
        rows = {}
        for mode in ("eager", "lazy", "hf", "eager", "lazy", "hf"):  # twice, keep the better (warm page cache)
            r = run(mode, single)
            if mode not in rows or r["seconds"] < rows[mode]["seconds"]:
                rows[mode] = r
        for mode, r in rows.items():
            print(f"{mode:6s} {r['ready_seconds']:.2f} s to a usable model, {r['seconds']:.2f} s to first logits, "
                  f"peak RSS +{r['peak_mb']:.0f} MB", flush=True)
        stage = run("stage", sharded)
        n_shards = len(set(json.load(open(f"{sharded}/model.safetensors.index.json"))["weight_map"].values()))
        print(f"pipeline stage (layers 0-5): opened {stage['shards_opened']} of {n_shards} shards in "
              f"{stage['seconds']:.2f} s")
    cfg = dict(preset="llama-base", dtype="float32", checkpoint_mb=494)
    results = [
        result("model_loading", "seconds_to_usable_model", False, rows["lazy"]["ready_seconds"], "lmstack eager load",
               rows["eager"]["ready_seconds"], **cfg),
        result("model_loading", "seconds_to_first_logits", False, rows["lazy"]["seconds"], "lmstack eager load",
               rows["eager"]["seconds"], **cfg),
        result("model_loading", "peak_rss_mb", False, rows["lazy"]["peak_mb"], "lmstack eager load",
               rows["eager"]["peak_mb"], **cfg),
        result("model_loading", "seconds_to_first_logits_vs_hf", False, rows["lazy"]["seconds"],
               "transformers from_pretrained", rows["hf"]["seconds"], **cfg),
        result("model_loading", "peak_rss_mb_vs_hf", False, rows["lazy"]["peak_mb"], "transformers from_pretrained",
               rows["hf"]["peak_mb"], **cfg),
        result("model_loading", "shards_opened_for_half_the_layers", False, stage["shards_opened"],
               "all shards", n_shards, **cfg),
    ]
    write_result("model_loading", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
    else:
        main()
