"""The model runner: one engine step as one forward pass over a flattened batch, with K/V in a paged pool.

Every scheduled sequence contributes its next chunk of tokens (a prompt chunk, a single decode token,
or a speculative window); the runner concatenates them into one (1, N) input, so the whole step is a
single model call whatever the mix (continuous batching with chunked prefill), through the model's own
forward: the same block math as training and `generate`. A model the engine loaded itself (owns_model)
gets fused q/k/v and gate/up projections (model.fuse_projections(): fewer matmuls, same numbers). The
runner neither schedules nor samples: the scheduler and block manager choose the batch and its blocks,
the engine samples.

The K/V live in a paged pool, PagedKVCache (paged_attention.py), the cache object the model's attention
layers see; the runner builds its per-step metadata (StepMeta) once per step.
Logits are computed only for the flat rows the caller asks for (the last position, or every position for
prompt logprobs and speculative verification), in fp32 on the model's device, where the sampler draws.

Usage:
    runner = ModelRunner(model, num_blocks=256, block_size=16)
    runner = ModelRunner(model, num_blocks=1024, block_size=16, kv_cache_dtype="int8")   # kv_quant.py
    logits = runner.run(plan)          # a StepPlan (step_plan.py): (len(plan.logit_rows), vocab)
    logits = runner.run([(seq, token_ids, first_position), ...], logit_rows)   # the same, planned here
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.infer.cuda_graphs import DecodeGraphs
from lmstack.infer.paged_attention import PagedKVCache, PrefillChunk, ShortChunks, StepMeta
from lmstack.infer.sequence import Sequence
from lmstack.infer.spec_tree import chunk_visibility
from lmstack.infer.step_plan import StepPlan
from lmstack.infer.threads import threads_for
from lmstack.kernels import available as kernels_available
from lmstack.model.fused_projections import projections_fusable
from lmstack.model.linear import decode_kernels


SHORT_QUERY = 16
"""Chunks of at most this many tokens that extend an existing context (decode steps, speculative
windows) are batched into one padded attention per layer; longer prompt chunks run one by one."""


class ModelRunner:
    """Owns the model and its paged K/V pool. `run(batch, logit_rows)` runs one step of the scheduled
    sequences (each: the sequence with its block table, the token ids to run, their first position) and
    returns fp32 logits on the model's device for the flat rows asked for. Blocks are allocated by the block
    manager, not here."""

    tp = None
    """Tensor-parallel serving (tp_group.py / tp_worker.py): tp.step_inputs(runner, plan) gives the step's
    inputs in place of build(plan); on rank 0 it also sends them to the workers, so every rank runs this forward."""

    def __init__(self, model, num_blocks: int, block_size: int, device: str | torch.device = "cpu",
                 owns_model: bool = False, attention_backend: str = "sdpa", cuda_graphs: bool = False,
                 max_num_seqs: int = 16, max_model_len: int | None = None, compile_decode: bool = False,
                 kv_cache_dtype: str = "auto"):
        if owns_model and projections_fusable(model):
            model.fuse_projections()  # nobody else holds this model, so its layout may change in place
        cfg = model.config
        if not cfg.causal or cfg.head != "lm":
            raise LmstackError("the inference engine needs a causal language model (causal=True, head='lm')")
        if cfg.attention != "softmax":
            raise LmstackError(f"attention={cfg.attention!r} has no KV cache; the engine needs softmax attention")
        if cfg.memory != "none":
            raise LmstackError(f"memory={cfg.memory!r}: the paged KV cache has no slot for a long-context memory, so "
                               "the engine would drop it and run a different model; decode with "
                               "lmstack.model.memory.generate_with_memory")
        if cfg.mod_capacity:
            raise LmstackError("mod_capacity (Mixture-of-Depths): a routed block keeps keys only for the tokens it "
                               "chose, which the paged pool (a slot per token and layer) does not hold; decode with "
                               "model.new_cache() (lmstack model generate)")
        p = next(model.parameters())
        self.model, self.device = model, p.device
        # decode graphs pad their batches into one scratch block past the engine's (cuda_graphs.py)
        self.cache = PagedKVCache(cfg, num_blocks + (1 if cuda_graphs else 0), block_size, dtype=p.dtype,
                                  device=p.device, attention_backend=attention_backend, kv_cache_dtype=kv_cache_dtype)
        self.cache.alibi = model.alibi_slopes if cfg.position == "alibi" else None
        self.block_size = block_size
        self.max_len = cfg.max_seq_len if cfg.position in ("learned", "sinusoidal") else None
        self.lora_context = None  # set by the engine when adapters are in use (lora_hook.py)
        self.hidden_hook = None  # hook(plan, hidden (rows, d)): speculative draft heads read features (speculative.py)
        self.matmul_size = cfg.d_model * max(cfg.d_ff, cfg.moe_d_ff if cfg.n_experts else 0)
        # pure decode steps replay a CUDA graph per batch bucket (on a CPU: the same static path, uncaptured)
        self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len or cfg.max_seq_len,
                                   "cuda" if self.device.type == "cuda" else "eager",
                                   compile=compile_decode) if cuda_graphs else None
        # fp32 CPU decode runs the skinny GEMM (model/linear.py); asking now builds it on a machine's first
        # engine (~1 min, then cached), so the build never lands inside a request
        self.kernels = self.device.type == "cpu" and p.dtype == torch.float32 and kernels_available()

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def _contiguous(self, seq: Sequence, length: int) -> bool:
        table = seq.block_table[: -(-length // self.block_size)]
        return table[-1] - table[0] == len(table) - 1 and all(b - a == 1 for a, b in zip(table, table[1:]))

    def build(self, plan: StepPlan) -> tuple[torch.Tensor, StepMeta]:
        """The plan's flat batch -> (input ids (1, N), attention metadata); rows come from the plan."""
        dev = self.device
        ids, positions, slots, prefills = [], [], [], []
        short = []  # (seq, first flat row, n, start)
        for p in plan.seqs:
            seq, tokens, start, row = p.seq, p.tokens, p.start, p.row
            n = len(tokens)
            ids.extend(tokens)
            if p.tree is None:
                positions.extend(range(start, start + n))
            else:  # a token tree's node sits at its depth past the last known token (spec_tree.py)
                positions.extend(range(start, start + p.num_tokens))
                positions.extend(start + p.num_tokens - 1 + d for d in p.tree.depths)
            slots.extend(self._slots(seq, start, start + n))
            if n == 1 or (start > 0 and n <= SHORT_QUERY) or p.tree is not None:
                short.append((seq, row, n, start))
            else:
                ctx = start + n
                key_slots = None if start == 0 else torch.tensor(self._slots(seq, 0, ctx), device=dev)
                prefills.append(PrefillChunk(row, n, torch.arange(start, ctx, device=dev), ctx, key_slots))
        if self.max_len is not None and positions and max(positions) >= self.max_len:
            raise LmstackError(f"position {max(positions)} is past max_seq_len={self.max_len} of a model with "
                               "learned positions")
        meta = StepMeta(torch.tensor(positions, device=dev), torch.tensor(slots, device=dev),
                        self._short_meta(short, plan) if short else None, prefills)
        return torch.tensor([ids], device=self.device), meta

    def _short_meta(self, short, plan: StepPlan) -> ShortChunks:
        tq = max(n for _, _, n, _ in short)
        length = max(start + n for _, _, n, start in short)
        rows, valid, q_pos, key_slots, valid_index, out_rows = [], [], [], [], [], []
        for b, (seq, row, n, start) in enumerate(short):
            pad = tq - n
            rows.append(list(range(row, row + n)) + [row + n - 1] * pad)
            valid.append([True] * n + [False] * pad)
            valid_index.extend(range(b * tq, b * tq + n))
            out_rows.extend(range(row, row + n))
            q_pos.append(list(range(start, start + n)) + [start + n - 1] * pad)
            ctx = start + n
            key_slots.append(self._slots(seq, 0, ctx) + [0] * (length - ctx))  # padding keys are masked
        contig = None
        if len(short) == 1 and self._contiguous(short[0][0], length):
            contig = (short[0][0].block_table[0] * self.block_size, length)
        dev = self.device
        tree = None
        trees = {p.row: p for p in plan.seqs if p.tree is not None}
        if trees:  # which rows of its chunk each query row sees (spec_tree.py); chains stay causal
            tree = torch.stack([chunk_visibility(trees[row].num_tokens, trees[row].tree.parents, tq) if row in trees
                                else chunk_visibility(n, None, tq) for _, row, n, _ in short]).to(dev)
        return ShortChunks(torch.tensor(rows, device=dev), torch.tensor(valid, device=dev),
                           torch.tensor(q_pos, device=dev), torch.tensor(key_slots, device=dev), contig,
                           torch.tensor(out_rows, device=dev), torch.tensor(valid_index, device=dev), tree=tree)

    def run(self, plan: StepPlan | list[tuple[Sequence, list[int], int]], logit_rows: list[int] | None = None
            ) -> torch.Tensor:
        """Run one step; returns fp32 logits (len(plan.logit_rows), vocab) for the flat rows asked for.
        A plain batch of (seq, token ids, first position) with its logit_rows is planned here.

        Big steps use every thread the engine may use; small ones run on one thread (see threads.py)."""
        if not isinstance(plan, StepPlan):
            plan = StepPlan.of(plan, logit_rows)
        with threads_for(self.matmul_size * plan.num_rows):
            return self._run(plan)

    @torch.inference_mode()
    def _run(self, plan: StepPlan) -> torch.Tensor:
        logit_rows = plan.logit_rows
        if self.graphs is not None and self.hidden_hook is None:
            # the skinny GEMM is a C++ call torch.compile cannot trace: a compiled step runs without it
            with decode_kernels(self.kernels and not self.graphs.compiled):
                logits = self.graphs.run(plan)  # None unless a pure decode step
            if logits is not None:
                return logits
        ids, meta = self.build(plan) if self.tp is None else self.tp.step_inputs(self, plan)
        self.cache.meta = meta
        with decode_kernels(self.kernels):
            try:
                hidden = self.model(ids, cache=self.cache, return_hidden=True)
            finally:
                self.cache.meta = None
            if self.hidden_hook is not None:
                self.hidden_hook(plan, hidden[0])
            if not logit_rows:
                return torch.zeros((0, self.model.config.vocab_size), device=self.device)
            rows = hidden[0, logit_rows] if len(logit_rows) != hidden.shape[1] else hidden[0]
            return self.model.head(rows).float()  # on the model's device: the sampler draws there (sampler.py)
