"""model/linear.py: the skinny kernel runs only inside decode_kernels(), covers every projection and the LM head
of a decode step, leaves training and plain forwards bitwise unchanged, and the engine's runner switches it on."""
import threading

import pytest
import torch
import torch.nn.functional as F

from lmstack.infer import LLM, SamplingParams
from lmstack.kernels import build
from lmstack.model import ModelConfig, Transformer
from lmstack.model import linear as linear_mod
from lmstack.model.linear import Linear, decode_kernels


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that reach skinny_linear (through Linear and linear())."""
    calls = []
    real = linear_mod.skinny_linear

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return real(x, w, b)
    monkeypatch.setattr(linear_mod, "skinny_linear", spy)
    return calls


def test_outside_the_scope_linear_is_f_linear_bitwise(counted):
    lin = Linear(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert counted == []


@pytest.mark.parametrize("tied", [True, False])
def test_every_projection_and_the_head_go_through_the_kernel_inside_the_scope(counted, tied):
    model = tiny(tie_embeddings=tied)
    ids = torch.randint(0, 97, (1, 5))
    with torch.inference_mode():
        want = model(ids)
        assert counted == []
        with decode_kernels():
            got = model(ids)
    # per layer: q, k, v, o, gate, up, down; plus the head (tied: the embedding matrix)
    assert len(counted) == 2 * 7 + 1
    assert counted[-1] == (97, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_scope_is_restored_and_per_thread(counted):
    seen = []
    with decode_kernels():
        t = threading.Thread(target=lambda: seen.append(getattr(linear_mod._scope, "on", False)))
        t.start()
        t.join()
        with pytest.raises(RuntimeError):
            with decode_kernels(False):
                assert not linear_mod._scope.on
                raise RuntimeError("boom")
        assert linear_mod._scope.on
    assert seen == [False]
    assert not getattr(linear_mod._scope, "on", False)


def test_training_inside_the_scope_keeps_autograd():
    lin = Linear(16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    with decode_kernels():
        lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, 16))


def test_the_engine_decodes_through_the_kernel(counted):
    if not build.enabled() or build.extension() is None:
        pytest.skip(f"skinny kernel not buildable here: {build.info()['error']}")
    model = tiny()
    llm = LLM(model, num_blocks=16, block_size=8)
    assert llm.engine.runner.kernels
    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0].token_ids
    assert len(counted) > 0
    # the same greedy tokens as the model's own forward without the kernel
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
