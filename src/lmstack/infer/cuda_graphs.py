"""CUDA graphs for pure decode steps: one graph per (batch-size bucket, context bucket), replayed per step.

A decode step of a small model on a GPU is hundreds of tiny kernels, and launching them from Python costs
more than running them. A CUDA graph records the whole forward once and replays it with one launch. A
graph replays fixed shapes and fixed addresses, so a step is fitted into static buffers:
- batch buckets 1, 2, 4, 8, ... up to max_num_seqs: a step of B sequences runs in the smallest bucket
  >= B; the padding rows decode token 0 at position 0 into a scratch block the block manager never hands
  out (the runner's pool has one block more than the engine's), and their logits are dropped;
- context buckets of 1, 2, 4, ... blocks up to max_model_len: each row's block table is padded to the
  bucket with the scratch block; keys past a row's own position are masked by the causal rule, so
  padding keys never count. The keys' slots are computed from the block table inside the graph.
Every input of a step (ids, positions, slots, block tables) lives in one static long buffer per graph,
filled by one host-to-device copy; positions double as the queries' positions of the mask. Everything
the graph runs has shapes that follow from the bucket alone (StepMeta.static: no value is read back).

Only pure decode steps qualify: every scheduled sequence runs exactly one token that extends its
context, logits for every row, no LoRA segments, and a model whose decode needs no value-dependent
branch (RoPE or no positions, no ALiBi, no softcap, no mixture of experts). Other steps run eagerly.

mode='cuda' captures with torch.cuda.graph (lazily at a bucket's first use, or all at once with
capture_all()); mode='eager' runs the identical static-buffer path without capture, which is how the CPU
tests prove that a padded, bucketed step equals the unpadded one (tests/infer/test_cuda_graphs.py).
compile=True (the engine's compile_decode) runs the static step through torch.compile, one specialisation
per bucket, inside the graph on CUDA; benchmarks/decode_compile_cpu.py measures what it buys on a CPU.

Usage (the runner does this when the engine has cuda_graphs on):
    graphs = DecodeGraphs(runner, max_num_seqs=64, max_model_len=2048, mode="cuda")
    logits = graphs.run(plan)        # (B, vocab) fp32 on the device, or None: not a pure decode step
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import LmstackError
from lmstack.infer.paged_attention import ShortChunks, StepMeta
from lmstack.infer.step_plan import StepPlan


def buckets_up_to(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself."""
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]


def graphable(cfg) -> str | None:
    """Why this model's decode step cannot be captured, or None when it can."""
    if cfg.position not in ("rope", "none"):
        return f"position={cfg.position!r} reads positions back on the host"
    if cfg.attn_logit_softcap:
        return "an attention softcap decodes one sequence at a time"
    if cfg.n_experts:
        return "mixture-of-experts routing has value-dependent shapes"
    return None


@dataclass
class _Entry:
    """The static buffers of one (batch, context blocks) bucket, and its graph when captured."""

    batch: int
    blocks: int
    host: torch.Tensor  # the step's inputs, built here: [ids, positions, slots, block tables]
    buf: torch.Tensor  # the same on the device; every input tensor below is a view of it
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    meta: StepMeta | None = None
    graph: object = None
    out: torch.Tensor | None = None  # the captured forward's logits (batch, vocab)


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, mode: str = "cuda", compile: bool = False):
        if mode not in ("cuda", "eager"):
            raise LmstackError(f"DecodeGraphs mode must be 'cuda' or 'eager', got {mode!r}")
        why = graphable(runner.model.config)
        if why is not None:
            raise LmstackError(f"cuda_graphs cannot run this model: {why}; turn cuda_graphs off")
        if mode == "cuda" and runner.device.type != "cuda":
            raise LmstackError(f"cuda_graphs needs a CUDA model, this one is on {runner.device}")
        self.runner, self.mode = runner, mode
        self.block_size = runner.block_size
        self.scratch_block = runner.cache.num_blocks - 1  # the runner allocated it beyond the engine's blocks
        self.batch_buckets = buckets_up_to(max_num_seqs)
        self.max_blocks = -(-max_model_len // self.block_size)
        self.block_buckets = buckets_up_to(self.max_blocks)
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.pool = None  # one memory pool shared by every graph (they never run at once)
        self.replays = 0
        # compile: torch.compile the static step, one specialisation per bucket (shapes never change within
        # one); dynamo's per-function recompile limit is raised to the bucket count so none falls back to eager
        self._fn, self.compiled = self._step, compile
        if compile:
            limit = len(self.batch_buckets) * len(self.block_buckets)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            self._fn = torch.compile(self._step, dynamic=False)
        self.rope = runner.model.rope
        if self.rope is not None:  # grow RoPE's table now: inside a graph it cannot grow (positions.py)
            self.rope(torch.tensor([self.max_blocks * self.block_size - 1], device=runner.device))

    # ---- which steps, which bucket
    def bucket(self, n_seqs: int, ctx_len: int) -> tuple[int, int]:
        """The smallest (batch, blocks) bucket holding n_seqs rows of up to ctx_len keys."""
        blocks = -(-ctx_len // self.block_size)
        if n_seqs > self.batch_buckets[-1] or blocks > self.max_blocks:
            raise LmstackError(f"a decode step of {n_seqs} sequences over {ctx_len} positions is past the graphs' "
                               f"largest bucket ({self.batch_buckets[-1]} sequences, {self.max_blocks} blocks)")
        return (next(b for b in self.batch_buckets if b >= n_seqs), next(b for b in self.block_buckets if b >= blocks))

    def eligible(self, plan: StepPlan) -> bool:
        """A pure decode step: one token per sequence past its first, every row's logits, no adapters."""
        seqs = plan.seqs
        if not seqs or len(seqs) > self.batch_buckets[-1] or self.runner.lora_context is not None:
            return False
        if any(len(p.tokens) != 1 or p.start == 0 or p.start >= self.max_blocks * self.block_size for p in seqs):
            return False
        return plan.logit_rows == list(range(len(seqs)))

    # ---- static buffers
    def _entry(self, batch: int, blocks: int) -> _Entry:
        dev = self.runner.device
        n = batch * (3 + blocks)
        host = torch.empty(n, dtype=torch.long, pin_memory=dev.type == "cuda")
        buf = torch.empty(n, dtype=torch.long, device=dev)
        ids, positions, slots = buf[:batch].view(1, batch), buf[batch:2 * batch], buf[2 * batch:3 * batch]
        tables = buf[3 * batch:].view(batch, blocks)
        e = _Entry(batch, blocks, host, buf, ids, positions, slots, tables)
        self._fill(e, [])  # every row padding: a capture's warm-up writes only the scratch block
        e.buf.copy_(e.host)
        return e

    def _fill(self, e: _Entry, seqs) -> None:
        """Write the step's rows, then padding rows, into the host buffer (one copy to the device follows)."""
        b, nb, bs, scratch = e.batch, e.blocks, self.block_size, self.scratch_block
        ids, pos, slots = [], [], []
        tables = []
        for p in seqs:
            table = p.seq.block_table
            ids.append(p.tokens[0])
            pos.append(p.start)
            slots.append(table[p.start // bs] * bs + p.start % bs)
            used = table[:nb]
            tables.extend(used)
            tables.extend([scratch] * (nb - len(used)))
        pad = b - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [scratch * bs] * pad
        tables += [scratch] * (pad * nb)
        e.host.copy_(torch.tensor(ids + pos + slots + tables, dtype=torch.long))

    def _meta(self, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor) -> StepMeta:
        b, blocks = tables.shape
        bs = self.block_size
        offsets = torch.arange(bs, device=tables.device)
        key_slots = (tables[:, :, None] * bs + offsets).view(b, blocks * bs)  # computed from the table
        rows = torch.arange(b, device=tables.device)
        short = ShortChunks(rows[:, None], torch.ones((b, 1), dtype=torch.bool, device=tables.device),
                            positions[:, None], key_slots, None, rows, rows)
        return StepMeta(positions, slots, short, [], static=True)

    # ---- the forward
    def _step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor
              ) -> torch.Tensor:
        """One static decode step: inputs -> logits (batch, vocab). What a graph records (and compile traces)."""
        runner = self.runner
        runner.cache.meta = self._meta(positions, slots, tables)  # its slot arithmetic and masks run in the graph
        try:
            hidden = runner.model(ids, cache=runner.cache, return_hidden=True)
        finally:
            runner.cache.meta = None
        return runner.model.head(hidden[0]).float()

    def _forward(self, e: _Entry) -> torch.Tensor:
        if self.rope is None:
            return self._fn(e.ids, e.positions, e.slots, e.tables)
        self.rope.static = True  # its table covers max_model_len (grown above): no bound check reads back
        try:
            return self._fn(e.ids, e.positions, e.slots, e.tables)
        finally:
            self.rope.static = False

    def _capture(self, e: _Entry) -> None:
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, autotuning)
            for _ in range(2):
                self._forward(e)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            e.out = self._forward(e)
        self.pool = graph.pool()
        e.graph = graph

    def get(self, batch: int, blocks: int) -> _Entry:
        key = (batch, blocks)
        if key not in self.entries:
            e = self._entry(batch, blocks)
            if self.mode == "cuda":
                with torch.inference_mode():
                    self._capture(e)
            self.entries[key] = e
        return self.entries[key]

    def capture_all(self) -> int:
        """Capture every bucket now instead of at first use; returns how many graphs exist."""
        for b in self.batch_buckets:
            for nb in self.block_buckets:
                self.get(b, nb)
        return len(self.entries)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits (B, vocab) fp32 on the device for a pure decode step; None when the step does not qualify."""
        if not self.eligible(plan):
            return None
        seqs = plan.seqs
        e = self.get(*self.bucket(len(seqs), max(p.start + 1 for p in seqs)))
        self._fill(e, seqs)
        e.buf.copy_(e.host, non_blocking=True)  # pinned host memory: the copy queues behind earlier work
        if e.graph is not None:
            e.graph.replay()
            out = e.out
        else:
            out = self._forward(e)
        self.replays += 1
        # the graph's output buffer is rewritten by the next replay: the step gets its own copy
        return out[:len(seqs)].clone()
