"""Tensor-parallel serving (infer/tp_*.py): two gloo processes on the CPU give the single-process engine's greedy
outputs (batched, prompts longer than a block, preemption, beam search's copy-on-write block copies, speculative
verification windows; gpt2, mixtral and gemma2 shapes); the step message survives the wire; shapes that do not
split are refused naming the field; a killed worker fails the engine at once and for good; a worker never
outlives rank 0."""
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer import LLM, LLMEngine, SamplingParams
from lmstack.infer.commands import generate
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.paged_attention import ShortChunks
from lmstack.infer.sequence import Request
from lmstack.infer.step_plan import StepPlan
from lmstack.infer.tp_shard import check_shardable
from lmstack.infer.tp_step import pack_step, unpack_step
from lmstack.model import preset

from infer_helpers import random_prompts, tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, tok):
    # 4 query heads over 2 KV heads (GQA), d_ff 192: every rank of 2 keeps 2 query heads, 1 KV head, 96 columns
    path = tmp_path_factory.mktemp("tp") / "tiny-gqa"
    lmstack.save_model(tiny_model(tok.vocab_size, n_kv_heads=2), path, tokenizer=tok)
    return path


def _outputs(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


def test_two_ranks_equal_one_process_greedy_preempted_and_beams(gqa_dir):
    prompts = random_prompts(6, 10, 20, 400, seed=8) + [random_prompts(1, 40, 40, 400, seed=9)[0]]
    beams = SamplingParams(max_tokens=6, n=2, use_beam_search=True, temperature=0.0, ignore_eos=True)
    # 24 blocks of 4 slots for ~7 x 40 tokens: the pool runs out, so sequences are preempted and recomputed
    kw = dict(max_num_seqs=7, block_size=4, num_blocks=24)
    one = LLM(str(gqa_dir), **kw)
    want, want_beams = _outputs(one, prompts, GREEDY), _outputs(one, prompts[:2], beams)
    tp = LLM(str(gqa_dir), tensor_parallel_size=2, **kw)
    try:
        engine = tp.engine
        # the shard is real: this rank holds half the query and KV heads, half the MLP, half the KV pool
        attn, mlp = engine.model.blocks[0].attn, engine.model.blocks[0].mlp
        assert (attn.n_heads, attn.n_kv_heads, mlp.d_ff) == (2, 1, 96)
        assert attn.qkv_proj.weight.shape[0] == (2 + 1 + 1) * 16  # fused: its q, k and v rows
        assert engine.runner.cache.k.shape[1] == 1 and one.engine.runner.cache.k.shape[1] == 2
        copies = []
        send_copies = engine.tp.copy_blocks
        engine.tp.copy_blocks = lambda pairs: (copies.extend(pairs), send_copies(pairs))
        assert _outputs(tp, prompts, GREEDY) == want
        assert engine.stats()["num_preemptions"] > 0
        assert _outputs(tp, prompts[:2], beams) == want_beams
        assert copies, "beam search should have copied shared blocks on every rank"
        assert engine.bm.num_free_blocks == 24
    finally:
        tp.engine.close()
    assert all(p.poll() is not None for p in tp.engine.tp.procs)


@pytest.mark.parametrize("family, overrides", [
    ("gpt2-tiny", {}),  # biases on every projection (o_proj's and down_proj's added once), plain MLP, learned positions
    ("mixtral-tiny", {"n_kv_heads": 2}),  # MoE layers, kept whole on every rank
    ("gemma2-tiny", {}),  # soft-capped attention, sliding windows on alternate layers, query_pre_attn_scalar
])
def test_two_ranks_equal_one_process_across_families(tmp_path, family, overrides):
    torch.manual_seed(0)
    cfg = preset(family, vocab_size=300, max_seq_len=256, **overrides)
    lmstack.save_model(lmstack.Transformer(cfg).eval(), tmp_path)
    prompts = random_prompts(3, 5, 30, 300, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = _outputs(LLM(str(tmp_path), block_size=4), prompts, params)
    tp = LLM(str(tmp_path), block_size=4, tensor_parallel_size=2)
    try:
        assert _outputs(tp, prompts, params) == want
    finally:
        tp.engine.close()


def test_two_ranks_verify_speculative_windows_like_one_process(gqa_dir):
    # n-gram guesses make multi-token verification windows: padded short chunks with a validity mask on the wire;
    # then the engine is dropped without close(), and collecting it must stop its worker
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9], [12, 13, 14, 12, 13]]
    spec = {"method": "ngram", "num_tokens": 4}
    want = _outputs(LLM(str(gqa_dir), block_size=4, speculative=spec), prompts, GREEDY)
    tp = LLM(str(gqa_dir), block_size=4, speculative=spec, tensor_parallel_size=2)
    workers = list(tp.engine.tp.procs)
    try:
        assert _outputs(tp, prompts, GREEDY) == want
        assert tp.engine.stats()["spec_accepted_tokens"] > 0
    finally:
        del tp  # dropped without close(): collecting the engine stops its workers
        gc.collect()
    assert all(p.poll() is not None for p in workers)


def test_generate_command_takes_tensor_parallel_size(gqa_dir, capsys):
    kw = dict(model=str(gqa_dir), prompt_ids=[5, 6, 7, 8], max_tokens=8, threads=1)
    one, two = generate(**kw), generate(**kw, tensor_parallel_size=2)
    assert two[0]["completions"][0]["token_ids"] == one[0]["completions"][0]["token_ids"]
    assert len(one[0]["completions"][0]["token_ids"]) == 8


def test_killed_worker_fails_engine_at_once_and_for_good(gqa_dir):
    engine = LLMEngine(str(gqa_dir), block_size=8, tensor_parallel_size=2)
    try:
        for i in range(3):
            engine.add_request(f"r{i}", [5, 6, 7, 8, 9 + i], SamplingParams(max_tokens=200, temperature=0.0,
                                                                          ignore_eos=True))
        engine.step()
        worker = engine.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(LmstackError, match="tensor-parallel serving failed"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 10
        assert engine.failure is not None
        with pytest.raises(LmstackError, match="tensor-parallel serving failed"):
            engine.step()  # refused at once: no collective is tried on a broken group
    finally:
        engine.close()
    assert worker.poll() is not None


def _seq(n, table):
    s = Request("r", None, list(range(5, 5 + n)), SamplingParams()).seqs[0]
    s.block_table = table
    return s


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


RANK0_THAT_DIES = """
import os, signal, sys
from lmstack.infer import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2)
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
print(llm.engine.tp.procs[0].pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finalizer: only the worker's own checks can end it
"""


def test_worker_exits_when_rank_0_is_killed(gqa_dir):
    out = subprocess.run([sys.executable, "-c", RANK0_THAT_DIES, str(gqa_dir)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    worker = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(worker):
        os.kill(worker, signal.SIGKILL)  # leave no stray, then fail
        pytest.fail("the worker outlived rank 0 by 5 s")


@pytest.mark.parametrize("kind", ["mixed", "one_contiguous_decode", "tree"])
def test_step_message_round_trip(model, kind):
    # mixed: a prefill from scratch, a prefill over cached keys, and short chunks (decode, a 2-token window);
    # one decode token over contiguous blocks: the case that reads the pool in place (contig); tree: mixed, with
    # a speculative token tree's visibility on the short chunks
    runner = ModelRunner(model, num_blocks=32, block_size=4)
    if kind in ("mixed", "tree"):
        batch = [(_seq(20, [7, 3, 9, 1, 2]), list(range(20, 40)), 0),
                 (_seq(30, [4, 5, 6, 8, 10, 11, 12, 13]), [1] * 25, 5),
                 (_seq(9, [14, 15, 16]), [3], 8), (_seq(9, [17, 18, 19]), [3, 4], 7)]
    else:
        batch = [(_seq(9, [20, 21, 22]), [3], 8)]
    ids, meta = runner.build(StepPlan.of(batch, [0]))
    if kind == "tree":
        b, tq = meta.short.rows.shape
        meta.short.tree = torch.rand(b, tq, tq, generator=torch.Generator().manual_seed(0)) < 0.5
    got_ids, got = unpack_step(pack_step(ids, meta))
    assert torch.equal(got_ids, ids)
    for name in ("positions", "slots"):
        assert torch.equal(getattr(got, name), getattr(meta, name))
    for f in dataclasses.fields(ShortChunks):  # every field but the per-step mask cache (empty here)
        a, b = getattr(got.short, f.name), getattr(meta.short, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert (got.short.contig is not None) == (kind == "one_contiguous_decode")
    assert (got.short.tree is not None) == (kind == "tree")
    assert len(got.prefills) == len(meta.prefills) == (0 if kind == "one_contiguous_decode" else 2)
    for a, b in zip(got.prefills, meta.prefills):
        assert (a.start, a.n, a.ctx_len) == (b.start, b.n, b.ctx_len) and torch.equal(a.positions, b.positions)
        assert (a.key_slots is None) == (b.key_slots is None)
        assert a.key_slots is None or torch.equal(a.key_slots, b.key_slots)


@pytest.mark.parametrize("overrides, field", [({"n_kv_heads": 1}, "n_kv_heads=1"), ({"n_heads": 3, "n_kv_heads": 3,
                         "head_dim": 16}, "n_heads=3"), ({"d_ff": 191}, "d_ff=191")])
def test_shapes_that_do_not_split_are_refused_naming_the_field(overrides, field):
    cfg = tiny_model(400, **overrides).config
    with pytest.raises(LmstackError, match=field):
        check_shardable(cfg, 2)


def test_refusals_before_any_process_starts(model, gqa_dir):
    with pytest.raises(LmstackError, match="position='alibi'"):
        check_shardable(tiny_model(400, n_kv_heads=2, position="alibi").config, 2)
    with pytest.raises(LmstackError, match="tensor_parallel_size must be an integer >= 1"):
        LLMEngine(str(gqa_dir), tensor_parallel_size=0)
    with pytest.raises(LmstackError, match="needs a model directory"):
        LLMEngine(tiny_model(model.config.vocab_size, n_kv_heads=2), tensor_parallel_size=2)
    with pytest.raises(LmstackError, match="LoRA adapters are not supported with tensor_parallel_size > 1"):
        LLMEngine(str(gqa_dir), tensor_parallel_size=2, lora_adapters={"a": object()})
    for flag in ("cuda_graphs", "compile_decode"):
        with pytest.raises(LmstackError, match="cuda_graphs and compile_decode are not supported with tensor_paral"):
            LLMEngine(str(gqa_dir), tensor_parallel_size=2, **{flag: True})
