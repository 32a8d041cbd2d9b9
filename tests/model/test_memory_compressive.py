"""Compressive memory (model/memory/compressive.py): identity compression equals a longer Transformer-XL memory,
the compressed memory's slot count and FIFO order, the reconstruction loss trains the compressor alone (and
lowers with training), carrying across calls, bad input."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.counting import memory_params
from lmstack.model.memory.compressive import (CompressiveMemory, Compressor, attach_compressor,
                                              compressive_forward)
from lmstack.model.memory.xl import xl_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: two threads only contend on a busy machine


def tiny(fn="mean", rate=2, **kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(ModelConfig(**{**base, **kw})).eval()
    attach_compressor(model, fn=fn, rate=rate)
    return model


@pytest.mark.parametrize("kw", [dict(position="rope"), dict(position="alibi"),
                                dict(position="rope", qk_norm=True, fused_projections=True, n_layers=3)])
def test_identity_compression_equals_xl_with_the_longer_memory(kw):
    model = tiny("mean", 1, **kw)
    ids = torch.randint(0, 32, (2, 56))
    seg, m, n = 8, 4, 12  # cmem fills after 3 segments and then wraps (FIFO) over the rest
    with torch.no_grad():
        want, _ = xl_forward(model, ids, seg_len=seg, mem_len=m + n)
        memory = CompressiveMemory(model, mem_len=m, cmem_len=n, rate=1)
        got, _ = compressive_forward(model, ids, seg_len=seg, memory=memory)
        short, _ = xl_forward(model, ids, seg_len=seg, mem_len=m)
    assert memory.clength == n and memory.length == m
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # the compressed memory is what lets segment 2 onwards see past the plain memory
    assert not torch.allclose(got[:, seg:], short[:, seg:], atol=1e-3)
    assert torch.allclose(got[:, :seg], short[:, :seg], atol=1e-5)


def test_compressed_slots_are_floor_evicted_over_rate_capped_fifo():
    model = tiny("mean", 2)
    ids = torch.randint(0, 32, (1, 30))
    memory = CompressiveMemory(model, mem_len=4, cmem_len=5, rate=2)
    # layer 0's attention input depends on the tokens only: what the memory evicts from it is known
    h0 = model.blocks[0].attn_norm(model.tok_emb(ids)).detach()
    seen = 0
    with torch.no_grad(), memory.attach():
        for segment in ids.split(3, dim=1):  # 3 tokens a segment: evictions of odd size leave one waiting
            model(segment, cache=memory)
            seen += segment.shape[1]
            evicted = max(seen - 4, 0)
            slots = min(evicted // 2, 5)
            assert memory.evicted == evicted and memory.clength == slots
            for layer in range(2):
                held = memory.cmem[layer]
                assert (0 if held is None else held.shape[1]) == slots
                assert memory.memory[layer].shape[1] == min(seen, 4)
            if slots:
                pairs = h0[:, :evicted // 2 * 2].view(1, -1, 2, 32).mean(2)
                assert torch.allclose(memory.cmem[0], pairs[:, -slots:], atol=1e-6)  # the newest slots, in order
    assert memory.evicted == 26 and memory.clength == 5 and memory.waiting[0] is None


def test_compression_functions_differ_and_conv_starts_as_mean_pooling():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=32)
    h = torch.randn(2, 8, 16)
    mean, mx, conv = (Compressor(cfg, fn, 4) for fn in ("mean", "max", "conv"))
    assert mean(0, h).shape == (2, 2, 16)
    assert torch.allclose(mean(0, h), h.view(2, 2, 4, 16).mean(2))
    assert torch.allclose(mx(0, h), h.view(2, 2, 4, 16).amax(2))
    assert torch.allclose(conv(1, h), mean(1, h), atol=1e-6)
    with torch.no_grad():
        conv.convs[1].weight.add_(0.1 * torch.randn_like(conv.convs[1].weight))
    assert not torch.allclose(conv(1, h), mean(1, h), atol=1e-3)
    # the parameter count the model's counting module reports for memory='compressive', cmem_fn='conv'
    compressive = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, memory="compressive",
                              mem_len=8, cmem_len=4, cmem_rate=4, cmem_fn="conv")
    assert sum(p.numel() for p in conv.parameters()) == memory_params(compressive)
    assert sum(p.numel() for p in mean.parameters()) == 0
    with pytest.raises(LmstackError, match="whole groups of rate=4"):
        mean(0, h[:, :6])


def _run(model, memory, ids, seg):
    """Segments with gradients on; returns the last segment's logits and the summed reconstruction losses."""
    aux, outs = 0.0, []
    with memory.attach():
        for segment in ids.split(seg, dim=1):
            outs.append(model(segment, cache=memory))
            aux = aux + memory.aux_loss
    return torch.cat(outs, 1), aux


def test_reconstruction_loss_trains_only_the_compressor():
    model = tiny("conv", 2).train()
    with torch.no_grad():  # a compressor that is not mean pooling, so the loss is not at a stationary point
        for conv in model.cmem_compress.convs:
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))
    ids = torch.randint(0, 32, (2, 32))
    memory = CompressiveMemory(model, mem_len=8, cmem_len=4, rate=2)
    logits, aux = _run(model, memory, ids, 8)
    assert aux.item() > 0 and aux.requires_grad
    aux.backward()
    compressor = {n for n, _ in model.named_parameters() if n.startswith("cmem_compress.")}
    for name, p in model.named_parameters():
        if name in compressor:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None or p.grad.abs().max() == 0, name
    # and the task loss never reaches the compressor (the compressed memory is detached)
    model.zero_grad(set_to_none=True)
    memory.reset()
    logits, _ = _run(model, memory, ids, 8)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(model.get_parameter(n).grad is None for n in compressor)
    assert model.tok_emb.weight.grad.abs().max() > 0


def test_training_the_compressor_alone_lowers_the_reconstruction_loss():
    model = tiny("conv", 2)
    model.requires_grad_(False)
    model.cmem_compress.requires_grad_(True)
    opt = torch.optim.Adam(model.cmem_compress.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    memory = CompressiveMemory(model, mem_len=8, cmem_len=4, rate=2)

    def loss_on(ids):
        memory.reset()
        return _run(model, memory, ids, 8)[1]

    held_out = torch.randint(0, 32, (4, 32), generator=gen)
    with torch.enable_grad():
        before = loss_on(held_out).item()
        for _ in range(40):
            loss = loss_on(torch.randint(0, 32, (4, 32), generator=gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = loss_on(held_out).item()
    assert after < 0.8 * before, (before, after)


def test_reconstruction_loss_is_built_when_it_trains_something_or_when_asked():
    model = tiny("conv", 2)
    memory = CompressiveMemory(model, mem_len=8, cmem_len=4, rate=2)
    first, second = torch.randint(0, 32, (2, 1, 8))
    with memory.attach():
        model(first, cache=memory)
        assert memory.aux_loss.item() == 0 and memory.clength == 0  # nothing evicted yet
        with torch.no_grad():
            model(second, cache=memory)
        assert memory.clength == 4 and memory.aux_loss.item() == 0  # compressed, but no loss is built at inference
    for fn, asked, grad, built in (("mean", None, True, False), ("mean", True, False, True), ("conv", False, True, False)):
        model = tiny(fn, 2)
        memory = CompressiveMemory(model, mem_len=8, cmem_len=4, rate=2, recon_loss=asked)
        with torch.set_grad_enabled(grad), memory.attach():
            model(first, cache=memory)
            model(second, cache=memory)
        assert (memory.aux_loss.item() > 0) == built, (fn, asked, grad)


def test_compressive_forward_loss_includes_the_reconstruction_loss_and_carries_across_calls():
    model = tiny("conv", 2).train()
    ids = torch.randint(0, 32, (1, 32))
    targets = torch.randint(0, 32, (1, 32))
    _, loss = compressive_forward(model, ids, seg_len=8, targets=targets,
                                  memory=CompressiveMemory(model, mem_len=8, cmem_len=4, rate=2))
    loss.backward()
    assert all(p.grad is not None for p in model.cmem_compress.parameters())  # only the reconstruction loss reaches it
    model.eval()
    with torch.no_grad():
        whole, _ = compressive_forward(model, ids, 8, memory=CompressiveMemory(model, 8, 4, 2))
        memory = CompressiveMemory(model, 8, 4, 2)
        a, _ = compressive_forward(model, ids[:, :16], 8, memory=memory)
        b, _ = compressive_forward(model, ids[:, 16:], 8, memory=memory)
        assert torch.allclose(torch.cat((a, b), 1), whole, atol=1e-6)
        # 2 layers x (8 memory + 4 compressed) slots x d_model fp32; nothing waits (evictions of 8 at rate 2)
        assert memory.nbytes() == 2 * (8 + 4) * 32 * 4
        memory.reset()
        fresh, _ = compressive_forward(model, ids[:, 16:], 8, memory=memory)
    assert torch.allclose(fresh[:, :8], model(ids[:, 16:24]), atol=1e-5)


def test_defaults_come_from_the_config():
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(ModelConfig(**cfg))
    attach_compressor(model, fn="max", rate=4)
    model.config = ModelConfig(**cfg, memory="compressive", mem_len=16, cmem_len=8, cmem_rate=4, cmem_fn="max")
    memory = CompressiveMemory(model)
    assert (memory.mem_len, memory.cmem_len, memory.rate) == (16, 8, 4)
    assert attach_compressor(model) is memory.compressor is model.cmem_compress


def test_bad_input_names_the_problem():
    for position in ("learned", "sinusoidal"):
        with pytest.raises(LmstackError, match=f"position='{position}'"):
            CompressiveMemory(tiny(position=position), 8, 4, 2)
    model = tiny("mean", 2)
    with pytest.raises(LmstackError, match="max_seq_len=64"):
        CompressiveMemory(model, 40, 24, 2)
    with pytest.raises(LmstackError, match="cmem_len must be >= 1"):
        CompressiveMemory(model, 8, 0, 2)
    with pytest.raises(LmstackError, match="rate=2 but 4 was asked"):
        CompressiveMemory(model, 8, 4, 4)
    with pytest.raises(LmstackError, match="unknown compression function"):
        Compressor(model.config, "median", 2)
    ids = torch.randint(0, 32, (1, 64))
    with pytest.raises(LmstackError, match="exceed the model's max_seq_len=64"):
        compressive_forward(model, ids, seg_len=40, memory=CompressiveMemory(model, 16, 16, 2))
    memory = CompressiveMemory(model, 16, 16, 2)
    with torch.no_grad(), memory.attach():
        for segment in ids[:, :48].split(16, dim=1):
            model(segment, cache=memory)
        with pytest.raises(LmstackError, match="memory \\(16\\) \\+ segment \\(40\\)"):
            model(torch.randint(0, 32, (1, 40)), cache=memory)
        with pytest.raises(LmstackError, match="batch size 1"):
            model(torch.randint(0, 32, (2, 4)), cache=memory)
    with pytest.raises(LmstackError, match="memory.attach"):
        model(ids[:, :4], cache=memory)
