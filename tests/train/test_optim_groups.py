"""Parameter groups: no weight decay for norms, biases and embeddings; exact layer-wise LR decay; which
tensors Muon takes; frozen tensors left out; groups the trainer adds work with every optimizer."""
import pytest
import torch
from torch import nn

from lmstack.model import Transformer, preset
from lmstack.train.optim import OPTIMIZERS, OptimizerConfig, build_optimizer, group_of


def _names(opt, **match):
    return [n for g in opt.param_groups if all(g.get(k) == v for k, v in match.items()) for n in g["names"]]


def test_norms_biases_embeddings_get_no_weight_decay():
    model = Transformer(preset("gpt2-tiny"))  # learned positions, LayerNorm with bias, biased linears, tied head
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    no_decay, decay = set(_names(opt, weight_decay=0.0)), set(_names(opt, weight_decay=0.1))
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "final_norm.bias",
            "blocks.0.attn_norm.weight", "blocks.1.mlp_norm.bias", "blocks.0.attn.q_proj.bias",
            "blocks.1.mlp.down_proj.bias"} <= no_decay
    assert decay == {f"blocks.{i}.{m}.weight" for i in range(2) for m in
                     ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert len(no_decay) + len(decay) == len(list(model.parameters()))  # every tensor once, tied ones too
    everything = build_optimizer(model, OptimizerConfig(weight_decay=0.1, no_decay_norms_biases_embeddings=False))
    assert all(g["weight_decay"] == 0.1 for g in everything.param_groups)


def test_bert_mlm_head_and_embedding_norm():
    model = Transformer(preset("bert-tiny", head="mlm"))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1, layer_lr_decay=0.5))
    assert group_of(opt, "mlm_bias")["weight_decay"] == 0.0
    assert group_of(opt, "mlm_dense.weight")["weight_decay"] == 0.1
    assert group_of(opt, "type_emb.weight")["weight_decay"] == 0.0
    # the embedding norm belongs to the embedding stage; the MLM transform to the head
    assert group_of(opt, "emb_norm.weight")["lr_scale"] == 0.25
    assert group_of(opt, "mlm_norm.weight")["lr_scale"] == 1.0


def test_layer_lr_decay_values_are_exact():
    model = Transformer(preset("llama-tiny", n_layers=3))
    lr, d = 1e-3, 0.5
    opt = build_optimizer(model, OptimizerConfig(lr=lr, layer_lr_decay=d))
    expect = {"blocks.0.attn.q_proj.weight": d**2, "blocks.1.mlp.down_proj.weight": d, "blocks.2.attn_norm.weight": 1.0,
              "tok_emb.weight": d**3, "final_norm.weight": 1.0, "lm_head.weight": 1.0}
    for name, scale in expect.items():
        g = group_of(opt, name)
        assert g["base_lr"] == lr * scale and g["lr"] == lr * scale, name
    assert group_of(opt, "blocks.0.attn_norm.weight")["base_lr"] == lr * d**2  # norms decay with their block
    plain = build_optimizer(model, OptimizerConfig(lr=lr))
    assert len(plain.param_groups) == 2 and all(g["base_lr"] == lr for g in plain.param_groups)


def test_layer_lr_decay_counts_unique_blocks_when_layers_are_shared():
    model = Transformer(preset("llama-tiny", n_layers=4, n_unique_layers=2))
    opt = build_optimizer(model, OptimizerConfig(lr=1.0, layer_lr_decay=0.5))
    assert group_of(opt, "blocks.0.attn.q_proj.weight")["base_lr"] == 0.5
    assert group_of(opt, "blocks.1.attn.q_proj.weight")["base_lr"] == 1.0
    assert group_of(opt, "tok_emb.weight")["base_lr"] == 0.25


def test_wrapper_prefixes_do_not_change_the_groups():
    class Wrapper(nn.Module):  # what DDP / torch.compile look like from named_parameters()
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    model = Transformer(preset("llama-tiny", n_layers=3))
    opt = build_optimizer(Wrapper(model), OptimizerConfig(lr=1.0, layer_lr_decay=0.5, name="muon"))
    assert group_of(opt, "module.blocks.0.mlp.up_proj.weight")["base_lr"] == OptimizerConfig().muon_lr * 0.25
    assert group_of(opt, "module.tok_emb.weight")["base_lr"] == 0.125


def test_muon_takes_block_matrices_and_experts_adamw_the_rest():
    model = Transformer(preset("mixtral-tiny"))
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1))
    muon, adam = set(_names(opt, use_muon=True)), set(_names(opt, use_muon=False))
    assert {"blocks.0.attn.q_proj.weight", "blocks.1.attn.o_proj.weight", "blocks.0.mlp.w_in",
            "blocks.1.mlp.w_out"} <= muon
    assert {"tok_emb.weight", "lm_head.weight", "final_norm.weight", "blocks.0.attn_norm.weight",
            "blocks.0.mlp.router.weight"} <= adam
    assert not muon & adam
    assert all(g["base_lr"] == 0.02 for g in opt.param_groups if g["use_muon"])
    assert all(g["base_lr"] == 3e-3 for g in opt.param_groups if not g["use_muon"])
    assert group_of(opt, "lm_head.weight")["weight_decay"] == 0.1
    assert group_of(opt, "blocks.0.mlp.w_in")["weight_decay"] == 0.0  # muon_weight_decay default


def test_frozen_parameters_are_left_out():
    model = Transformer(preset("llama-tiny"))
    model.tok_emb.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimizerConfig())
    names = _names(opt)
    assert "tok_emb.weight" not in names and "lm_head.weight" in names
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(Exception, match="no trainable parameters"):
        build_optimizer(model, OptimizerConfig())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_group_added_later_trains_and_round_trips(name):
    # the trainer adds the objective's own parameters as a plain group without names / use_muon
    model = Transformer(preset("llama-tiny", vocab_size=64))
    head = nn.Linear(64, 2)
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-3))
    opt.add_param_group({"params": list(head.parameters()), "lr": 1e-3, "base_lr": 1e-3, "weight_decay": 0.0})
    before = head.weight.detach().clone()
    x = torch.randint(0, 64, (2, 8))
    (model(x).mean() + head(model(x, return_hidden=True)).pow(2).mean()).backward()
    opt.step()
    assert not torch.equal(head.weight, before)
    opt.load_state_dict(opt.state_dict())
