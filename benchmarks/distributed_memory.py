"""Per-rank training memory under each torch.distributed strategy, against DDP, on 2 CPU processes (gloo).

Each strategy trains llama-small (GQA with 2 KV heads, so tensor parallelism can split it 2 ways)
for 2 AdamW steps on the same data; then, with weights, gradients and Adam moments all alive, every
rank counts the bytes it holds (local shards only; lmstack.train.distributed.local_memory_bytes).
DDP, where every rank holds everything, is the baseline: ratio = DDP bytes / ours, so 2.0 means half.
Theory for AdamW in fp32 (4 + 4 + 8 bytes per parameter) on 2 ranks: ZeRO-1 shards the 8 bytes of
moments -> 16/12 = 1.33; FSDP2 (ZeRO-3) shards all 16 -> 2.0; TP shards only the attention/MLP
projections (embeddings, norms and head stay whole), so it lands in between. (Speed is not measured:
two processes sharing two cores say nothing about a real interconnect.)

Usage:
    python benchmarks/distributed_memory.py            # writes benchmarks/results/distributed_memory.json
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from _common import result, write_result

STRATEGIES = ["ddp", "zero1", "fsdp2", "tp"]
PRESET, OVERRIDES = "llama-small", {"n_kv_heads": 2}
STEPS, BATCH, SEQ = 2, 2, 64
GOALS = {"zero1": 1.3, "fsdp2": 1.9, "tp": None}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.nn.functional as F

    from lmstack.model import Transformer, preset
    from lmstack.train import distributed as D

    torch.set_num_threads(1)
    D.init_distributed(D.DistributedConfig(backend="gloo"))
    found = {}
    for strategy in STRATEGIES:
        cfg = D.DistributedConfig(strategy=strategy, backend="gloo")
        torch.manual_seed(0)
        model = D.parallelize(Transformer(preset(PRESET, **OVERRIDES)), cfg, torch.device("cpu"))
        opt = D.wrap_optimizer(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), cfg)
        dp_rank, dp_size = D.data_parallel_info(cfg)
        data = torch.randint(0, 8192, (STEPS, BATCH * 2, SEQ + 1), generator=torch.Generator().manual_seed(0))
        data = data[:, dp_rank * (BATCH * 2 // dp_size):(dp_rank + 1) * (BATCH * 2 // dp_size)]
        for i in range(STEPS + 1):
            rows = data[i % STEPS]
            loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            if i == STEPS:  # everything alive at once: weights, gradients, moments
                found[strategy] = D.local_memory_bytes(model, opt)
                break
            D.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        del model, opt
        D.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    D.cleanup()


def main() -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    # the rank that holds the most is the one that decides whether a model fits
    worst = {s: max(ranks, key=lambda r: r[s]["total"])[s] for s in STRATEGIES}
    ddp = worst["ddp"]
    results = []
    config = {"preset": PRESET, **OVERRIDES, "world_size": 2, "backend": "gloo", "optimizer": "AdamW fp32"}
    for s in ("zero1", "fsdp2", "tp"):
        m = worst[s]
        results.append(result("distributed_memory", f"bytes_per_rank_{s}", False, m["total"], "ddp", ddp["total"],
                              goal=GOALS[s], **config, breakdown=m, ddp_breakdown=ddp))
        print(f"{s}: params {m['params'] / 2**20:.1f} MiB, grads {m['grads'] / 2**20:.1f} MiB, "
              f"optimizer {m['optimizer'] / 2**20:.1f} MiB (ddp: {ddp['total'] / 2**20:.1f} MiB in all)")
    write_result("distributed_memory", results)


if __name__ == "__main__":
    sys.exit(main())
