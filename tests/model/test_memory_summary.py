"""AutoCompressor summary vectors (model/memory/summary.py): shapes, the suffix reads the prefix only through the
summary vectors, truncated backprop, cached greedy decoding equals uncached, a tiny model learns to pass a key
through k=2 summary vectors (loss below the no-information bound), save/load round trip and refusals, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.memory.summary import AutoCompressor, SummaryTokens, load_summary_tokens, save_summary_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: two threads only contend on a busy machine

BASE = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48, tie_embeddings=False)


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, **kw})).eval()


@pytest.mark.parametrize("accumulate", [True, False])
def test_shapes_and_the_soft_prompt_of_a_chain(accumulate):
    comp = AutoCompressor(tiny(), k=4, accumulate=accumulate)
    ids = torch.randint(1, 32, (2, 24))
    logits, loss, soft = comp(ids, seg_len=8, targets=ids)
    assert logits.shape == (2, 24, 32) and loss.dim() == 0 and torch.isfinite(loss)
    assert soft.shape == ((2, 12, 32) if accumulate else (2, 4, 32))  # 3 segments x k, or the last k
    assert torch.allclose(comp.compress(ids, seg_len=8), soft, atol=1e-6)
    out, new = comp.segment(ids[:, :5], soft, summarize=True)
    assert out.shape == (2, 5, 32) and new.shape == (2, 4, 32)
    assert comp.segment(ids[:, :5])[1] is None  # no summary tokens asked for, none computed


def test_the_suffix_reads_the_prefix_only_through_the_summary_vectors():
    comp = AutoCompressor(tiny(1), k=4)
    prefix, suffix = torch.randint(1, 32, (2, 16)), torch.randint(1, 32, (2, 8))
    chained, _, _ = comp(torch.cat([prefix, suffix], 1), seg_len=16)
    soft = comp.compress(prefix, seg_len=16)
    alone, _ = comp.segment(suffix, soft)
    # the chain's suffix logits are exactly those of the suffix given k vectors: no raw prefix token is attended
    assert torch.allclose(chained[:, 16:], alone, atol=1e-5)
    changed = prefix.clone()
    changed[:, 3] = (changed[:, 3] % 31) + 1
    soft2 = comp.compress(changed, seg_len=16)
    assert not torch.allclose(soft, soft2)  # a prefix token reaches the suffix through the summary ...
    assert not torch.allclose(comp.segment(suffix, soft2)[0], alone)
    chained2, _, _ = comp(torch.cat([changed, suffix], 1), seg_len=16)
    assert torch.allclose(chained2[:, 16:], comp.segment(suffix, soft2)[0], atol=1e-5)
    # ... and only through it: the gradient of the suffix loss w.r.t. the prefix's embeddings is zero once the
    # summary vectors are constants, and non-zero through them
    comp.train()
    emb = comp.model.tok_emb.weight
    for fixed in (True, False):
        comp.zero_grad()
        soft = comp.compress(torch.arange(1, 17)[None], seg_len=16)  # prefix tokens 1..16, suffix 20..27
        logits, _ = comp.segment(torch.arange(20, 28)[None], soft.detach() if fixed else soft)
        F.cross_entropy(logits[0], torch.arange(21, 29) % 32).backward()
        prefix_grad = float(emb.grad[1:17].abs().sum())
        assert (prefix_grad == 0.0) == fixed
        assert float(emb.grad[20:28].abs().sum()) > 0
        assert (comp.summary.embedding.grad is None or float(comp.summary.embedding.grad.abs().sum()) == 0) == fixed


@pytest.mark.parametrize("bptt, reaches", [(1, (False, False)), (2, (False, False)), (3, (True, True))])
def test_truncated_backprop_cuts_the_chain_every_bptt_segments(bptt, reaches):
    comp = AutoCompressor(tiny(2), k=2, bptt=bptt).train()
    ids = torch.cat([torch.arange(1, 9), torch.arange(10, 18), torch.arange(20, 28)])[None]  # 3 disjoint segments
    targets = torch.full_like(ids, -100)
    targets[0, 16:] = torch.arange(0, 8)  # loss on the third segment only
    _, loss, _ = comp(ids, seg_len=8, targets=targets)
    loss.backward()
    grad = comp.model.tok_emb.weight.grad
    got = (float(grad[1:9].abs().sum()) > 0, float(grad[10:18].abs().sum()) > 0)
    assert got == reaches  # bptt=2: chunks (1, 2), (3): the third segment's loss stays in its own chunk
    assert float(grad[20:28].abs().sum()) > 0


def test_cached_greedy_decoding_equals_recomputing_the_window():
    comp = AutoCompressor(tiny(3), k=4)
    soft = comp.compress(torch.randint(1, 32, (2, 16)), seg_len=8)
    prompt = torch.randint(1, 32, (2, 5))
    got = comp.generate(soft, prompt, max_new_tokens=6)
    cur = prompt
    with torch.no_grad():
        for _ in range(6):
            logits, _ = comp.segment(cur, soft)
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, cur[:, 5:])


@pytest.mark.parametrize("scale", [False, True])
def test_the_first_block_reads_soft_vectors_as_they_are_and_tokens_as_the_model_embeds_them(scale):
    model = tiny(6, scale_embeddings=scale)
    comp = AutoCompressor(model, k=2)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    soft, ids = torch.randn(2, 3, 32), torch.randint(1, 32, (2, 5))
    with torch.no_grad():
        comp.segment(ids, soft, summarize=True)
        plain = model(ids)
    emb = model.tok_emb(ids) * (math.sqrt(32) if scale else 1.0)
    assert torch.allclose(seen[0][:, :3], soft, atol=1e-6)  # hidden states go in unscaled
    assert torch.allclose(seen[0][:, 3:8], emb, atol=1e-6)
    assert torch.allclose(seen[0][:, 8:], comp.summary.embedding.detach() * (math.sqrt(32) if scale else 1.0))
    assert torch.allclose(seen[1], emb, atol=1e-6)  # and the hook is gone: a plain call embeds its ids
    assert plain.shape == (2, 5, 32)


def key_batch(gen, n=32):
    """prefix: 6 tokens, the first a key from 8 choices (tokens 2..9), the rest noise (10..31); suffix: [1, key]."""
    key = torch.randint(2, 10, (n, 1), generator=gen)
    prefix = torch.cat([key, torch.randint(10, 32, (n, 5), generator=gen)], 1)
    return torch.cat([prefix, torch.ones(n, 1, dtype=torch.long), key], 1)


def test_training_passes_a_key_through_two_summary_vectors():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, "n_layers": 2, "d_model": 32, "max_seq_len": 16}))
    comp = AutoCompressor(model, k=2)
    opt = torch.optim.AdamW(comp.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    comp.train()

    def suffix_loss(ids):
        logits, _, _ = comp(ids[:, :-1], seg_len=6)  # segment 1: the prefix; segment 2: [1] -> predict the key
        return F.cross_entropy(logits[:, -1], ids[:, -1])

    first = None
    for _ in range(100):
        loss = suffix_loss(key_batch(gen))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    comp.eval()
    with torch.no_grad():
        final = float(suffix_loss(key_batch(torch.Generator().manual_seed(2), 256)))
    # ln 8 is the best a suffix can do without the key; only the summary vectors carry it across
    assert final < math.log(8) - 0.8 < first, (first, final)


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny(4)
    comp = AutoCompressor(model, k=3, accumulate=False, bptt=4)
    with torch.no_grad():
        comp.summary.embedding.add_(1.0)
    path = save_summary_tokens(comp, tmp_path / "summary_tokens.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["summary_tokens.safetensors"]  # atomic: no temp left
    back = load_summary_tokens(model, path)
    assert torch.equal(back.summary.embedding, comp.summary.embedding)
    assert (back.k, back.accumulate, back.bptt) == (3, False, 4)
    ids = torch.randint(1, 32, (1, 12))
    assert torch.equal(back.compress(ids, 6), comp.compress(ids, 6))
    with pytest.raises(LmstackError, match="another model"):
        load_summary_tokens(tiny(5), path)  # same config, other weights
    with pytest.raises(LmstackError, match="another model"):
        load_summary_tokens(tiny(4, n_layers=1), path)
    with pytest.raises(LmstackError, match=r"shape \(3, d_model=16\)"):
        load_summary_tokens(tiny(4, d_model=16), path)
    with pytest.raises(LmstackError, match="not found"):
        load_summary_tokens(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(LmstackError, match="not a summary-tokens file"):
        load_summary_tokens(model, bad)


def test_bad_input_is_refused_with_a_message():
    model = tiny()
    with pytest.raises(LmstackError, match="k must be >= 1"):
        AutoCompressor(model, k=0)
    with pytest.raises(LmstackError, match="not both"):
        AutoCompressor(model, k=2, summary=SummaryTokens(2, 32))
    with pytest.raises(LmstackError, match="d_model=32"):
        AutoCompressor(model, summary=SummaryTokens(2, 16))
    with pytest.raises(LmstackError, match="bptt"):
        AutoCompressor(model, k=2, bptt=0)
    with pytest.raises(LmstackError, match="causal LM"):
        AutoCompressor(tiny(causal=False), k=2)
    with pytest.raises(LmstackError, match="lmstack Transformer"):
        AutoCompressor(torch.nn.Linear(2, 2), k=2)
    comp = AutoCompressor(model, k=4)
    with pytest.raises(LmstackError, match="exceed max_seq_len=48"):
        comp.segment(torch.ones(1, 40, dtype=torch.long), torch.zeros(1, 6, 32), summarize=True)
    with pytest.raises(LmstackError, match="soft vectors must have shape"):
        comp.segment(torch.ones(2, 4, dtype=torch.long), torch.zeros(1, 4, 32))
    with pytest.raises(LmstackError, match="batch, time"):
        comp.segment(torch.ones(4, dtype=torch.long))
    with pytest.raises(LmstackError, match="seg_len"):
        comp(torch.ones(1, 4, dtype=torch.long), seg_len=0)
    with pytest.raises(LmstackError, match="targets"):
        comp(torch.ones(1, 4, dtype=torch.long), seg_len=2, targets=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(LmstackError, match="4 new tokens = 50 positions exceed"):
        comp.generate(torch.zeros(1, 6, 32), torch.ones(1, 40, dtype=torch.long), 5)
    with pytest.raises(LmstackError, match="max_new_tokens"):
        comp.generate(None, torch.ones(1, 2, dtype=torch.long), 0)
