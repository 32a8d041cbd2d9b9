"""Structured pruning (compress/prune_structured.py): sliced models compute exactly what the original computes with
the removed heads / channels zeroed or the removed blocks skipped; scores measure what they say; the pruned model
saves, loads and decodes as a plain model."""
import copy

import pytest
import torch

import lmstack
from lmstack.compress.calibration import collect_stats
from lmstack.compress.prune_structured import (channel_count, channel_scores, drop_layers, head_scores, head_shape,
                                               layer_scores, prune_structured, select_heads, slice_channels,
                                               slice_heads)
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=96, d_model=64, n_layers=3, n_heads=8, n_kv_heads=4, d_ff=80, max_seq_len=32, qk_norm=True)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def ids(n=6, t=24, vocab=96):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def zero_heads(model, keep):
    """A copy whose o_proj columns of every query head not in keep[i][0] are zero: those heads add nothing."""
    m = copy.deepcopy(model)
    d = m.config.head_dim
    for block, (q, _) in zip(m.blocks, keep):
        for h in range(m.config.n_heads):
            if h not in q:
                block.attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    return m


@pytest.mark.parametrize("kw,keep", [
    (dict(), [([0, 1, 4, 5], [0, 2])] * 3),                                   # GQA: whole K/V groups go
    (dict(), [([1, 2, 5, 7], [0, 1, 2, 3]), ([0, 3, 4, 6], [0, 1, 2, 3]), ([0, 2, 4, 6], [0, 1, 2, 3])]),  # a query per group
    (dict(n_kv_heads=8, qkv_bias=True, out_bias=True), [([0, 3, 6], [0, 3, 6]), ([1, 2, 7], [1, 2, 7]),
                                                         ([4, 5, 6], [4, 5, 6])]),  # MHA with biases
])
def test_sliced_heads_equal_the_original_with_those_heads_zeroed(kw, keep):
    model = tiny(**kw)
    small = slice_heads(model, keep)
    q, kv = len(keep[0][0]), len(keep[0][1])
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.head_dim) == (q, kv, model.config.head_dim)
    assert small.blocks[0].attn.q_proj.weight.shape == (q * 8, 64)
    assert small.blocks[0].attn.o_proj.weight.shape == (64, q * 8)
    x = ids()
    torch.testing.assert_close(small(x), zero_heads(model, keep)(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(small(x), model(x), atol=1e-3)  # the heads did matter


def test_heads_of_a_fused_model_prune_to_a_fused_model():
    model = tiny(fused_projections=True)
    keep = [([2, 3, 6, 7], [1, 3])] * 3
    small = slice_heads(model, keep)
    assert small.config.fused_projections and small.blocks[0].attn.qkv_proj is not None
    ref = zero_heads(copy.deepcopy(model).unfuse_projections(), keep)
    torch.testing.assert_close(small(ids()), ref(ids()), atol=1e-5, rtol=1e-5)


def test_kept_heads_must_match_their_groups():
    with pytest.raises(LmstackError, match="do not fall"):
        slice_heads(tiny(), [([0, 2, 4, 6], [0, 1])] * 3)  # heads 4 and 6 read K/V heads 2 and 3


def test_head_shape_picks_the_nearest_uniform_shape():
    assert head_shape(12, 3, 0.2) == (3, 3)    # 9 of 12 heads: 25%
    assert head_shape(12, 3, 0.3) == (2, 4)    # 8 of 12: whole K/V groups go
    assert head_shape(12, 12, 0.25) == (9, 1)  # MHA: any count
    assert head_shape(4, 2, 0.2) == (2, 1)     # nearest is "keep all", which removes nothing: 2 of 4
    with pytest.raises(LmstackError, match="single attention head"):
        head_shape(1, 1, 0.5)


def test_head_scores_are_each_heads_mean_squared_contribution():
    model, x = tiny(), ids()
    scores = head_scores(model, x)
    seen = []
    h = model.blocks[1].attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(x)
    h.remove()
    inp = torch.cat(seen)
    w = model.blocks[1].attn.o_proj.weight
    direct = torch.stack([(inp[:, i * 8:(i + 1) * 8] @ w[:, i * 8:(i + 1) * 8].T).square().sum(1).mean()
                          for i in range(8)])
    torch.testing.assert_close(scores[1], direct, rtol=1e-4, atol=1e-8)


def test_silent_heads_are_the_ones_removed():
    model = tiny(n_kv_heads=8)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight[:, 16:24] = 0  # head 2 adds nothing
            block.attn.o_proj.weight[:, 40:48] = 0  # head 5 neither
    small, report = prune_structured(model, "heads", 0.25, ids())
    assert report["kept"] == [[0, 1, 3, 4, 6, 7]] * 3 and report["removed_fraction"] == 0.25
    torch.testing.assert_close(small(ids()), model(ids()), atol=1e-5, rtol=1e-5)  # nothing that mattered went


def test_select_heads_keeps_the_best_groups_and_queries():
    scores = torch.tensor([5.0, 1.0, 0.1, 0.2, 3.0, 4.0, 9.0, 0.0])  # groups of 2: (5,1) (.1,.2) (3,4) (9,0)
    assert select_heads(scores, 4, 2, 1) == ([0, 6], [0, 3])
    assert select_heads(scores, 4, 2, 2) == ([4, 5, 6, 7], [2, 3])  # group sums 6, .3, 7, 9


@pytest.mark.parametrize("kw", [dict(), dict(mlp="gelu", mlp_bias=True), dict(fused_projections=True)])
def test_sliced_channels_equal_the_original_with_those_channels_zeroed(kw):
    model = tiny(**kw)
    keep = [[j for j in range(80) if (j * 7 + i) % 5] for i in range(3)]  # 64 of 80 in each block
    small = slice_channels(model, keep)
    assert small.config.d_ff == 64 and small.blocks[2].mlp.down_proj.weight.shape == (64, 64)
    ref = copy.deepcopy(model).unfuse_projections()
    with torch.no_grad():
        for block, k in zip(ref.blocks, keep):
            gone = [j for j in range(80) if j not in k]
            block.mlp.down_proj.weight[:, gone] = 0
    torch.testing.assert_close(small(ids()), ref(ids()), atol=1e-5, rtol=1e-5)


def test_channel_scores_and_count():
    model, x = tiny(), ids()
    stats = collect_stats(model, x, hessian=False)
    seen = []
    h = model.blocks[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 80)))
    with torch.no_grad():
        model(x)
    h.remove()
    a = torch.cat(seen)
    direct = (a[:, :, None] * model.blocks[0].mlp.down_proj.weight.T[None]).square().sum(2).mean(0)
    torch.testing.assert_close(channel_scores(model, stats)[0], direct, rtol=1e-4, atol=1e-9)
    assert channel_count(2048, 0.3) == 1432 and channel_count(2048, 0.3) % 8 == 0
    assert channel_count(80, 0.2) == 64 and channel_count(10, 0.5) == 5
    assert channel_count(64, 0.999) == 8 and channel_count(64, 0.001) == 56  # always one step removed and kept


def test_dropped_layers_equal_skipping_those_blocks():
    model = tiny(n_layers=4, sliding_window=8, sliding_window_layers=[1, 3])
    small = drop_layers(model, [1, 2])
    assert small.config.n_layers == 2 and small.config.sliding_window_layers == [1]
    ref = copy.deepcopy(model)
    for i in (1, 2):
        ref.blocks[i].forward = lambda x, ctx, layer: x
    torch.testing.assert_close(small(ids()), ref(ids()), atol=1e-6, rtol=1e-6)
    with pytest.raises(LmstackError, match="proper subset"):
        drop_layers(model, [0, 1, 2, 3])


def test_a_block_that_changes_nothing_scores_zero_and_is_dropped():
    model = tiny(n_layers=4)
    with torch.no_grad():
        model.blocks[2].attn.o_proj.weight.zero_()
        model.blocks[2].mlp.down_proj.weight.zero_()  # block 2 returns its input
    scores = layer_scores(model, ids())
    assert scores[2].abs() < 1e-6 and (scores[[0, 1, 3]] > 1e-4).all()
    small, report = prune_structured(model, "layers", 0.25, ids())
    assert report["dropped"] == [2] and small.config.n_layers == 3
    torch.testing.assert_close(small(ids()), model(ids()), atol=1e-5, rtol=1e-5)


def test_pruned_model_saves_loads_and_the_engine_decodes_it(tmp_path):
    model = tiny(hf_model_type="llama", n_layers=2)
    calib = ids(8)
    small, report = prune_structured(model, "heads", 0.5, calib)
    small, _ = prune_structured(small, "channels", 0.3, calib)
    assert (small.config.n_heads, small.config.d_ff) == (4, 56)
    lmstack.save_model(small, tmp_path / "m")
    loaded = lmstack.load_model(tmp_path / "m")
    assert (loaded.config.n_heads, loaded.config.n_kv_heads, loaded.config.head_dim, loaded.config.d_ff) == \
        (4, small.config.n_kv_heads, 8, 56)
    torch.testing.assert_close(loaded(calib), small(calib))
    prompt = calib[0, :5].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(small(torch.tensor([seq]))[0, -1].argmax()))
    llm = lmstack.LLM(str(tmp_path / "m"), max_num_seqs=1)
    out = llm.generate([prompt], lmstack.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == seq[5:]


def test_bad_inputs_are_clear_errors():
    x = ids()
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(LmstackError, match="strictly between 0 and 1"):
            prune_structured(tiny(), "heads", bad, x)
    with pytest.raises(LmstackError, match="unknown structured pruning kind"):
        prune_structured(tiny(), "neurons", 0.3, x)
    with pytest.raises(LmstackError, match="ALiBi"):
        prune_structured(tiny(position="alibi"), "heads", 0.3, x)
    with pytest.raises(LmstackError, match="mixture-of-experts"):
        prune_structured(tiny(n_experts=4), "channels", 0.3, x)
    with pytest.raises(LmstackError, match="several layers share"):
        prune_structured(tiny(n_unique_layers=1), "layers", 0.3, x)
    with pytest.raises(LmstackError, match="too short"):
        prune_structured(tiny(), "layers", 0.3, x[:1, :8])
    with pytest.raises(LmstackError, match="vocab_size"):
        prune_structured(tiny(), "channels", 0.3, x + 200)


@pytest.mark.parametrize("kind", ["heads", "channels", "layers"])
def test_a_fused_model_prunes_as_its_split_layout_does(kind):
    split, fused = tiny(), tiny(fused_projections=True)
    a, ra = prune_structured(split, kind, 0.3, ids())
    b, rb = prune_structured(fused, kind, 0.3, ids())
    assert b.config.fused_projections and ra["removed_fraction"] == rb["removed_fraction"]
    torch.testing.assert_close(a(ids()), b(ids()), atol=1e-5, rtol=1e-5)
