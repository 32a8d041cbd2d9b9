"""The engine against the model-core reference loop: greedy equality, continuous batching, chunked prefill,
prefix caching, preemption, cancellation, seeds, parallel sampling with copy-on-write, logprobs."""
import copy
import random

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.infer import LLM, LLMEngine, SamplingParams
from lmstack.model.reference_decode import reference_decode

from infer_helpers import random_prompts, tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def reference(model, prompt, n):
    return reference_decode(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_equals_reference_loop(model, fused):
    # fused: the layout the engine gives a model it loads itself (one qkv_proj and gate_up_proj matmul)
    llm = LLM(copy.deepcopy(model).fuse_projections() if fused else model, block_size=4, num_blocks=128)
    prompts = random_prompts(3, 3, 20, model.config.vocab_size, seed=1)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference(model, p, 12)
        assert o.outputs[0].finish_reason == "length" and o.finished
        assert o.prompt_token_ids == p


def test_continuous_batching_16_mixed_requests_equal_running_alone(model):
    prompts = random_prompts(16, 2, 40, model.config.vocab_size, seed=2)
    lengths = [4 + (i * 7) % 13 for i in range(16)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths]
    # a small token budget forces chunked prefill of the long prompts while others decode
    batched = LLM(model, max_num_seqs=6, max_batched_tokens=24, block_size=4, num_blocks=256)
    engine = batched.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    seen_mixed = False
    finals = {}
    while engine.has_unfinished_requests():
        sched_before = len(engine.scheduler.running)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        seen_mixed |= sched_before > 1
    assert seen_mixed
    alone = LLM(model, max_num_seqs=1, block_size=4, num_blocks=256, enable_prefix_caching=False)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        want = alone.generate([p], sp)[0].outputs[0].token_ids
        assert finals[f"r{i}"].outputs[0].token_ids == want, f"request {i}"
        assert len(want) == lengths[i]
    assert engine.bm.num_free_blocks == engine.num_blocks


def test_prefix_cache_hits_cut_prefill_tokens(model):
    system = random_prompts(1, 40, 40, model.config.vocab_size, seed=3)[0]
    tails = random_prompts(4, 3, 6, model.config.vocab_size, seed=4)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    cached = LLM(model, block_size=8, num_blocks=128)
    plain = LLM(model, block_size=8, num_blocks=128, enable_prefix_caching=False)
    outs_c = [cached.generate([system + t], params)[0] for t in tails]
    outs_p = [plain.generate([system + t], params)[0] for t in tails]
    assert [o.outputs[0].token_ids for o in outs_c] == [o.outputs[0].token_ids for o in outs_p]
    sc, sp = cached.engine.stats(), plain.engine.stats()
    assert sc["prompt_tokens"] == sp["prompt_tokens"]
    # every request after the first reuses the 5 full blocks (40 tokens) of the system prompt
    assert sc["prefix_cache_hit_tokens"] == 3 * 40
    assert sc["prefill_tokens"] == sp["prefill_tokens"] - 3 * 40
    assert outs_c[1].num_cached_tokens == 40 and outs_c[0].num_cached_tokens == 0


def test_prefix_cache_survives_free_and_is_evicted_lru(model):
    llm = LLM(model, block_size=4, num_blocks=12)
    p = random_prompts(1, 13, 13, model.config.vocab_size, seed=5)[0]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = llm.generate([p], params)[0].outputs[0].token_ids
    assert llm.engine.bm.num_free_blocks == 12  # freed, but still cached
    again = llm.generate([p], params)[0]
    assert again.num_cached_tokens == 12 and again.outputs[0].token_ids == first
    # other prompts fill the pool and evict the cached blocks
    for q in random_prompts(3, 30, 30, model.config.vocab_size, seed=6):
        llm.generate([q], params)
    assert llm.generate([p], params)[0].num_cached_tokens == 0


def test_cancellations_free_every_block(model):
    rng = random.Random(0)
    engine = LLMEngine(model, max_num_seqs=8, max_batched_tokens=64, block_size=4, num_blocks=96)
    prompts = random_prompts(100, 1, 30, model.config.vocab_size, seed=7)
    pending = list(enumerate(prompts))
    live: set[str] = set()
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 4)):
            if pending:
                i, p = pending.pop()
                engine.add_request(f"q{i}", p, SamplingParams(max_tokens=rng.randint(1, 20), temperature=1.0,
                                                              n=rng.choice([1, 1, 2]), seed=i))
                live.add(f"q{i}")
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            out = engine.abort_request(victim)
            assert out.finished and all(c.finish_reason in ("abort", "stop", "length") for c in out.outputs)
            live.discard(victim)
        engine.bm.check_consistency()
        steps += 1
        assert steps < 5000
    assert engine.stats()["requests_aborted"] > 5
    assert engine.bm.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.bm.blocks)


def test_preemption_by_recompute_keeps_outputs(model):
    prompts = random_prompts(6, 10, 20, model.config.vocab_size, seed=8)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tight = LLM(model, max_num_seqs=6, block_size=4, num_blocks=24)  # 96 slots for ~6 x 40 tokens
    outs = tight.generate(prompts, params)
    assert tight.engine.stats()["num_preemptions"] > 0
    roomy = LLM(model, max_num_seqs=1, block_size=4, num_blocks=256)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == roomy.generate([p], params)[0].outputs[0].token_ids
    assert tight.engine.bm.num_free_blocks == 24


def test_seeds_reproducible_per_request_whatever_the_batch(model):
    p = random_prompts(1, 8, 8, model.config.vocab_size, seed=9)[0]
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    llm = LLM(model, block_size=4, num_blocks=128)
    alone = llm.generate([p], sp)[0].outputs[0].token_ids
    others = random_prompts(5, 3, 12, model.config.vocab_size, seed=10)
    batch = llm.generate(others + [p], [SamplingParams(max_tokens=10, temperature=1.0)] * 5 + [sp])
    assert batch[-1].outputs[0].token_ids == alone
    other_seed = llm.generate([p], sp.clone(seed=124))[0].outputs[0].token_ids
    assert other_seed != alone


def test_parallel_sampling_shares_prompt_blocks_copy_on_write(model):
    p = random_prompts(1, 18, 18, model.config.vocab_size, seed=11)[0]  # 4 full blocks + 2 tokens
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    engine.add_request("n4", p, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=5))
    engine.step()  # prefill, fork, first token of each sample
    req = engine.requests["n4"]
    assert len(req.seqs) == 4
    tables = [s.block_table for s in req.seqs]
    assert all(t[:4] == tables[0][:4] for t in tables)  # the full prompt blocks are shared ...
    assert engine.bm.blocks[tables[0][0]].ref_count == 4
    assert engine.bm.num_free_blocks == 64 - 5  # ... and so is the partial one, until written
    engine.step()  # every sample writes its token into the partial block: copy-on-write
    lasts = {s.block_table[4] for s in req.seqs}
    assert len(lasts) == 4
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    samples = [c.token_ids for c in outs["n4"].outputs]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1
    # each sample is exactly what the reference computes for its own history (CoW never mixed K/V up)
    for c in outs["n4"].outputs:
        full = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = model(full)[0, len(p) - 1:-1]
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).sum().item()
        assert abs(lp - c.cumulative_logprob) < 1e-3
    assert engine.bm.num_free_blocks == 64


def test_best_of_returns_highest_likelihood(model):
    p = random_prompts(1, 6, 6, model.config.vocab_size, seed=12)[0]
    llm = LLM(model, block_size=4, num_blocks=64)
    out = llm.generate([p], SamplingParams(n=2, best_of=5, max_tokens=5, temperature=1.0, seed=3))[0]
    every = llm.generate([p], SamplingParams(n=5, max_tokens=5, temperature=1.0, seed=3))[0]
    want = sorted(c.cumulative_logprob for c in every.outputs)[-2:][::-1]
    assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(want)


def test_logprobs_and_prompt_logprobs_match_the_model(model):
    p = random_prompts(1, 9, 9, model.config.vocab_size, seed=13)[0]
    llm = LLM(model, block_size=4, num_blocks=64)
    out = llm.generate([p], SamplingParams(max_tokens=3, temperature=0.0, logprobs=3, prompt_logprobs=2,
                                           ignore_eos=True))[0]
    c = out.outputs[0]
    with torch.no_grad():
        ref = model(torch.tensor([p + c.token_ids]))[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        d = out.prompt_logprobs[i]
        assert d[p[i]] == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
        assert len(d) <= 3
    for j, tok_id in enumerate(c.token_ids):
        d = c.logprobs[j]
        assert d[tok_id] == pytest.approx(ref[len(p) - 1 + j, tok_id].item(), abs=1e-4)
        assert set(ref[len(p) - 1 + j].topk(3).indices.tolist()) <= set(d)
    # max_tokens=0 only scores the prompt
    scored = llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
    assert scored.prompt_logprobs[1][p[1]] == pytest.approx(out.prompt_logprobs[1][p[1]], abs=1e-5)


def test_text_prompts_stop_strings_and_streaming_deltas(tok, model):
    llm = LLM(model, tokenizer=tok, block_size=4, num_blocks=64)
    base = llm.generate(["The first"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert text and text == tok.decode(base.outputs[0].token_ids, skip_special_tokens=True)
    # a stop string that spans a token boundary: two characters around the end of the first token
    first_len = len(tok.decode(base.outputs[0].token_ids[:1]))
    stop = text[max(0, first_len - 1):first_len + 1]
    assert len(stop) == 2 and stop in text
    out = llm.generate(["The first"], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = llm.generate(["The first"], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop],
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]
    engine = llm.engine
    chat_text = tok.render_chat([{"role": "user", "content": "hi"}])  # what a server renders
    assert engine.encode(chat_text) == tok.apply_chat_template([{"role": "user", "content": "hi"}], True)[0]
    engine.add_request("d", "The first", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                         output_kind="delta"))
    pieces = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            pieces.append(o.outputs[0].text)
    assert "".join(pieces) == text and len(pieces) > 1


def test_request_errors_are_clear(model):
    engine = LLMEngine(model, block_size=4, num_blocks=16)
    with pytest.raises(LmstackError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(LmstackError, match="outside the vocabulary"):
        engine.add_request("a", [10**6], SamplingParams())
    with pytest.raises(LmstackError, match="tokenizer"):
        engine.add_request("a", "text without tokenizer", SamplingParams())
    with pytest.raises(LmstackError, match="context"):
        engine.add_request("a", [5] * 300, SamplingParams())
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=1))
    with pytest.raises(LmstackError, match="already in use"):
        engine.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(LmstackError, match="lora"):
        engine.add_request("b", [5], SamplingParams(lora="nope"))
    assert engine.abort_request("missing") is None


def test_moe_and_sliding_window_models_match_reference():
    for overrides in (dict(n_experts=4, moe_top_k=2), dict(sliding_window=6), dict(position="alibi")):
        m = tiny_model(300, seed=1, **overrides)
        llm = LLM(m, block_size=4, num_blocks=64, max_batched_tokens=8)  # chunked prefill across windows
        for p in random_prompts(2, 5, 17, 300, seed=14):
            assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == reference(m, p, 12), overrides


def test_padded_vocab_rows_are_never_sampled(tok):
    """A model whose embedding table is padded past the tokenizer's vocabulary (the speedrun rounds it up to a
    multiple of 64) must only emit the tokenizer's ids, even when the padded rows hold the largest logits."""
    model = tiny_model(tok.vocab_size + 64)
    with torch.no_grad():  # make the padded rows win every argmax and most of the sampling mass
        model.lm_head.weight[tok.vocab_size:] = model.lm_head.weight[:64] * 50
    llm = LLM(model, tokenizer=tok)
    outs = llm.generate(["the of and", "to in a"], SamplingParams(max_tokens=12, temperature=1.0, n=3))
    ids = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert ids and max(ids) < tok.vocab_size
    greedy = llm.generate(["the of and"], SamplingParams(max_tokens=12, temperature=0.0))
    assert max(greedy[0].outputs[0].token_ids) < tok.vocab_size
