"""Transformer.forward(inputs_embeds=...) and layer_hook: the VLM's entry points into the one Transformer."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"position": "learned", "scale_embeddings": True}])
def test_embeds_equal_ids(kw):
    model = _model(**kw)
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    got = model(inputs_embeds=model.tok_emb(ids))
    assert torch.allclose(ref, got, atol=1e-6)
    out = model(inputs_embeds=model.tok_emb(ids), labels=ids)  # the HF-style call takes embeds too
    assert torch.allclose(out.logits, ref, atol=1e-6) and out.loss is not None


def test_embeds_prefill_then_decode_with_cache():
    model = _model()
    ids = torch.randint(0, 50, (1, 9))
    cache = model.new_cache(batch_size=1, max_len=16)
    model(inputs_embeds=model.tok_emb(ids[:, :8]), cache=cache)
    step = model(ids[:, 8:], cache=cache)[0, -1]
    assert torch.allclose(step, model(ids)[0, -1], atol=1e-5)


def test_layer_hook_runs_before_each_block():
    model = _model()
    ids = torch.randint(0, 50, (1, 5))
    seen = []

    def hook(layer, x):
        seen.append(layer)
        return x

    assert torch.allclose(model(ids, layer_hook=hook), model(ids))
    assert seen == [0, 1]
    shifted = model(ids, layer_hook=lambda layer, x: x + 1.0 if layer == 1 else x)
    assert not torch.allclose(shifted, model(ids))


def test_bad_inputs_are_named():
    model = _model()
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(LmstackError, match="pass the input once"):
        model(ids, inputs_embeds=model.tok_emb(ids))
    with pytest.raises(LmstackError, match="d_model=32"):
        model(inputs_embeds=torch.zeros(1, 5, 16))
