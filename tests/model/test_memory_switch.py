"""ModelConfig.memory: a memory model's own forward, training, saving, decoding and refusals."""
import pytest
import torch

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer.model_runner import ModelRunner
from lmstack.model.config import ModelConfig
from lmstack.model.counting import model_stats
from lmstack.model.hf_convert import config_to_hf
from lmstack.model.memory import KNNMemory, generate_with_memory, knn_forward, new_memory, xl_forward
from lmstack.model.memory.compressive import compressive_forward
from lmstack.model.transformer import Transformer
from lmstack.train.objectives import ObjectiveConfig, build_objective


def xl_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, memory="xl", mem_len=16, seg_len=16)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def knn_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, memory="knn", knn_top_k=4,
                seg_len=8)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def compressive_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, memory="compressive", mem_len=8,
                cmem_len=4, cmem_rate=2, seg_len=8)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def test_compressive_model_forward_is_compressive_forward_and_trains_its_compressor():
    model = compressive_model()
    ids = torch.randint(0, 48, (2, 60))
    want, _ = compressive_forward(model, ids, seg_len=8)
    torch.testing.assert_close(model(ids), want)
    assert model_stats(model.config).total_params == model.num_parameters()
    model.train()
    obj = build_objective(ObjectiveConfig(name="clm"), model.config)
    loss, _ = obj.loss(model, obj.prepare(torch.randint(0, 48, (2, 41)), torch.Generator().manual_seed(0)))
    loss.backward()
    # the attention-reconstruction loss reached the trainer's loss through model.aux_loss
    assert float(model.aux_loss.detach()) > 0
    assert model.cmem_compress.convs[0].weight.grad.abs().sum() > 0


def test_xl_model_forward_is_segment_recurrence_past_its_window():
    model = xl_model()
    ids = torch.randint(0, 48, (2, 150))  # longer than max_seq_len: segments of 16 with 16 of memory
    want, _ = xl_forward(model, ids, seg_len=16, mem_len=16)
    torch.testing.assert_close(model(ids), want, atol=0, rtol=0)
    hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(model.head(hidden), want)
    # the memory reaches back: an early token changes a later segment's logits (a plain window would not)
    other = ids.clone()
    other[:, 10] = (other[:, 10] + 1) % 48
    assert not torch.allclose(model(other)[:, 20:32], want[:, 20:32])
    assert torch.equal(model(other)[:, :10], want[:, :10])


def test_knn_model_forward_is_knn_forward_with_a_fresh_store_and_owns_its_gate():
    model = knn_model()
    assert [n for n, _ in model.named_parameters() if n.startswith("knn_gate")] == ["knn_gate.logit"]
    ids = torch.randint(0, 48, (2, 40))
    want, _ = knn_forward(model, ids, 8, KNNMemory(model, 0, capacity=4096, top_k=4))
    torch.testing.assert_close(model(ids), want)
    assert model_stats(model.config).total_params == model.num_parameters()


def test_memory_models_train_through_the_ordinary_objective():
    for model in (xl_model(), knn_model()):
        model.train()
        obj = build_objective(ObjectiveConfig(name="clm"), model.config)
        tokens = torch.randint(0, 48, (2, 49))
        loss, metrics = obj.loss(model, obj.prepare(tokens, torch.Generator().manual_seed(0)))
        loss.backward()
        assert torch.isfinite(loss) and metrics["n_tokens"] == 96
        attn = model.blocks[0].attn
        assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
        if model.config.memory == "knn":  # layer 0 retrieves from the store: the gate learns
            assert model.knn_gate.logit.grad.abs().sum() > 0


def test_memory_models_round_trip_through_save_and_load(tmp_path):
    for name, model in (("xl", xl_model()), ("knn", knn_model()), ("compressive", compressive_model())):
        with torch.no_grad():
            if name == "knn":
                model.knn_gate.logit.fill_(0.7)
            if name == "compressive":  # a trained (not mean-pooling) compressor must survive the round trip
                model.cmem_compress.convs[1].weight.add_(0.05)
        lmstack.save_model(model, tmp_path / name)
        back = lmstack.load_model(tmp_path / name).eval()
        assert back.config.memory == name
        ids = torch.randint(0, 48, (1, 70))
        torch.testing.assert_close(back(ids), model(ids))


def test_xl_and_compressive_decoding_match_teacher_forced_segments_of_one():
    # prefill and decode both run segments of one token
    for model in (xl_model(seg_len=1), compressive_model(seg_len=1, mem_len=4, cmem_len=3)):
        prompt = torch.randint(0, 48, (2, 9))
        out = generate_with_memory(model, prompt, 12)
        logits = model(out[:, :-1])
        assert torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])


def test_knn_decoding_matches_recomputing_the_whole_sequence():
    model = knn_model()
    with torch.no_grad():
        model.knn_gate.logit.fill_(1.0)
    prompt = torch.randint(0, 48, (2, 13))
    out = generate_with_memory(model, prompt, 20)  # crosses two segment boundaries while decoding
    for t in range(13, 33):
        assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])


def test_a_persistent_knn_store_carries_a_fact_across_calls(tmp_path):
    model = knn_model()
    memory = new_memory(model)
    model(torch.randint(0, 48, (1, 24)), cache=memory)
    assert len(memory) == 24
    memory.save(tmp_path / "mem")
    loaded = KNNMemory.load(tmp_path / "mem", model)
    q = torch.randint(0, 48, (1, 5))
    torch.testing.assert_close(model(q, cache=loaded), model(q, cache=memory))
    assert len(loaded) == 29  # a call's own keys go to the store after it
    fresh = KNNMemory.load(tmp_path / "mem", model)
    out = generate_with_memory(model, q, 3, memory=fresh)
    assert out.shape == (1, 8) and len(fresh) == 24  # the open segment (8 tokens, not yet full) is not stored
    generate_with_memory(model, q, 4, memory=fresh)
    assert len(fresh) == 32  # 9 tokens: the first full segment of 8 was stored, once


def test_memory_models_are_refused_where_they_would_run_without_their_memory():
    model = xl_model()
    with pytest.raises(LmstackError, match="engine would drop it"):
        ModelRunner(model, num_blocks=8, block_size=4)
    with pytest.raises(LmstackError, match="run without its memory"):
        model(torch.randint(0, 48, (1, 4)), cache=model.new_cache())
    with pytest.raises(LmstackError, match="no Hugging Face architecture"):
        config_to_hf(model.config.replace(hf_model_type="llama"))
    with pytest.raises(LmstackError, match="doc_ids"):
        model(torch.randint(0, 48, (1, 4)), doc_ids=torch.zeros(1, 4, dtype=torch.long))
    mod = Transformer(ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mod_capacity=0.5))
    with pytest.raises(LmstackError, match="Mixture-of-Depths"):
        ModelRunner(mod, num_blocks=8, block_size=4)


@pytest.mark.parametrize("kw, match", [
    (dict(memory="xl"), "mem_len >= 1"),
    (dict(memory="xl", mem_len=40, seg_len=40), "must fit in max_seq_len=64"),
    (dict(memory="xl", mem_len=64), "leave no room for a segment"),
    (dict(memory="xl", mem_len=8, position="learned"), "relative positions"),
    (dict(memory="xl", mem_len=8, mod_capacity=0.5), "Mixture-of-Depths"),
    (dict(memory="knn", knn_layer=5), "knn_layer"),
    (dict(memory="knn", knn_top_k=10, knn_capacity=4), "knn_top_k"),
    (dict(mem_len=8), "need a long-context memory"),
    (dict(memory="compressive", mem_len=8), "cmem_len >= 1"),
])
def test_conflicting_memory_settings_name_the_conflict(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw)


def test_pretrain_cli_trains_a_memory_model_and_model_generate_decodes_it(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from lmstack.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    (tmp_path / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40)
    run = tmp_path / "run"
    args = ["pretrain", "--config", "recipes/shakespeare_char.yaml", "--out", str(run), "--data.text",
            str(tmp_path / "input.txt"), "--model.vocab_size", "64", "--model.n_layers", "2", "--model.d_model", "64",
            "--model.position", "rope", "--model.memory", "xl", "--model.mem_len", "32", "--model.seg_len", "32", "--train.steps", "6",
            "--train.eval_every", "0", "--train.progress", "false", "--train.log_every", "2", "--train.save_every", "6"]
    assert main(args) == 0
    ckpt = run / "checkpoints" / "step_00000006" / "model"
    model = lmstack.load_model(ckpt)
    assert model.config.memory == "xl" and model.config.mem_len == 32
    capsys.readouterr()
    assert main(["model", "generate", str(ckpt), "--prompt", "First", "--max_tokens", "5"]) == 0
    assert "5 tokens in" in capsys.readouterr().out


def test_model_generate_keeps_a_knn_store_across_calls(tmp_path, capsys):
    from lmstack.cli import main

    model = knn_model()
    lmstack.save_model(model, tmp_path / "m")
    args = ["model", "generate", str(tmp_path / "m"), "--prompt_ids", "[1, 2, 3, 4, 5]", "--max_tokens", "4",
            "--memory", str(tmp_path / "mem")]
    assert main(args) == 0
    assert "[memory" in capsys.readouterr().out and KNNMemory.load(tmp_path / "mem", model).__len__() == 9
    assert main(args) == 0  # the second conversation starts from the first one's store
    assert len(KNNMemory.load(tmp_path / "mem", model)) == 18
    other = knn_model(seed=1)
    lmstack.save_model(other, tmp_path / "other")
    assert main(["model", "generate", str(tmp_path / "other")] + args[3:]) == 2
    assert "another model" in capsys.readouterr().err
    lmstack.save_model(xl_model(), tmp_path / "xl")
    assert main(["model", "generate", str(tmp_path / "xl")] + args[3:]) == 2
    assert "only memory='knn' persists" in capsys.readouterr().err


def test_a_memory_longer_than_a_segment_fills_up_over_several_segments():
    model = xl_model(mem_len=20, seg_len=8)  # 20 is not a multiple of 8: the memory is partly full for a while
    ids = torch.randint(0, 48, (1, 40))
    memory = new_memory(model)
    with memory.attach():
        for segment in ids.split(8, dim=1):
            model(segment, cache=memory)
            assert memory.memory[0].shape[1] == memory.length == min(20, memory.length)
    assert memory.length == 20
    torch.testing.assert_close(model(ids), xl_forward(model, ids, seg_len=8, mem_len=20)[0])


def test_the_compressor_trains_at_its_own_learning_rate_without_decay():
    from lmstack.train.optim import OptimizerConfig, build_optimizer

    model = compressive_model()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1))
    group = next(g for g in opt.param_groups if any(n.startswith("cmem_compress.") for n in g["names"]))
    assert all(n.startswith("cmem_compress.") for n in group["names"])
    assert group["lr"] == pytest.approx(1e-3 * model.config.cmem_lr_scale) and group["weight_decay"] == 0.0
    others = [g for g in opt.param_groups if g is not group]
    assert max(g["lr"] for g in others) == pytest.approx(1e-3)
