"""Multi-LoRA hook (mixed adapters in one batch, also on fused projections), the async streaming engine, and
the engine's fused-projection model against the split one."""
import asyncio
import copy

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.infer import LLM, AsyncLLMEngine, SamplingParams
from lmstack.infer.lora_hook import LinearLoRA
from lmstack.model.reference_decode import reference_decode

from infer_helpers import random_prompts, tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def merged(model, adapter: LinearLoRA):
    """The same model with each LoRA delta merged into its weight: W + scale * B A."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            mods[name].weight += adapter.scale * b @ a
    return m


def test_mixed_adapters_in_one_batch_equal_each_alone(model):
    ad_a = LinearLoRA.random(model, rank=1, std=0.4, seed=1)
    ad_b = LinearLoRA.random(model, rank=1, targets=("v_proj", "down_proj"), std=0.4, seed=2)
    prompts = random_prompts(4, 5, 14, model.config.vocab_size, seed=30)
    loras = [None, "a", "b", "a"]
    llm = LLM(model, block_size=4, num_blocks=256, lora_adapters={"a": ad_a, "b": ad_b})
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora=loras)]
    for p, name, got in zip(prompts, loras, batch):
        alone = llm.generate([p], GREEDY, lora=name)[0].outputs[0].token_ids
        assert got == alone
        ref_model = model if name is None else merged(model, {"a": ad_a, "b": ad_b}[name])
        assert got == reference_decode(ref_model, torch.tensor([p]), 8)[0, len(p):].tolist()
    assert batch[1] != batch[0] or batch[2] != batch[0]  # the adapters really change the output
    # adapters do not share prefix-cache blocks with the base model
    p = prompts[0] * 3
    llm.generate([p], GREEDY)
    assert llm.generate([p], GREEDY, lora="a")[0].num_cached_tokens == 0
    assert llm.generate([p], GREEDY)[0].num_cached_tokens > 0


def test_lora_registry_errors(model):
    llm = LLM(model, block_size=4, num_blocks=32)
    with pytest.raises(LmstackError, match="apply"):
        llm.engine.add_lora("x", object())
    with pytest.raises(LmstackError, match="not a registered adapter"):
        llm.generate([[1, 2]], GREEDY, lora="x")
    with pytest.raises(LmstackError, match="A \\(r, in\\)"):
        LinearLoRA({"q": (torch.zeros(2, 3), torch.zeros(3, 3))})


def test_engine_logits_on_fused_projections_equal_the_split_model():
    model = tiny_model(300, seed=4, qkv_bias=True)
    fused = copy.deepcopy(model).fuse_projections()
    logits = {}
    for name, m in (("split", model), ("fused", fused)):
        llm = LLM(m, block_size=4, num_blocks=64)
        engine, runner = llm.engine, llm.engine.runner
        engine.add_request("x", random_prompts(1, 9, 9, 300, seed=31)[0], GREEDY)
        engine.step()
        seq = engine.requests["x"].seqs[0]
        engine.bm.ensure_slots(seq, seq.num_tokens + 2)
        decode = runner.run([(seq, [seq.last_token], seq.num_tokens - 1)], [0])
        # a 3-token window (speculative verification): logits of every position
        window = runner.run([(seq, [seq.last_token, 7, 9], seq.num_tokens - 1)], [0, 1, 2])
        logits[name] = (decode, window)
    assert isinstance(fused.blocks[0].attn.qkv_proj, torch.nn.Linear) and fused.blocks[0].attn.q_proj is None
    assert torch.equal(logits["split"][0], logits["fused"][0])
    assert torch.equal(logits["split"][1], logits["fused"][1])


def test_lora_serving_on_fused_projections_equals_the_split_model():
    model = tiny_model(300, seed=6, qkv_bias=True)  # its own: an engine's LoRA hooks stay on the model it serves
    # adapters name q/k/v and gate/up (PEFT's targets); on a fused model they land on their rows of the fused output
    targets = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    adapter = LinearLoRA.random(model, rank=2, targets=targets, std=0.3, seed=5)
    fused = copy.deepcopy(model).fuse_projections()
    assert LinearLoRA.random(fused, rank=2, targets=targets, std=0.3, seed=5).weights.keys() == adapter.weights.keys()
    prompts = random_prompts(3, 5, 12, model.config.vocab_size, seed=32)
    loras = ["a", None, "a"]
    outs = {}
    for name, m in (("split", model), ("fused", fused)):
        llm = LLM(m, block_size=4, num_blocks=128, lora_adapters={"a": adapter})
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora=loras)]
    assert outs["fused"] == outs["split"]
    p = prompts[0]
    assert outs["fused"][0] == reference_decode(merged(model, adapter), torch.tensor([p]), 8)[0, len(p):].tolist()
    assert outs["fused"][0] != reference_decode(model, torch.tensor([p]), 8)[0, len(p):].tolist()  # it adapts


def test_async_streaming_and_cancellation(model, tok):
    aengine = AsyncLLMEngine(model, tokenizer=tok, block_size=4, num_blocks=64, max_num_seqs=4)

    async def main():
        chunks = []
        async for out in aengine.generate("The first", SamplingParams(max_tokens=10, temperature=0.0,
                                                                       ignore_eos=True), request_id="s1"):
            chunks.append(out)
        assert chunks[-1].finished and len(chunks) == 10
        assert [len(c.outputs[0].token_ids) for c in chunks] == list(range(1, 11))  # cumulative
        # two concurrent streams, one cancelled half way
        async def consume(rid, stop_after=None):
            got = 0
            async for out in aengine.generate([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True),
                                              request_id=rid):
                got += 1
                if stop_after and got == stop_after:
                    break  # leaving the loop cancels the request
            return got
        a, b = await asyncio.gather(consume("c1", stop_after=3), consume("c2"))
        assert a == 3 and b == 30
        for _ in range(20):
            if aengine.engine.stats()["num_blocks_free"] == 64:
                break
            await asyncio.sleep(0.05)
        assert aengine.engine.stats()["num_blocks_free"] == 64
        assert not aengine.engine.has_unfinished_requests()
        with pytest.raises(LmstackError):
            async for _ in aengine.generate([], SamplingParams()):
                pass
        await aengine.shutdown()

    asyncio.run(main())
