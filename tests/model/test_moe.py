import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.counting import model_stats
from lmstack.model.moe import MoE


def test_each_token_runs_exactly_top_k_experts():
    cfg = ModelConfig(d_model=32, n_heads=2, n_experts=6, moe_top_k=2)
    moe = MoE(cfg)
    calls = []
    real = moe.expert
    moe.expert = lambda e, x: calls.append((e, x.shape[0])) or real(e, x)
    x = torch.randn(3, 10, 32)
    moe(x)
    assert sum(n for _, n in calls) == 30 * 2 == int(moe.last_counts.sum())
    assert len({e for e, _ in calls}) == int((moe.last_counts > 0).sum())


def test_moe_output_matches_dense_mixture_of_chosen_experts():
    cfg = ModelConfig(d_model=16, n_heads=2, n_experts=4, moe_top_k=2, mlp="gelu")
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.w_in)
    torch.nn.init.normal_(moe.w_out)
    x = torch.randn(5, 16)
    _, w, idx = moe.route(x)
    expected = torch.stack([sum(w[t, s] * moe.expert(int(idx[t, s]), x[t:t + 1])[0] for s in range(2)) for t in range(5)])
    assert (moe(x) - expected).abs().max() < 1e-5
    assert torch.allclose(w.sum(-1), torch.ones(5))  # renormalised top-k weights


def test_aux_loss_is_minimal_for_uniform_routing():
    cfg = ModelConfig(d_model=8, n_heads=2, n_experts=4, moe_top_k=1, router_aux_loss_coef=1.0)
    moe = MoE(cfg)
    n = 400
    uniform_logits = torch.zeros(n, 4)
    uniform_counts = torch.full((4,), n // 4)
    skewed_logits = torch.zeros(n, 4)
    skewed_logits[:, 0] = 3.0
    skewed_counts = torch.tensor([n, 0, 0, 0])
    assert abs(float(moe._aux_loss(uniform_logits, uniform_counts)) - 1.0) < 1e-6
    assert float(moe._aux_loss(skewed_logits, skewed_counts)) > 2.0
    z = MoE(ModelConfig(d_model=8, n_heads=2, n_experts=4, router_aux_loss_coef=0, router_z_loss_coef=1.0))
    assert float(z._aux_loss(skewed_logits, skewed_counts)) > float(z._aux_loss(uniform_logits, uniform_counts))


def test_hybrid_dense_and_moe_layers_and_active_params():
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=4, n_experts=8, moe_top_k=2, moe_layers=[1, 3],
                      n_shared_experts=1)
    model = Transformer(cfg)
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    stats = model_stats(cfg)
    assert stats.total_params == model.num_parameters()
    expert = 3 * 32 * cfg.moe_d_ff
    assert stats.total_params - stats.active_params == 2 * (8 - 2) * expert  # two MoE layers, 6 idle experts
    x = torch.randint(0, 512, (2, 12))
    model(x)
    assert model.aux_loss > 0 and model.aux_loss.requires_grad


def _moe(**kw):
    cfg = ModelConfig(d_model=16, n_heads=2, n_experts=4, moe_top_k=2, **kw)
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.w_in, std=0.3)
    torch.nn.init.normal_(moe.w_out, std=0.3)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    return moe.double()  # fp64: grouped and loop sum in different orders; compare the math, not fp32 rounding


def _run(moe, x, dispatch):
    moe.dispatch = dispatch
    x = x.clone().requires_grad_(True)
    moe.zero_grad()
    y = moe(x)
    y.square().sum().backward()
    return y.detach(), x.grad, moe.w_in.grad.clone(), int(moe.last_dropped)


def test_grouped_dispatch_equals_per_token_loop_forward_and_backward():
    moe = _moe()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    g, lp = _run(moe, x, "grouped"), _run(moe, x, "loop")
    for a, b in zip(g[:3], lp[:3]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    assert g[3] == lp[3] == 0


def test_grouped_dispatch_runs_one_matmul_per_expert_in_sorted_slices():
    moe = _moe()
    calls = []
    real = moe.expert
    moe.expert = lambda e, x: calls.append((e, x.shape[0])) or real(e, x)
    moe(torch.randn(40, 16, dtype=torch.float64))
    assert [e for e, _ in calls] == sorted(e for e, _ in calls)  # expert order, each once
    assert len(calls) == int((moe.last_counts > 0).sum())
    assert [n for _, n in calls] == [int(c) for c in moe.last_counts if c > 0]


def test_capacity_drops_are_counted_and_match_the_loop():
    moe = _moe(moe_capacity_factor=0.5)
    x = torch.randn(64, 16, dtype=torch.float64)
    g, lp = _run(moe, x, "grouped"), _run(moe, x, "loop")
    cap = moe.capacity(64)
    assert cap == 16  # ceil(0.5 * 64 * 2 / 4)
    expected = int((moe.last_counts - cap).clamp(min=0).sum())
    assert g[3] == lp[3] == expected > 0
    for a, b in zip(g[:3], lp[:3]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_ample_capacity_is_exact():
    x = torch.randn(50, 16, dtype=torch.float64)
    free, capped = _moe(), _moe(moe_capacity_factor=float(4))  # 4x the mean load: no expert overflows
    y0, y1 = free(x), capped(x)
    assert capped.last_dropped == 0 and torch.equal(y0, y1)


def test_engine_decodes_moe_model_with_grouped_dispatch_like_the_loop():
    from lmstack.infer import LLM, SamplingParams

    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=2, n_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for dispatch in ("grouped", "loop"):
        for b in model.blocks:
            b.mlp.dispatch = dispatch
        outs[dispatch] = LLM(model, max_num_seqs=2).generate([[1, 2, 3], [4, 5]], params)
    assert [o.outputs[0].token_ids for o in outs["grouped"]] == [o.outputs[0].token_ids for o in outs["loop"]]
    assert len(outs["grouped"][0].outputs[0].token_ids) == 8
