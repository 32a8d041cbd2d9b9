"""Rank 0's side of tensor-parallel serving: start (or join) the workers, send them every step, watch them.

Rank 0 runs the whole engine (scheduler, block manager, sampler, server); ranks 1..N-1 run tp_worker.py:
they load the same model directory, keep their shard (tp_shard.py), and for each step receive what
rank 0's ModelRunner.build produced (tp_step.py), run the same forward and join its all-reduces. Block
copies (copy-on-write) are sent the same way, so every rank's KV pool holds the same blocks.

Two process groups, made directly from a store (no default group, so a process may hold several engines):
- a gloo group on the CPU carries the step messages (a [command, length] header, then the int64 payload);
  a worker waits for the next header without a deadline (an idle server is fine), but dies with rank 0,
  whose sockets close;
- the all-reduces of the row-parallel projections use the same gloo group on CPU, NCCL on CUDA, with a
  COLLECTIVE_TIMEOUT_S deadline.

On one machine the workers are child processes (`python -m lmstack.infer.tp_worker`) that find rank 0's
store through the environment torchrun also uses (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Under
torchrun (WORLD_SIZE == tensor_parallel_size) nothing is spawned: rank 0 joins the torchrun rendezvous, and
the other ranks run the worker loop (`lmstack serve` does that on ranks > 0), on any number of nodes.

Faults: a watchdog thread polls the child processes; a dead one, or a collective that fails (a closed
socket, a timeout), puts the group in a failed state (`failure`): the running step raises, every later step
refuses at once, and a server reports unhealthy (AsyncLLMEngine.loop_error). Nothing waits forever.

Threads: N processes share the machine's cores, so each rank runs torch.get_num_threads() // N threads
(at least 1); rank 0's own count is set for the group's life and restored by close().

Usage (the engine does this when tensor_parallel_size > 1):
    reduce = shard_model(model, 0, 2)
    runner = ModelRunner(model, num_blocks, block_size)
    runner.tp = TensorParallelGroup("runs/model", 2, reduce, num_blocks=num_blocks, block_size=block_size)
    ... runner.run(plan) ...                       # every step reaches the workers
    runner.tp.close()
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from lmstack.errors import LmstackError
from lmstack.infer.tp_shard import AllReduce
from lmstack.infer.tp_step import pack_step

STOP, STEP, COPY = 0, 1, 2
COLLECTIVE_TIMEOUT_S = 120.0
"""Deadline of one step message or all-reduce (a dead peer is usually seen at once: its sockets close)."""
IDLE_TIMEOUT = timedelta(days=365)
"""A worker waits this long for the next step: an idle server is not a fault."""
CONFIG_KEY, READY_KEY = "lmstack_tp/config", "lmstack_tp/ready/"


def torchrun_rank(world_size: int) -> int | None:
    """This process's rank when torchrun (or a worker spawn) launched it for world_size ranks; else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise LmstackError(f"this process was launched with WORLD_SIZE={world}, but tensor_parallel_size="
                           f"{world_size}; launch exactly tensor_parallel_size processes (torchrun --nproc_per_node "
                           "x --nnodes) or none")
    return int(os.environ["RANK"])


def env_store(timeout_s: float) -> dist.Store:
    """The store of the torchrun-style environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    return store


def connect(store: dist.Store, rank: int, world_size: int, device: torch.device) -> tuple:
    """(the CPU group for step messages, the group for all-reduces): gloo, and NCCL on CUDA."""
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    cpu = dist.ProcessGroupGloo(dist.PrefixStore("lmstack_tp/gloo/", store), rank, world_size, timeout)
    if device.type != "cuda":
        return cpu, cpu
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return cpu, dist.ProcessGroupNCCL(dist.PrefixStore("lmstack_tp/nccl/", store), rank, world_size, opts)


def _stop(procs: list, logs: list) -> None:
    """End the child workers (SIGTERM, then SIGKILL after 5 s) and delete their logs."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in logs:
        f.close()  # a TemporaryFile: closing deletes it


def _watch(ref: weakref.ref) -> None:
    """The watchdog: every 50 ms, fail the group if a child worker has exited."""
    while True:
        time.sleep(0.05)
        group = ref()
        if group is None or group._closed.is_set():
            return
        for r, p in enumerate(group.procs, start=1):
            if p.poll() is not None:
                group._fail(f"worker rank {r} (pid {p.pid}) exited with code {p.returncode}")
                return
        del group  # hold no reference while sleeping


class TensorParallelGroup:
    """Rank 0's link to the workers. `failure` is None while every rank is healthy."""

    def __init__(self, model_dir: str | os.PathLike, world_size: int, reduce: AllReduce, *, num_blocks: int,
                 block_size: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 startup_timeout_s: float = 600.0, kv_cache_dtype: str = "auto"):
        self.world_size = world_size
        self.device = torch.device(device)
        self.failure: LmstackError | None = None
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        self._threads_before = torch.get_num_threads()
        threads = max(1, self._threads_before // world_size)
        rank = torchrun_rank(world_size)
        if rank not in (None, 0):
            raise LmstackError(f"the engine runs on rank 0; rank {rank} runs the worker loop (lmstack.infer.tp_worker)")
        if rank is None:  # one machine: rank 0 hosts the store, the workers are its children
            store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=startup_timeout_s))
            self._spawn(store.port, threads)
        else:
            store = env_store(startup_timeout_s)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self._logs)
        try:
            store.set(CONFIG_KEY, json.dumps({
                "model": str(model_dir), "num_blocks": num_blocks, "block_size": block_size,
                "dtype": str(dtype).removeprefix("torch."), "device": self.device.type, "threads": threads,
                "kv_cache_dtype": kv_cache_dtype}))
            self._wait_ready(store, startup_timeout_s)
            self.cpu_group, self.group = connect(store, 0, world_size, self.device)
        except BaseException:
            self._finalizer()
            raise
        reduce.group, reduce.on_error = self.group, self._collective_failed
        self.reduce = reduce
        self.send_seconds = 0.0  # time spent sending step messages (the all-reduces count in reduce.seconds)
        torch.set_num_threads(threads)
        self._closed = threading.Event()
        if self.procs:  # (a weak reference: a dropped engine is collected, and its finalizer stops the workers)
            threading.Thread(target=_watch, args=(weakref.ref(self),), name="lmstack-tp-watchdog", daemon=True).start()

    # ---- start-up
    def _spawn(self, port: int, threads: int) -> None:
        for r in range(1, self.world_size):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                   "LOCAL_RANK": str(r), "WORLD_SIZE": str(self.world_size), "OMP_NUM_THREADS": str(threads),
                   "LMSTACK_TP_PARENT": str(os.getpid())}
            log = tempfile.TemporaryFile()
            self._logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "lmstack.infer.tp_worker"], env=env,
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))

    def _wait_ready(self, store: dist.Store, timeout_s: float) -> None:
        keys = [f"{READY_KEY}{r}" for r in range(1, self.world_size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            for r, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    raise LmstackError(f"tensor-parallel worker rank {r} exited with code {p.returncode} while "
                                       f"starting:\n{self._log_tail(r)}")
            if time.monotonic() > deadline:
                raise LmstackError(f"tensor-parallel workers were not ready after {timeout_s:.0f} s")
            time.sleep(0.05)

    def _log_tail(self, rank: int, chars: int = 2000) -> str:
        log = self._logs[rank - 1]
        log.flush()
        log.seek(0)
        return log.read().decode("utf-8", "replace")[-chars:]

    # ---- faults
    def _fail(self, why: str) -> LmstackError:
        if self.failure is None:
            self.failure = LmstackError(f"tensor-parallel serving failed: {why}; the engine cannot run (restart it)")
            for p in self.procs:  # the other workers cannot go on without the group
                if p.poll() is None:
                    p.kill()
        return self.failure

    def _collective_failed(self, e: BaseException) -> LmstackError:
        # gloo's message starts with its source location: keep the part that says what happened
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]) if str(e) else type(e).__name__
        return self._fail(f"a collective failed: {first[:200]}")

    def check(self) -> None:
        """Raise the failure, if any: a step never starts on a broken group."""
        if self.failure is not None:
            raise self.failure

    # ---- steps
    def _send(self, command: int, payload: torch.Tensor) -> None:
        self.check()
        start = time.perf_counter()
        try:
            self.cpu_group.broadcast(torch.tensor([command, payload.numel()]), 0).wait()
            if payload.numel():
                self.cpu_group.broadcast(payload, 0).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from e
        self.send_seconds += time.perf_counter() - start

    def step_inputs(self, runner, plan) -> tuple[torch.Tensor, object]:
        """ModelRunner's hook: build the step's inputs and send them, so every rank runs this forward."""
        ids, meta = runner.build(plan)
        self._send(STEP, pack_step(ids, meta))
        return ids, meta

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write block copies, made on every worker's pool (rank 0 copies its own)."""
        self._send(COPY, torch.tensor(pairs, dtype=torch.int64).flatten())

    def close(self) -> None:
        """Stop the workers (spawned: terminated; under torchrun: told to stop) and restore the thread count."""
        if self._closed.is_set():
            return
        self._closed.set()
        if not self.procs and self.failure is None:
            try:  # torchrun's workers are not our children: ask them to leave their loop
                self._send(STOP, torch.zeros(0, dtype=torch.int64))
            except LmstackError:
                pass
        if self.failure is None:
            self.failure = LmstackError("tensor-parallel serving was closed")
        self._finalizer()
        torch.set_num_threads(self._threads_before)
