"""Transformer-XL memory (model/memory/xl.py): segment-by-segment equals the banded long forward, the memory is
detached but feeds W_k/W_v gradient, it beats no memory on a copy-from-the-previous-segment task, bad input."""
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.backends import BACKENDS
from lmstack.model.masks import AttentionMask
from lmstack.model.memory import XLMemory, xl_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: two threads only contend on a busy machine


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


@dataclass
class SegmentBand(AttentionMask):
    """The model's own mask (causal, ALiBi offsets) plus one rule: a key at most `reach` segments before the query's."""
    seg_len: int = 1
    reach: int = 1

    def block(self, q_sl=slice(None), k_sl=slice(None)):
        q = self.q_pos[q_sl][:, None] // self.seg_len
        k = self.k_pos[k_sl][None, :] // self.seg_len
        return super().block(q_sl, k_sl) & (q - k <= self.reach)[None, None]

    def is_full(self):
        return False

    def is_plain_causal(self):
        return False


class BandedForward(AttentionCache):
    """One long forward at absolute positions 0..T-1 whose attention pattern is Transformer-XL's with
    mem_len = reach * seg_len: each token sees its own segment causally and the whole `reach` segments before.
    By induction over layers, every hidden state of segments s-reach..s-1 then equals the one XL stores as
    memory for segment s. (RoPE: XL's positions are local, 0..mem+seg-1, so equality also checks that only
    offsets matter.)"""

    def __init__(self, seg_len, reach=1):
        self.seg_len, self.reach = seg_len, reach

    def positions(self, t):
        pos = torch.arange(t)
        return pos, pos

    def attend(self, layer, q, k, v, attn, ctx):
        base = ctx.mask(layer)
        mask = SegmentBand(**{f.name: getattr(base, f.name) for f in fields(AttentionMask) if f.init},
                           seg_len=self.seg_len, reach=self.reach)
        return BACKENDS["naive"](q, k, v, mask, attn.scale, slopes=ctx.slopes, softcap=attn.softcap)

    def advance(self, t):
        pass


@pytest.mark.parametrize("kw", [dict(position="rope"), dict(position="alibi"),
                                dict(position="rope", qk_norm=True, fused_projections=True),
                                dict(position="rope", sliding_window=12, attn_backend="blockwise", attn_block_size=4)])
def test_segments_with_memory_equal_the_banded_long_forward(kw):
    model = tiny(**kw)
    ids = torch.randint(0, 32, (2, 40))
    seg = 8
    with torch.no_grad():
        want = model(ids, cache=BandedForward(seg))
        got, _ = xl_forward(model, ids, seg_len=seg, mem_len=seg)
        plain = model(ids)  # full causal attention: a different pattern, so a different answer
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert not torch.allclose(got[:, 2 * seg:], plain[:, 2 * seg:], atol=1e-3)
    # the first segment has no memory: it is exactly a plain forward of that segment
    assert torch.allclose(got[:, :seg], plain[:, :seg], atol=1e-5)


def test_memory_longer_than_a_segment_reaches_two_segments_back():
    model = tiny()
    ids = torch.randint(0, 32, (1, 40))
    with torch.no_grad():
        want = model(ids, cache=BandedForward(8, reach=2))
        got, _ = xl_forward(model, ids, seg_len=8, mem_len=16)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_mem_len_zero_is_independent_segments():
    model = tiny()
    ids = torch.randint(0, 32, (1, 24))
    with torch.no_grad():
        got, _ = xl_forward(model, ids, seg_len=8, mem_len=0)
        want = torch.cat([model(s) for s in ids.split(8, dim=1)], dim=1)
    assert torch.allclose(got, want, atol=1e-6)


def test_memory_is_detached_but_feeds_wk_and_wv():
    model = tiny(n_layers=2).train()
    first_a, first_b = torch.randint(0, 16, (2, 1, 8))  # segment 1 uses tokens 0..15 only
    second = torch.randint(16, 32, (1, 8))               # segment 2 uses tokens 16..31 only
    attn = model.blocks[0].attn

    def grads(first, mem_len):
        model.zero_grad()
        memory = XLMemory(model, mem_len)
        with memory.attach():
            model(first, cache=memory)
            assert all(m is None or m.grad_fn is None and not m.requires_grad for m in memory.memory)
            logits = model(second, cache=memory)
        # the first token of segment 2 sees only itself and the memory
        F.cross_entropy(logits[:, 0], second[:, 1]).backward()
        return (model.tok_emb.weight.grad.clone(), attn.k_proj.weight.grad.clone(), attn.v_proj.weight.grad.clone())

    emb, wk, wv = grads(first_a, 8)
    # no gradient reaches segment 1's graph: its tokens' embedding rows get nothing (16..31 do, via segment 2)
    assert emb[:16].abs().max() == 0 and emb[16:].abs().max() > 0
    # without memory a lone key gets softmax weight 1 whatever it is: W_k of layer 0 gets no gradient (rounding aside) ...
    _, wk_none, wv_none = grads(first_a, 0)
    assert wk_none.abs().max() < 1e-8 and wk.abs().max() > 1e-5
    # ... with memory it does, and both W_k's and W_v's gradients depend on what the memory holds
    _, wk_b, wv_b = grads(first_b, 8)
    assert not torch.allclose(wk, wk_b) and not torch.allclose(wv, wv_b) and not torch.allclose(wv, wv_none)


def test_memory_carries_across_calls_and_resets():
    model = tiny()
    ids = torch.randint(0, 32, (1, 32))
    with torch.no_grad():
        whole, _ = xl_forward(model, ids, seg_len=8, mem_len=8)
        memory = XLMemory(model, 8)
        a, _ = xl_forward(model, ids[:, :16], seg_len=8, memory=memory)
        b, _ = xl_forward(model, ids[:, 16:], seg_len=8, memory=memory)
        assert torch.allclose(torch.cat((a, b), 1), whole, atol=1e-6)
        memory.reset()
        fresh, _ = xl_forward(model, ids[:, 16:], seg_len=8, memory=memory)
    assert torch.allclose(fresh[:, :8], model(ids[:, 16:24]), atol=1e-5)
    assert memory.nbytes() == 3 * 8 * 32 * 4  # 3 layers x 8 slots x d_model fp32


def test_bad_input_names_the_conflict():
    model = tiny()
    with pytest.raises(LmstackError, match="mem_len must be >= 0"):
        XLMemory(model, -1)
    with pytest.raises(LmstackError, match="max_seq_len=64"):
        XLMemory(model, 64)
    with pytest.raises(LmstackError, match="exceed the model's max_seq_len"):
        xl_forward(model, torch.zeros(1, 48, dtype=torch.long), seg_len=40, mem_len=32)
    for position in ("learned", "sinusoidal"):
        with pytest.raises(LmstackError, match=f"position='{position}'"):
            XLMemory(tiny(position=position), 8)
    with pytest.raises(LmstackError, match="attach"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=XLMemory(model, 8))
    memory = XLMemory(model, 8)
    with memory.attach(), pytest.raises(LmstackError, match="doc_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=memory, doc_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LmstackError, match="targets must have the shape"):
        xl_forward(model, torch.zeros(1, 8, dtype=torch.long), 4, targets=torch.zeros(1, 7, dtype=torch.long))


def test_memory_beats_no_memory_on_copying_the_previous_segment():
    """Every segment repeats the first, random one, so after segment 1 the next token sits one segment back:
    with memory it is in reach, without it only each segment's last target (its own first token) is."""
    seg, vocab = 8, 16

    def batch(gen):
        stream = torch.randint(0, vocab, (16, seg), generator=gen).repeat(1, 3)
        ids, targets = stream[:, :-1], stream[:, 1:].clone()
        targets[:, :seg - 1] = -100  # segment 1's next tokens are random: not scored
        return ids, targets

    def held_out_loss(mem_len):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                                        qkv_bias=True))  # biases let a head attend by offset alone
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            ids, targets = batch(gen)
            _, loss = xl_forward(model, ids, seg_len=seg, mem_len=mem_len, targets=targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ids, targets = batch(gen)
        with torch.no_grad():
            return float(xl_forward(model, ids, seg_len=seg, mem_len=mem_len, targets=targets)[1])

    with_memory, without = held_out_loss(seg), held_out_loss(0)
    # measured: 0.15 vs 2.78 (ln 16 = 2.77: chance); seeds 0-4 give 0.15-0.44 with memory
    assert with_memory < 0.3 * without and without > 2.0, (with_memory, without)
