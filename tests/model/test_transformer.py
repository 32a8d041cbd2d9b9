import pytest
import torch

from lmstack.model import ModelConfig, Transformer, preset
from lmstack.model.counting import model_stats


def test_cross_layer_sharing_cuts_parameters_as_computed():
    full = Transformer(ModelConfig(n_layers=6))
    shared = Transformer(ModelConfig(n_layers=6, n_unique_layers=2))
    per_block = sum(p.numel() for p in full.blocks[0].parameters())
    assert full.num_parameters() - shared.num_parameters() == 4 * per_block
    assert model_stats(shared.config).total_params == shared.num_parameters()
    x = torch.randint(0, 512, (1, 8))
    assert shared(x).shape == (1, 8, 512)


def test_switches_change_the_function():
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 16))
    base = Transformer(ModelConfig())
    state = base.state_dict()
    outs = {}
    for name, kw in {"parallel": dict(parallel_residual=True), "post": dict(norm_position="post"),
                     "window": dict(sliding_window=3), "softcap": dict(attn_backend="naive", attn_logit_softcap=0.01),
                     "final_softcap": dict(final_logit_softcap=1.0)}.items():
        m = Transformer(ModelConfig(**kw))
        m.load_state_dict(state, strict=False)
        outs[name] = m(x)
    ref = base(x)
    for name, out in outs.items():
        assert (out - ref).abs().max() > 1e-4, name


@pytest.mark.parametrize("mlp", ["gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu"])
def test_every_mlp_kind_runs_and_differs(mlp):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(mlp=mlp, n_layers=1))
    assert (m.blocks[0].mlp.gate_proj is not None) == (mlp in ("swiglu", "geglu"))
    assert torch.isfinite(m(torch.randint(0, 512, (1, 5)))).all()


def test_tied_embeddings_share_one_matrix():
    m = Transformer(ModelConfig(tie_embeddings=True))
    assert m.lm_head is None
    untied = Transformer(ModelConfig())
    assert untied.num_parameters() - m.num_parameters() == 512 * 64


def test_doc_ids_stop_attention_across_documents():
    m = Transformer(ModelConfig()).eval()
    x = torch.randint(0, 512, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    y = x.clone()
    y[0, :5] = torch.randint(0, 512, (5,))  # change only document 0
    a, b = m(x, doc_ids=docs), m(y, doc_ids=docs)
    assert (a[0, 5:] - b[0, 5:]).abs().max() < 1e-6
    assert (m(x)[0, 5:] - m(y)[0, 5:]).abs().max() > 1e-4  # without doc_ids document 1 sees document 0


def test_bidirectional_encoder_sees_the_future():
    enc = Transformer(preset("bert-tiny")).eval()
    x = torch.randint(0, 512, (1, 10))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 512
    assert (enc(x)[0, 0] - enc(y)[0, 0]).abs().max() > 1e-5
    dec = Transformer(preset("llama-tiny")).eval()
    assert (dec(x)[0, :-1] - dec(y)[0, :-1]).abs().max() < 1e-6


def test_padding_mask_hides_padded_keys_in_encoder():
    enc = Transformer(preset("bert-tiny")).eval()
    x = torch.randint(0, 512, (1, 8))
    y = x.clone()
    y[0, 6:] = 0
    mask = torch.tensor([[1] * 6 + [0] * 2])
    assert (enc(x, attention_mask=mask)[0, :6] - enc(y, attention_mask=mask)[0, :6]).abs().max() < 1e-5


def test_init_schemes_scale_residual_outputs():
    g = Transformer(ModelConfig(n_layers=8, init="gpt2", d_model=256, n_heads=4))
    n = Transformer(ModelConfig(n_layers=8, init="normal", d_model=256, n_heads=4))
    s = Transformer(ModelConfig(n_layers=8, init="small", d_model=256, n_heads=4))
    std = lambda m, name: float(dict(m.named_parameters())[name].detach().std())
    assert abs(std(n, "blocks.0.attn.o_proj.weight") - 0.02) < 0.002
    assert abs(std(g, "blocks.0.attn.o_proj.weight") - 0.02 / 4) < 0.001
    assert abs(std(s, "blocks.0.attn.q_proj.weight") - (2 / (5 * 256)) ** 0.5) < 0.003


def test_dropout_only_in_training_and_checkpointing_keeps_gradients():
    m = Transformer(ModelConfig(dropout=0.5))
    x = torch.randint(0, 512, (2, 8))
    m.train()
    assert (m(x) - m(x)).abs().max() > 0
    m.eval()
    assert torch.equal(m(x), m(x))
    ref = Transformer(ModelConfig())
    ckpt = Transformer(ModelConfig())
    ckpt.load_state_dict(ref.state_dict())
    ckpt.checkpoint_blocks = True
    ref(x).sum().backward()
    ckpt(x).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n


def test_mlm_head_and_hidden_states():
    m = Transformer(preset("bert-tiny", head="mlm"))
    x = torch.randint(0, 512, (1, 6))
    assert m(x).shape == (1, 6, 512) and m(x, return_hidden=True).shape == (1, 6, 64)
    assert Transformer(preset("bert-tiny"))(x).shape == (1, 6, 64)


def test_bad_input_shape_is_named():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="shape"):
        Transformer(ModelConfig())(torch.zeros(5, dtype=torch.long))


def test_prefix_lm_prefix_is_bidirectional_suffix_causal():
    m = Transformer(ModelConfig()).eval()
    x = torch.randint(0, 512, (2, 10))
    prefix = torch.tensor([4, 0])
    y = x.clone()
    y[:, 3] = (x[:, 3] + 1) % 512  # change a token inside row 0's prefix
    a, b = m(x, prefix_len=prefix), m(y, prefix_len=prefix)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-5  # row 0: position 0 sees position 3 (prefix is bidirectional)
    assert (a[1, :3] - b[1, :3]).abs().max() < 1e-6  # row 1 has no prefix: plain causal
    z = x.clone()
    z[:, 7] = (x[:, 7] + 1) % 512  # a suffix token never leaks backwards
    assert (m(z, prefix_len=prefix)[0, :7] - a[0, :7]).abs().max() < 1e-6
