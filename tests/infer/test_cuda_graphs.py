"""CUDA-graph decode (infer/cuda_graphs.py) run on the CPU in its 'eager' mode: the same bucketed static-buffer
path, uncaptured. A padded, bucketed decode step must equal the unpadded one, padding rows must only ever
write the scratch block, and no two buckets may share a buffer. (Capture + replay: benchmarks/cuda_check.py.)"""
import pytest
import torch

from infer_helpers import random_prompts, tiny_model
from lmstack.errors import LmstackError
from lmstack.infer.cuda_graphs import DecodeGraphs, buckets_up_to, graphable
from lmstack.infer.engine import LLMEngine
from lmstack.infer.sampling_params import SamplingParams


def test_buckets_and_bucket_choice():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(12) == [1, 2, 4, 8, 12]
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    eng = LLMEngine(tiny_model(300), max_num_seqs=12, block_size=4, num_blocks=64, max_model_len=100,
                    cuda_graphs=True)
    g = eng.runner.graphs
    assert g.mode == "eager" and g.block_buckets == [1, 2, 4, 8, 16, 25]  # 100 positions = 25 blocks of 4
    assert g.bucket(1, 1) == (1, 1)
    assert g.bucket(3, 9) == (4, 4)  # 9 keys need 3 blocks: bucket 4
    assert g.bucket(9, 100) == (12, 25)
    with pytest.raises(LmstackError, match="past the graphs' largest bucket"):
        g.bucket(13, 10)
    # the pool holds one scratch block more than the engine hands out
    assert eng.runner.cache.num_blocks == eng.num_blocks + 1 == g.scratch_block + 1


def _recording(engine):
    seen = []
    run = engine.runner.run

    def recorded(plan, *a):
        logits = run(plan, *a)
        seen.append(logits.clone())
        return logits
    engine.runner.run = recorded
    return seen


def test_padded_bucketed_decode_equals_unpadded():
    model = tiny_model(300)
    prompts = random_prompts(5, 3, 21, 300, seed=3)  # 5 sequences: bucket 8, 3 padding rows
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(5)]
    engines, logs, outs = [], [], []
    for graphs in (False, True):
        eng = LLMEngine(model, max_num_seqs=8, block_size=4, num_blocks=80, max_model_len=64, cuda_graphs=graphs)
        logs.append(_recording(eng))
        for i, (p, sp) in enumerate(zip(prompts, params)):
            eng.add_request(f"r{i}", p, sp)
        outs.append({o.request_id: o.outputs[0].token_ids for o in eng.run_to_completion()})
        engines.append(eng)
    plain, padded = engines
    g = padded.runner.graphs
    assert g.replays >= 10 and {b for b, _ in g.entries} >= {8, 4}  # batches shrank as requests finished
    assert outs[0] == outs[1]  # same greedy tokens
    assert len(logs[0]) == len(logs[1])
    for a, b in zip(*logs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # padding rows wrote the scratch block and nothing else: the real blocks hold the same K/V in both pools
    bs, n = padded.block_size, padded.num_blocks
    a, b = plain.runner.cache, padded.runner.cache
    for pool_a, pool_b in ((a.k, b.k), (a.v, b.v)):
        torch.testing.assert_close(pool_a, pool_b[:, :, :n * bs], rtol=1e-4, atol=1e-5)
        assert pool_b[:, :, n * bs:].abs().sum() > 0  # padding rows really ran


def test_buffers_never_alias_across_buckets():
    eng = LLMEngine(tiny_model(300), max_num_seqs=8, block_size=4, num_blocks=80, max_model_len=64, cuda_graphs=True)
    g = eng.runner.graphs
    for b in (1, 2, 8):
        for nb in (1, 4, 16):
            g.get(b, nb)
    spans = []
    for e in g.entries.values():
        for t in (e.buf, e.host):
            start = t.untyped_storage().data_ptr()
            spans.append((start, start + t.untyped_storage().nbytes()))
        for view in (e.ids, e.positions, e.slots, e.tables):  # every input is a view of the one device buffer
            assert view.untyped_storage().data_ptr() == e.buf.untyped_storage().data_ptr()
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_only_pure_decode_steps_take_the_graph():
    model = tiny_model(300)
    eng = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=40, max_model_len=64, cuda_graphs=True)
    eng.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    eng.step()  # the prefill: eager
    assert eng.runner.graphs.replays == 0
    eng.add_request("b", [10, 11, 12], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    eng.step()  # a's decode token mixed with b's prefill: eager
    assert eng.runner.graphs.replays == 0
    eng.step()  # both decode: the graph path
    assert eng.runner.graphs.replays == 1


def test_default_off_on_cpu_and_refused_where_values_decide_shapes():
    assert LLMEngine(tiny_model(300), block_size=4, num_blocks=16).runner.graphs is None
    learned = tiny_model(300, position="learned")
    assert "position='learned'" in graphable(learned.config)
    with pytest.raises(LmstackError, match="cuda_graphs cannot run this model: position='learned'"):
        LLMEngine(learned, block_size=4, num_blocks=16, cuda_graphs=True)
    with pytest.raises(LmstackError, match="mode must be 'cuda' or 'eager'"):
        DecodeGraphs(LLMEngine(tiny_model(300), block_size=4, num_blocks=16).runner, 4, 64, mode="lazy")


def test_compile_decode_rides_on_the_static_path():
    with pytest.raises(LmstackError, match="compile_decode compiles the static decode step of cuda_graphs"):
        LLMEngine(tiny_model(300), block_size=4, num_blocks=16, cuda_graphs=False, compile_decode=True)
    g = LLMEngine(tiny_model(300), block_size=4, num_blocks=16, compile_decode=True).runner.graphs
    assert g is not None and g.compiled and g.mode == "eager"  # on a CPU: the uncaptured static path, compiled
    assert LLMEngine(tiny_model(300), block_size=4, num_blocks=16, cuda_graphs=True).runner.graphs.compiled is False


@pytest.mark.slow
def test_compiled_static_decode_gives_the_eager_tokens():
    model = tiny_model(300)
    prompts = random_prompts(3, 3, 12, 300, seed=9)
    outs = []
    for kw in ({}, {"compile_decode": True}):
        eng = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=40, max_model_len=32, **kw)
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        outs.append({o.request_id: o.outputs[0].token_ids for o in eng.run_to_completion()})
    assert eng.runner.graphs.replays > 0
    assert outs[0] == outs[1]
