"""GGUF export: every tensor and metadata key read back by gguf.GGUFReader, the tokenizer embedded, the RoPE row
order llama.cpp expects, refusals, and (slow) llama.cpp's greedy tokens against ours."""
import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmstack.compress.export_gguf import export_gguf, gguf_tensors, rope_pairs_adjacent
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.reference_decode import reference_decode
from lmstack.model.transformer import Transformer
from lmstack.tokenizer.train import train_tokenizer

TEXTS = ["the cat sat on the mat and the dog ran to the park " * 20, "hello there, how are you today? 12 345"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts=TEXTS, type="bpe", vocab_size=300, show_progress=False)


def _save(tmp_path, tok, name="m", seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    fields = dict(vocab_size=320, real_vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=128, hf_model_type="llama", init_std=0.2)
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields)).eval()
    return save_model(model, tmp_path / name, tokenizer=tok)


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        h.update(str(f.relative_to(d)).encode() + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


@pytest.mark.parametrize("tied,arch", [(False, "llama"), (True, "llama"), (False, "qwen2")])
def test_f32_tensors_read_back_equal(tmp_path, tok, tied, arch):
    model_dir = _save(tmp_path, tok, tie_embeddings=tied, qkv_bias=arch == "qwen2",
                      hf_model_type="qwen2" if arch == "qwen2" else "llama")
    info = export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert info["architecture"] == arch
    model = load_model(model_dir)
    want = gguf_tensors(model.config, model.state_dict(), arch)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    assert ("output.weight" in got) == (not tied)
    n_real = tok.vocab_size
    assert tuple(got["token_embd.weight"].data.shape) == (n_real, 64)  # padding rows (320 - real) are not written
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t.data), want[name].numpy(), err_msg=name)
    # q/k rows are reordered for llama only; everything else is our tensor as it is
    state = model.state_dict()
    q = state["blocks.1.attn.q_proj.weight"].numpy()
    k = state["blocks.0.attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(got["blk.0.attn_v.weight"].data), state["blocks.0.attn.v_proj.weight"])
    if arch == "llama":
        assert not np.array_equal(np.asarray(got["blk.1.attn_q.weight"].data), q)
    else:
        np.testing.assert_array_equal(np.asarray(got["blk.1.attn_q.weight"].data), q)
        np.testing.assert_array_equal(np.asarray(got["blk.0.attn_k.weight"].data), k)
        np.testing.assert_array_equal(np.asarray(got["blk.0.attn_q.bias"].data), state["blocks.0.attn.q_proj.bias"])


def _rope_half(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    cos, sin = torch.cat((ang.cos(), ang.cos())), torch.cat((ang.sin(), ang.sin()))
    return x * cos + torch.cat((-x[d // 2:], x[:d // 2])) * sin


def _rope_adjacent(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_rope_row_order_gives_llama_cpp_the_same_scores():
    # llama.cpp's llama rotates adjacent pairs; ours (HF) rotates halves. After the row reorder, every head's
    # q.k score at any pair of positions must be what our layout gives.
    torch.manual_seed(0)
    heads, hd, d = 2, 8, 16
    wq, wk = torch.randn(heads * hd, d, dtype=torch.float64), torch.randn(heads * hd, d, dtype=torch.float64)
    wq2, wk2 = rope_pairs_adjacent(wq, heads), rope_pairs_adjacent(wk, heads)
    x, y = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        for pq, pk in ((5, 2), (17, 0), (3, 3)):
            ours = _rope_half(wq[rows] @ x, pq) @ _rope_half(wk[rows] @ y, pk)
            theirs = _rope_adjacent(wq2[rows] @ x, pq) @ _rope_adjacent(wk2[rows] @ y, pk)
            assert torch.allclose(ours, theirs, atol=1e-10), (h, pq, pk)
            # without the reorder the scores differ (at distinct positions): the test can fail
            assert pq == pk or not torch.allclose(ours, _rope_adjacent(wq[rows] @ x, pq) @ _rope_adjacent(wk[rows] @ y, pk))


def test_metadata_read_back_exactly(tmp_path, tok):
    model_dir = _save(tmp_path, tok, rope_theta=50000.0, norm_eps=1e-6, d_ff=96)
    export_gguf(model_dir, tmp_path / "m.gguf", "q8_0")
    fields = _fields(tmp_path / "m.gguf")
    tokens, types, merges = (fields.pop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                      "tokenizer.ggml.merges"))
    assert fields.pop("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6, rel=1e-6)  # stored f32
    assert fields == {
        "general.architecture": "llama", "general.name": "m", "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.rope.freq_base": 50000.0,
        "llama.rope.dimension_count": 16, "llama.vocab_size": tok.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": True,
    }
    # the tokenizer round-trips: every id's token, special tokens typed CONTROL, the merges in rank order
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert merges == [" ".join(m) for m in tok.spec["model"]["merges"]]
    assert len(merges) > 0
    specials = tok.special_ids
    assert [t == gguf.TokenType.CONTROL for t in types] == [i in specials for i in range(tok.vocab_size)]
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in specials)


def test_unused_ids_below_the_real_vocabulary_are_pad_tokens(tmp_path, tok):
    model_dir = _save(tmp_path, tok, vocab_size=320, real_vocab_size=tok.vocab_size + 5)
    export_gguf(model_dir, tmp_path / "m.gguf")
    fields = _fields(tmp_path / "m.gguf")
    n = tok.vocab_size
    assert fields["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert fields["tokenizer.ggml.token_type"][n:] == [gguf.TokenType.UNUSED] * 5
    assert fields["llama.vocab_size"] == n + 5


@pytest.mark.parametrize("kind,qtype,tol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 0.02), ("q4_0", "Q4_0", 0.2)])
def test_quantized_types_shapes_and_values(tmp_path, tok, kind, qtype, tol):
    # d_ff=48: ffn_down's rows are 48 long, not a multiple of the 32-wide quant blocks -> stored f16
    model_dir = _save(tmp_path, tok, d_ff=48)
    info = export_gguf(model_dir, tmp_path / "m.gguf", kind)
    model = load_model(model_dir)
    want = gguf_tensors(model.config, model.state_dict(), "llama")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.name for t in reader.tensors} == set(want)
    for t in reader.tensors:
        w = want[t.name].numpy()
        expect = ("F32" if w.ndim == 1 else "F16" if w.shape[-1] % 32 and kind != "f16" else qtype)
        assert t.tensor_type.name == expect, t.name
        assert [int(s) for s in t.shape] == list(reversed(w.shape)), t.name  # GGUF lists ne0 (row length) first
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        err = np.abs(back - w).max() / np.abs(w).max()
        assert err <= tol, (t.name, err)
    assert info["tensor_types"][qtype] == 7 * 2 + 2 - (2 if kind != "f16" else 0)  # ffn_down x2 fell back to f16


@pytest.mark.parametrize("overrides,field", [
    (dict(position="alibi"), "position"),
    (dict(position="learned"), "position"),
    (dict(n_experts=4, moe_top_k=2), "n_experts"),
    (dict(attn_logit_softcap=30.0, attn_backend="naive"), "attn_logit_softcap"),
    (dict(mlp="gelu"), "mlp"),
    (dict(parallel_residual=True), "parallel_residual"),
    (dict(norm="layernorm"), "norm"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(rope_scaling="yarn", rope_factor=2.0), "rope_scaling"),
])
def test_refuses_what_gguf_cannot_carry(tmp_path, tok, overrides, field):
    model_dir = _save(tmp_path, tok, hf_model_type="", **overrides)
    before = _tree_digest(model_dir)
    with pytest.raises(LmstackError, match=rf"GGUF export cannot carry {field}="):
        export_gguf(model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert _tree_digest(model_dir) == before


def test_bad_input_messages(tmp_path, tok):
    model_dir = _save(tmp_path, tok)
    with pytest.raises(LmstackError, match="inside the model directory"):
        export_gguf(model_dir, model_dir / "m.gguf")
    with pytest.raises(LmstackError, match="unknown --gguf-type 'q5_k'"):
        export_gguf(model_dir, tmp_path / "m.gguf", "q5_k")
    with pytest.raises(LmstackError, match="is a directory"):
        export_gguf(model_dir, tmp_path)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(LmstackError, match="has no tokenizer.json; GGUF embeds the tokenizer"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    small = train_tokenizer(texts=TEXTS, type="bpe", vocab_size=300, show_progress=False)
    no_room = _save(tmp_path, small, name="small", vocab_size=small.vocab_size - 10, real_vocab_size=None)
    with pytest.raises(LmstackError, match="the tokenizer does not fit the model"):
        export_gguf(no_room, tmp_path / "m.gguf")
    wordpiece = train_tokenizer(texts=TEXTS, type="wordpiece", vocab_size=200, show_progress=False)
    other = _save(tmp_path, wordpiece, name="wp", vocab_size=256, real_vocab_size=None)
    with pytest.raises(LmstackError, match="GGUF export embeds byte-level BPE tokenizers only; this tokenizer is "
                                           "'WordPiece'"):
        export_gguf(other, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_failed_write_leaves_no_file(tmp_path, tok, monkeypatch):
    model_dir = _save(tmp_path, tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"old")

    def broken(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model_dir, out / "m.gguf")
    assert [p.name for p in out.iterdir()] == ["m.gguf"]  # no temp file left behind
    assert (out / "m.gguf").read_bytes() == b"old"  # the previous file is whole


def _chain_model(tmp_path, tok, arch: str) -> tuple[Path, list[int], list[int]]:
    """A tiny llama trained (a few seconds) to follow a fixed random chain of ids: greedy margins are wide,
    so llama.cpp's f32 and q8_0 arithmetic lands on the same tokens as ours."""
    torch.manual_seed(0)
    n = tok.vocab_size
    cfg = ModelConfig(vocab_size=n, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      hf_model_type=arch, qkv_bias=arch == "qwen2")
    model = Transformer(cfg)
    nxt = torch.randperm(n)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        seq = [torch.randint(0, n, (16,))]
        for _ in range(32):
            seq.append(nxt[seq[-1]])
        x = torch.stack(seq, 1)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model_dir = save_model(model, tmp_path / arch, tokenizer=tok)
    prompt = [int(nxt[5]), int(nxt[nxt[5]])]
    ours = reference_decode(load_model(model_dir), torch.tensor([prompt]), 64)[0, len(prompt):].tolist()
    assert ours == [int(nxt[t]) for t in (prompt[-1:] + ours)[:-1]], "the chain was not learned"
    return model_dir, prompt, ours


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, tok, arch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "bash benchmarks/setup_llama_cpp.sh")
    model_dir, prompt, ours = _chain_model(tmp_path, tok, arch)
    got = {}
    for kind in ("f32", "q8_0"):
        export_gguf(model_dir, tmp_path / f"{kind}.gguf", kind)
        llm = llama_cpp.Llama(str(tmp_path / f"{kind}.gguf"), n_ctx=128, n_threads=1, verbose=False)
        tokens = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(t)
            if len(tokens) == 64:
                break
        got[kind] = tokens
    assert got["f32"] == ours
    assert got["q8_0"][:16] == ours[:16]
    # the embedded tokenizer: llama.cpp splits text into our ids (our "gpt4" regex is llama3's "llama-bpe")
    text = "the cat sat on the mat, 12 345 times"
    assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text)


def test_fused_projections_export_the_same_tensors(tmp_path, tok):
    plain = export_gguf(_save(tmp_path, tok, name="plain"), tmp_path / "plain.gguf")
    fused = export_gguf(_save(tmp_path, tok, name="fused", fused_projections=True), tmp_path / "fused.gguf")
    assert plain["tensors"] == fused["tensors"]
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "fused.gguf").tensors}
    assert a.keys() == b.keys() and "blk.0.attn_q.weight" in a and "blk.1.ffn_gate.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(rope_scaling="linear", rope_factor=4.0),
                                       dict(head_dim=32, tie_embeddings=True),
                                       dict(n_kv_heads=1, rope_theta=500.0)], ids=["linear-rope", "head-dim", "mqa"])
def test_llama_cpp_f32_follows_the_config_fields(tmp_path, tok, overrides):
    # random weights (init_std 0.2): f32 on both sides, so even small greedy margins agree
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "bash benchmarks/setup_llama_cpp.sh")
    model_dir = _save(tmp_path, tok, seed=1, vocab_size=tok.vocab_size, real_vocab_size=None, **overrides)
    prompt = [10, 20, 30]
    ours = reference_decode(load_model(model_dir), torch.tensor([prompt]), 64)[0, 3:].tolist()
    export_gguf(model_dir, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, verbose=False)
    tokens = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(t)
        if len(tokens) == 64:
            break
    assert tokens == ours
