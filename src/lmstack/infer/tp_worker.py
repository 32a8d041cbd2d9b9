"""A tensor-parallel worker (ranks 1..N-1): hold one shard of the model and run every step rank 0 sends.

The worker reads its settings from rank 0 through the store (model directory, KV pool size, dtype, device,
threads), loads the directory, keeps its shard (tp_shard.py) and builds the same ModelRunner as rank 0's
engine, so both run one forward with the same thread and kernel policy. Then it loops: a header
[command, length] and a payload from rank 0; STEP runs the forward on the received inputs (tp_step.py)
and joins its all-reduces, COPY copies KV blocks, STOP ends the loop. Only rank 0 computes logits.

It never outlives rank 0: rank 0's closed sockets end a wait with an error, and a spawned worker also
checks every half second that its parent is alive.

Usage:
    python -m lmstack.infer.tp_worker      # with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set (rank 0 spawns it)
    torchrun --nnodes 2 --nproc_per_node 1 ... -m lmstack.cli serve --model DIR --tensor-parallel-size 2
        # ranks > 0 of `lmstack serve` call run_worker() instead of serving HTTP
"""
from __future__ import annotations

import json
import os
import threading
import time

import torch

from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.step_plan import StepPlan
from lmstack.infer.threads import engine_threads
from lmstack.infer.tp_group import (CONFIG_KEY, COPY, IDLE_TIMEOUT, READY_KEY, STEP, STOP, connect, env_store,
                                    torchrun_rank)
from lmstack.infer.tp_shard import shard_model
from lmstack.infer.tp_step import unpack_step
from lmstack.model.hf_io import load_model


class _Inputs:
    """The worker's ModelRunner hook: the step's inputs are the ones rank 0 sent, not planned here."""

    def __init__(self):
        self.step = None

    def step_inputs(self, runner, plan):
        return self.step


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:  # re-parented: rank 0 is gone
            os._exit(1)


def run_worker(world_size: int | None = None, startup_timeout_s: float = 600.0) -> None:
    """The worker loop of this process's rank (from RANK / WORLD_SIZE); returns when rank 0 says stop."""
    world_size = world_size or int(os.environ["WORLD_SIZE"])
    rank = torchrun_rank(world_size)
    parent = os.environ.get("LMSTACK_TP_PARENT")
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True).start()
    store = env_store(startup_timeout_s)
    cfg = json.loads(store.get(CONFIG_KEY))
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    model = load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]), device=str(device)).eval()
    reduce = shard_model(model, rank, world_size)
    runner = ModelRunner(model, cfg["num_blocks"], cfg["block_size"], device,
                         kv_cache_dtype=cfg.get("kv_cache_dtype", "auto"))  # each rank's pool holds its heads
    inputs = runner.tp = _Inputs()
    store.set(f"{READY_KEY}{rank}", "1")
    cpu_group, reduce.group = connect(store, rank, world_size, device)
    header = torch.zeros(2, dtype=torch.int64)
    while True:
        cpu_group.broadcast(header, 0, IDLE_TIMEOUT).wait()
        command, n = header.tolist()
        if command == STOP:
            return
        payload = torch.empty(n, dtype=torch.int64)
        if n:
            cpu_group.broadcast(payload, 0).wait()
        if command == STEP:
            inputs.step = unpack_step(payload, device)
            with engine_threads():  # the thread policy of rank 0's engine step (threads.py)
                runner.run(StepPlan(num_rows=inputs.step[0].shape[1]))
            inputs.step = None
        elif command == COPY:
            runner.cache.copy_blocks(payload.view(-1, 2).tolist())


if __name__ == "__main__":
    run_worker()
