"""kNN memory (model/memory/knn.py): the store's top-k is exact (torch and FAISS) and FIFO-bounded, a closed gate
is plain local attention, a tiny model recalls a fact stated in an earlier call (and after save/load) where the
same model without memory is at chance, save/load round-trips and refuses another model's memory, bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.memory import KNNMemory, KNNStore, attach_knn_gate, knn_forward, load_knn_gate, save_knn_gate
from lmstack.model.memory.knn import detach_knn_gate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: two threads only contend on a busy machine


def tiny(seed=0, gate=0.0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(ModelConfig(**{**base, **kw})).eval()
    attach_knn_gate(model, gate)
    return model


def brute_top_k(keys, q, k):
    """Per (row, query head): the indices of the k largest q.key, by numpy, kv head h // (H / Hkv)."""
    keys, q = keys.numpy(), q.numpy()
    b, h, t, _ = q.shape
    group = h // keys.shape[1]
    out = np.empty((b, h, t, k), dtype=np.int64)
    for row in range(b):
        for head in range(h):
            scores = q[row, head] @ keys[row, head // group].T
            out[row, head] = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return out


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_store_returns_the_exact_top_k_and_evicts_oldest_first(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    store = KNNStore(capacity=40, backend=backend)
    keys, values = torch.randn(2, 2, 50, 8), torch.randn(2, 2, 50, 8)
    store.add(keys[:, :, :30], values[:, :, :30])
    store.add(keys[:, :, 30:], values[:, :, 30:])
    assert len(store) == 40  # FIFO: the first 10 pairs are gone
    assert torch.equal(store.keys, keys[:, :, 10:]) and torch.equal(store.values, values[:, :, 10:])
    q = torch.randn(2, 4, 3, 8)  # 4 query heads over 2 kv heads (GQA)
    got_k, got_v = store.search(q, 5)
    want = torch.from_numpy(brute_top_k(keys[:, :, 10:], q, 5)) + 10
    group_of = torch.arange(4) // 2
    for row in range(2):
        for head in range(4):
            kv = group_of[head]
            assert torch.equal(got_k[row, head], keys[row, kv][want[row, head]])
            assert torch.equal(got_v[row, head], values[row, kv][want[row, head]])
    # more than held: every pair, best first
    all_k, _ = store.search(q, 100)
    assert all_k.shape == (2, 4, 3, 40, 8)


@pytest.mark.parametrize("kw", [dict(), dict(position="alibi"), dict(qk_norm=True, fused_projections=True)])
def test_a_closed_gate_is_plain_local_attention(kw):
    model = tiny(gate=float("-inf"), **kw)  # sigmoid(-inf) = 0: memory weight 0
    earlier, ids = torch.randint(0, 32, (2, 16)), torch.randint(0, 32, (2, 12))
    memory = KNNMemory(model, layer=1, capacity=64, top_k=4)
    with torch.no_grad():
        model(earlier, cache=memory)
        assert len(memory) == 16
        closed = model(ids, cache=memory)
        plain = model(ids)
        model.knn_gate.logit.fill_(0.0)  # half memory: now the store changes the answer
        mixed = model(ids, cache=memory)
    assert torch.allclose(closed, plain, atol=1e-6), (closed - plain).abs().max()
    assert not torch.allclose(mixed, plain, atol=1e-4)
    assert len(memory) == 16 + 2 * 12 and memory.nbytes() == 2 * (2 * 2 * 40 * 8 * 4)  # keys + values, fp32
    # an empty store is local attention too, whatever the gate
    with torch.no_grad():
        assert torch.allclose(model(ids, cache=KNNMemory(model, layer=1)), plain, atol=1e-6)


NAME, CITY, ASK_NAME, ASK_CITY = 8, 16, 24, 25  # tokens 0..7 are filler


def conversations(gen, b, local_frac):
    """Two calls per row. A name (8..15) and a city (16..23) are stated among filler in the first half of one
    call; the second half of call 2 asks for both (ASK_NAME, ASK_CITY; the targets there are the answers).
    With probability local_frac the facts are stated in call 2 itself (local attention can answer: this is what
    teaches the layer's q/k/v, as the store is not differentiable), otherwise only in call 1, an earlier call."""
    rows = torch.arange(b)
    first, second = torch.randint(0, 8, (b, 16), generator=gen), torch.randint(0, 8, (b, 16), generator=gen)
    name, city = NAME + torch.randint(0, 8, (b,), generator=gen), CITY + torch.randint(0, 8, (b,), generator=gen)
    local = (torch.rand(b, generator=gen) < local_frac)[:, None]
    stated = torch.where(local, second, first)
    at = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(b)])
    stated[rows, at[:, 0]], stated[rows, at[:, 1]] = name, city
    first, second = torch.where(local, first, stated), torch.where(local, stated, second)
    asked = 8 + torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(b)])
    second[rows, asked[:, 0]], second[rows, asked[:, 1]] = ASK_NAME, ASK_CITY
    targets = torch.full_like(second, -100)
    targets[rows, asked[:, 0]], targets[rows, asked[:, 1]] = name, city
    return first, second, targets


def test_a_fact_from_an_earlier_call_is_recalled_with_memory_not_without(tmp_path):
    def recall(gate):
        model = tiny(gate=gate, n_layers=1, n_heads=2, n_kv_heads=2).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(80):
            first, second, targets = conversations(gen, 16, local_frac=0.5)
            memory = KNNMemory(model, layer=0, capacity=64, top_k=8)
            model(first, cache=memory)
            loss = F.cross_entropy(model(second, cache=memory).flatten(0, 1), targets.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        first, second, targets = conversations(gen, 128, local_frac=0.0)  # every fact only in the earlier call
        with torch.no_grad():
            memory = KNNMemory(model, layer=0, capacity=64, top_k=8)
            model(first, cache=memory)
            memory.save(tmp_path / f"mem{gate}")  # the earlier conversation ends; a later one loads the memory
            logits = model(second, cache=KNNMemory.load(tmp_path / f"mem{gate}", model))
        asked = targets != -100
        return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()

    with_memory, without = recall(0.0), recall(float("-inf"))
    # measured: 0.89 vs 0.14 (chance 1/8); seeds 0-3 give 0.88-1.00 with memory, 0.12-0.16 without
    assert with_memory > 0.75 and without < 0.3, (with_memory, without)


def test_save_load_round_trip_and_another_models_memory_is_refused(tmp_path):
    model = tiny()
    memory = KNNMemory(model, layer=1, capacity=20, top_k=3)
    ids = torch.randint(0, 32, (1, 8))
    with torch.no_grad():
        knn_forward(model, torch.randint(0, 32, (1, 24)), seg_len=8, memory=memory)  # 24 pairs, 20 kept
        assert len(memory) == 20
        memory.save(tmp_path / "m")
        loaded = KNNMemory.load(tmp_path / "m", model)
        assert (loaded.layer, loaded.top_k, loaded.store.capacity, len(loaded)) == (1, 3, 20, 20)
        assert torch.equal(loaded.store.keys, memory.store.keys) and torch.equal(loaded.store.values, memory.store.values)
        assert torch.equal(model(ids, cache=loaded), model(ids, cache=memory))
    # another model: the same config with other weights, or another config
    with pytest.raises(LmstackError, match="another model"):
        KNNMemory.load(tmp_path / "m", tiny(seed=1))
    with pytest.raises(LmstackError, match="another model"):
        KNNMemory.load(tmp_path / "m", tiny(d_model=64))
    with pytest.raises(LmstackError, match="not found"):
        KNNMemory.load(tmp_path / "nothing", model)
    (tmp_path / "m" / "knn_memory.safetensors").write_bytes(b"garbage")
    with pytest.raises(LmstackError, match="not a readable safetensors"):
        KNNMemory.load(tmp_path / "m", model)
    # the gate round-trips too
    with torch.no_grad():
        model.knn_gate.logit.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    save_knn_gate(model, tmp_path / "gate.safetensors")
    other = tiny()
    load_knn_gate(other, tmp_path / "gate.safetensors")
    assert torch.equal(other.knn_gate.logit, model.knn_gate.logit)
    with pytest.raises(LmstackError, match="kNN gate for 2 heads"):
        load_knn_gate(tiny(n_heads=2, n_kv_heads=2), tmp_path / "gate.safetensors")


def test_the_model_and_its_gate_and_memory_survive_save_model_and_load_model(tmp_path):
    model = tiny(gate=1.5)
    memory = KNNMemory(model, layer=1, top_k=4)
    ids = torch.randint(0, 32, (1, 8))
    with torch.no_grad():
        model(torch.randint(0, 32, (1, 16)), cache=memory)
        memory.save(tmp_path / "mem")  # before the next call adds its own pairs
        want = model(ids, cache=memory)
    save_knn_gate(model, tmp_path / "gate.safetensors")
    gate = detach_knn_gate(model)
    assert not hasattr(model, "knn_gate") and float(gate.logit.detach()[0]) == 1.5
    lmstack.save_model(model, tmp_path / "model")
    loaded = lmstack.load_model(tmp_path / "model").eval()
    load_knn_gate(loaded, tmp_path / "gate.safetensors")
    with torch.no_grad():
        got = loaded(ids, cache=KNNMemory.load(tmp_path / "mem", loaded))
    assert torch.allclose(got, want, atol=1e-6)


def test_the_store_is_detached_and_the_memory_path_trains_w_q_and_the_gate():
    model = tiny().train()
    memory = KNNMemory(model, layer=1, capacity=64, top_k=4)
    model(torch.randint(0, 32, (1, 8)), cache=memory)
    assert not memory.store.keys.requires_grad and not memory.store.values.requires_grad
    model(torch.randint(0, 32, (1, 8)), cache=memory).square().mean().backward()
    assert model.knn_gate.logit.grad.abs().min() > 0
    assert model.blocks[1].attn.q_proj.weight.grad.abs().max() > 0


def test_bad_input_names_the_problem():
    model = tiny()
    with pytest.raises(LmstackError, match="layer must be in 0..1"):
        KNNMemory(model, layer=2)
    with pytest.raises(LmstackError, match="top_k must be >= 1"):
        KNNMemory(model, layer=0, top_k=0)
    with pytest.raises(LmstackError, match="capacity must be >= 1"):
        KNNMemory(model, layer=0, capacity=0)
    with pytest.raises(LmstackError, match="unknown kNN memory backend 'annoy'"):
        KNNMemory(model, layer=0, backend="annoy")
    with pytest.raises(LmstackError, match="attach_knn_gate"):
        KNNMemory(Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2)), layer=0)
    with pytest.raises(LmstackError, match="empty"):
        KNNStore(4).search(torch.randn(1, 2, 1, 8), 1)
    memory = KNNMemory(model, layer=0)
    with pytest.raises(LmstackError, match="doc_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=memory, doc_ids=torch.zeros(1, 4, dtype=torch.long))
    model(torch.zeros(2, 4, dtype=torch.long), cache=memory)
    with pytest.raises(LmstackError, match="memory.reset"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=memory)
    memory.reset()
    assert len(memory) == 0
    with pytest.raises(LmstackError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long), cache=memory)
    with pytest.raises(LmstackError, match="targets must have the shape"):
        knn_forward(model, torch.zeros(1, 8, dtype=torch.long), 4, memory, targets=torch.zeros(1, 7, dtype=torch.long))
