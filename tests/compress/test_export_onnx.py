"""ONNX export: onnxruntime's logits equal ours at several sequence lengths and batch sizes, for the full-sequence
graph and the decoder with past key/values (greedy tokens too), refusals, and the
message when the onnx package is missing."""
import importlib.util

import numpy as np
import pytest
import torch

from lmstack.compress.export_onnx import export_onnx
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.reference_decode import reference_decode
from lmstack.model.transformer import Transformer

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install onnx onnxruntime")
pytest.importorskip("onnx", reason="onnx is not installed: pip install onnx onnxruntime")


def _save(tmp_path, **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  hf_model_type="llama")
    fields.update(overrides)
    return save_model(Transformer(ModelConfig(**fields)).eval(), tmp_path / "m")


@pytest.mark.parametrize("overrides", [
    dict(),  # llama: RoPE, RMSNorm, SwiGLU, GQA
    dict(qkv_bias=True, tie_embeddings=True, hf_model_type="qwen2"),
    dict(position="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
         tie_embeddings=True, n_kv_heads=4, hf_model_type="gpt2"),
    dict(position="alibi", hf_model_type=""),
    dict(sliding_window=8, real_vocab_size=290, hf_model_type=""),
])
def test_onnxruntime_logits_equal_ours(tmp_path, overrides):
    model_dir = _save(tmp_path, **overrides)
    info = export_onnx(model_dir, tmp_path / "m.onnx")
    assert info["past_key_values"] is False and info["bytes"] == (tmp_path / "m.onnx").stat().st_size
    model = load_model(model_dir)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (3, 23), (2, 64)):  # neither is the (2, 8) example the graph was traced with
        ids = torch.randint(0, 290, shape)
        (got,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            want = model(ids).numpy()
        assert got.shape == want.shape
        finite = np.isfinite(want)  # padded vocabulary rows are -inf in both
        assert (np.isfinite(got) == finite).all()
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_experts=4, moe_top_k=2, hf_model_type=""), "n_experts"),
    (dict(attention="performer", hf_model_type=""), "attention"),
    (dict(sparse_pattern="bigbird", sliding_window=8, sparse_random_blocks=1, attn_block_size=8, hf_model_type=""),
     "sparse_pattern"),
])
def test_refuses_what_the_trace_cannot_carry(tmp_path, overrides, field):
    model_dir = _save(tmp_path, **overrides)
    with pytest.raises(LmstackError, match=rf"ONNX export cannot carry {field}="):
        export_onnx(model_dir, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_is_a_clear_error(tmp_path, monkeypatch):
    model_dir = _save(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(LmstackError, match=r"needs the onnx package, which is not installed: pip install onnx "
                                           r"onnxruntime"):
        export_onnx(model_dir, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(qkv_bias=True, tie_embeddings=True, real_vocab_size=290, hf_model_type="qwen2"),
    dict(n_kv_heads=1, fused_projections=True, hf_model_type="llama"),
])
def test_decoder_with_past_key_values_matches_ours(tmp_path, overrides):
    model_dir = _save(tmp_path, **overrides)
    info = export_onnx(model_dir, tmp_path / "kv.onnx", past_key_values=True)
    assert info["inputs"] == ["input_ids", "past_keys", "past_values"] and info["past_key_values"] is True
    model = load_model(model_dir)
    cfg = model.config
    session = ort.InferenceSession(str(tmp_path / "kv.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 290, (2, 13))
    with torch.no_grad():
        want = model(ids).numpy()
    empty = np.zeros((cfg.n_layers, 2, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    logits, keys, values = session.run(None, {"input_ids": ids[:, :6].numpy(), "past_keys": empty,
                                              "past_values": empty})
    got = [logits]
    for i in range(6, 13):  # then one token at a time on the presents
        logits, keys, values = session.run(None, {"input_ids": ids[:, i:i + 1].numpy(), "past_keys": keys,
                                                  "past_values": values})
        got.append(logits)
    assert keys.shape == (cfg.n_layers, 2, cfg.n_kv_heads, 13, cfg.head_dim)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4, rtol=0)
    # greedy decoding through the graph gives our reference decode's tokens
    prompt = ids[:1, :4]
    ours = reference_decode(model, prompt, 16)[0, 4:].tolist()
    empty1 = empty[:, :1]
    logits, keys, values = session.run(None, {"input_ids": prompt.numpy(), "past_keys": empty1,
                                              "past_values": empty1})
    theirs = []
    for _ in range(16):
        theirs.append(int(logits[0, -1].argmax()))
        logits, keys, values = session.run(None, {"input_ids": np.array([[theirs[-1]]]), "past_keys": keys,
                                                  "past_values": values})
    assert theirs == ours


@pytest.mark.parametrize("overrides,field", [
    (dict(sliding_window=8, hf_model_type=""), "sliding_window"),
    (dict(position="learned", hf_model_type=""), "position"),
    (dict(norm_position="post", hf_model_type=""), "norm_position"),
])
def test_decoder_refuses_what_it_does_not_compute(tmp_path, overrides, field):
    model_dir = _save(tmp_path, **overrides)
    with pytest.raises(LmstackError, match=rf"ONNX decoder with past key/values cannot carry {field}="):
        export_onnx(model_dir, tmp_path / "kv.onnx", past_key_values=True)
    assert not (tmp_path / "kv.onnx").exists()
