"""Draft heads (Medusa, EAGLE) on the target's hidden states: lossless (greedy token-identical, sampled
outputs follow the target's distribution), saved and loaded as safetensors + JSON, learnable (a few
training steps on a repeated pattern lift acceptance past 0.5), and bad configs fail by name."""
import json

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.draft_heads import DraftHeads, HeadsConfig, load_heads
from lmstack.infer.draft_heads_train import train_heads

from infer_helpers import random_prompts, tiny_model
from test_speculative import chi_square_p, exact_distribution, sample_many


def make_heads(method: str, model, seed: int = 3, scale: float = 0.0) -> DraftHeads:
    torch.manual_seed(seed)
    cfg = model.config
    heads = DraftHeads(HeadsConfig(method, d_model=cfg.d_model, vocab_size=cfg.vocab_size, num_heads=3, n_heads=2,
                                   d_ff=64, window=8))
    if method == "medusa" and scale:  # off the zero init, so guesses disagree with the target often
        with torch.no_grad():
            heads.weight.normal_(0, scale)
    return heads.eval()


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_greedy_heads_are_token_identical(model, method):
    vocab = model.config.vocab_size
    base = LLM(model, block_size=4, num_blocks=256)
    fast = LLM(model, block_size=4, num_blocks=256, max_num_seqs=4,
               speculative={"method": method, "heads": make_heads(method, model, scale=0.3), "num_tokens": 3})
    motif = random_prompts(1, 5, 5, vocab, seed=20)[0]
    prompts = [motif * 4, *random_prompts(3, 4, 12, vocab, seed=21)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    assert got == want
    assert fast.engine.stats()["spec_proposed_tokens"] > 40  # every step after the first proposed
    assert fast.engine.bm.num_free_blocks == 256


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_sampled_distribution_is_unchanged_with_heads(method):
    target = tiny_model(4, seed=11)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.95, ignore_eos=True)
    heads = make_heads(method, target, seed=5, scale=2.0)
    llm = LLM(target, block_size=4, num_blocks=2048, max_num_seqs=64, max_batched_tokens=4096,
              speculative={"method": method, "heads": heads, "num_tokens": 2})
    n = 3000
    counts = sample_many(llm, prompt, params, 30, n // 30)
    stats = llm.engine.stats()
    assert stats["spec_proposed_tokens"] > 1000
    assert 0.05 < stats["spec_acceptance_rate"] < 0.95  # both branches of the rule ran many times
    assert chi_square_p(counts, exact_distribution(target, prompt, params, 4), n) > 1e-3


def test_heads_save_load_round_trip(tmp_path, model):
    for method in ("medusa", "eagle"):
        heads = make_heads(method, model, scale=0.3)
        heads.save(tmp_path / method)
        assert json.loads((tmp_path / method / "heads.json").read_text())["method"] == method
        assert not list((tmp_path / method).glob("*.tmp"))  # atomic writes leave no temp file behind
        back = load_heads(tmp_path / method, model)
        h = torch.randn(5, model.config.d_model)
        with torch.no_grad():
            if method == "medusa":
                assert torch.equal(back.medusa(h), heads.medusa(h))
            else:
                e = torch.randn(1, 5, model.config.d_model)
                assert torch.equal(back.eagle(h[None], e)[0], heads.eagle(h[None], e)[0])


def pattern_target(period: list[int], vocab: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny target that has learned a repeated pattern (a few seconds of training)."""
    model = tiny_model(vocab, seed=2).train()
    data = torch.tensor(period * 200)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        i = step % len(period)
        x, y = data[i:i + 64][None], data[i + 1:i + 65][None]
        loss = F.cross_entropy(model(x)[0], y[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_trained_heads_accept_a_learned_pattern(method):
    period = [5, 9, 13, 17, 21, 25, 29]
    target, data = pattern_target(period, 40)
    prompt = (period * 3)[:10]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    def acceptance(heads):
        llm = LLM(target, block_size=4, num_blocks=128, speculative={"method": method, "heads": heads,
                                                                     "num_tokens": 3})
        out = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert out == LLM(target, block_size=4, num_blocks=128).generate([prompt], params)[0].outputs[0].token_ids
        return llm.engine.stats()["spec_acceptance_rate"]

    heads = make_heads(method, target, seed=1)
    before = acceptance(heads)
    info = train_heads(heads, target, data, steps=60, batch=4, seq_len=32, lr=1e-2, log_every=0)
    after = acceptance(heads)
    assert info["steps"] == 60 and info["tokens"] == 60 * 4 * 32
    print(method, "acceptance before/after training", before, after)
    assert after > 0.5, (before, after)
    assert after > before  # the test has power: untrained heads do worse on the same pattern


def test_heads_config_errors(tmp_path, model):
    with pytest.raises(LmstackError, match="needs heads"):
        LLM(model, speculative={"method": "eagle"})
    with pytest.raises(LmstackError, match="no heads.json"):
        LLM(model, speculative={"method": "medusa", "heads": str(tmp_path / "missing")})
    wrong_width = DraftHeads(HeadsConfig("medusa", d_model=model.config.d_model + 8,
                                         vocab_size=model.config.vocab_size))
    with pytest.raises(LmstackError, match="d_model"):
        LLM(model, speculative={"method": "medusa", "heads": wrong_width})
    wrong_vocab = DraftHeads(HeadsConfig("eagle", d_model=model.config.d_model, vocab_size=77))
    wrong_vocab.save(tmp_path / "v77")
    with pytest.raises(LmstackError, match="vocab_size"):
        LLM(model, speculative={"method": "eagle", "heads": str(tmp_path / "v77")})
    with pytest.raises(LmstackError, match="medusa heads"):
        LLM(model, speculative={"method": "eagle", "heads": make_heads("medusa", model)})
    with pytest.raises(LmstackError, match="method"):
        HeadsConfig("hydra")


def test_eagle_layer_extends_kv_like_one_causal_pass(model):
    """The engine extends the layer's K/V step by step (several verified positions at once, then one
    position per rolled guess); that must equal one causal pass over the whole window."""
    heads = make_heads("eagle", model)
    d = model.config.d_model
    feats, emb = torch.randn(1, 9, d), torch.randn(1, 9, d)
    with torch.no_grad():
        full, _ = heads.eagle(feats, emb, start=5)
        a, kv = heads.eagle(feats[:, :4], emb[:, :4], start=5)
        b, kv = heads.eagle(feats[:, 4:8], emb[:, 4:8], kv, start=9)
        c, _ = heads.eagle(feats[:, 8:], emb[:, 8:], kv, start=13)
    assert torch.allclose(torch.cat([a, b, c], dim=1), full, atol=1e-5)
    with torch.no_grad():  # and RoPE sees only distances: shifting every position changes nothing
        shifted, _ = heads.eagle(feats, emb, start=0)
    assert torch.allclose(shifted, full, atol=1e-4)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_proposal_vocabulary_narrows_guesses_not_output(tmp_path, model, method):
    """restrict(ids): greedy guesses come only from those ids (the LM head's matmul covers their rows),
    the output stays token-identical, and the ids survive save/load."""
    vocab = model.config.vocab_size
    allowed = list(range(20, 60))
    heads = make_heads(method, model, scale=0.3).restrict(torch.tensor(allowed))
    heads.save(tmp_path / "h")
    back = load_heads(tmp_path / "h", model)
    assert back.proposal_ids.tolist() == allowed and back.config.proposal_vocab == len(allowed)
    llm = LLM(model, block_size=4, num_blocks=256, speculative={"method": method, "heads": str(tmp_path / "h"),
                                                                "num_tokens": 3})
    seen = []
    propose = llm.engine.spec.propose

    def spy(seqs):
        propose(seqs)
        seen.extend(t for s in seqs for t in s.spec_tokens)
    llm.engine.spec.propose = spy
    prompts = random_prompts(3, 4, 12, vocab, seed=31)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, block_size=4, num_blocks=256).generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert len(seen) > 20 and set(seen) <= set(allowed)
    with pytest.raises(LmstackError, match="proposal ids"):
        make_heads(method, model).restrict(torch.tensor([vocab]))
