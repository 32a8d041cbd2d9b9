"""`lmstack finetune`: an end-to-end run (full fine-tuning) with its outputs, exact resume from a trainable-only
checkpoint, an adapter method, bad input, and persona control through the system prompt after SFT."""
from __future__ import annotations

import json

import pytest
import torch

from _sft_tiny import chat_rows, save_base, tiny_model, tokenizer, write_jsonl
from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model


def _data(tmp_path, kinds=("qa", "persona"), n=200, extra=()):
    rows = [r for r in chat_rows() if r["kind"] in kinds][:n]
    return write_jsonl(tmp_path / "chat.jsonl", list(rows) + list(extra))


def _quiet(*_):
    pass


def _cfg(tmp_path, base, data, **kw):
    train = dict(steps=12, eval_every=6, eval_batches=2, log_every=2, progress=False, seed=0, threads=0)
    train.update(kw.pop("train", {}))
    from lmstack.train.config import TrainConfig
    from lmstack.train.optim import OptimizerConfig

    return FinetuneConfig(data=str(data), model=str(base), out=str(tmp_path / kw.pop("name", "run")),
                          train=TrainConfig(**train), batch_size=4, seq_len=96,
                          optim=OptimizerConfig(name="adamw", lr=kw.pop("lr", 3e-3), weight_decay=0.0), **kw)


def test_cli_full_finetune_writes_model_metrics_config_and_data_report(tmp_path):
    from lmstack.cli import run

    base = save_base(tmp_path / "base")
    no_reply = [{"messages": [{"role": "user", "content": "hello?"}]}] * 3
    data = _data(tmp_path, extra=no_reply)
    out = tmp_path / "sft"
    summary = run(["finetune", "--method", "full", "--data", str(data), "--model", str(base), "--out", str(out),
                   "--train.steps", "12", "--train.eval_every", "6", "--train.progress", "false",
                   "--optim.lr", "0.003", "--batch_size", "4", "--seq_len", "96"])
    for name in ("config.yaml", "metrics.jsonl", "data.json", "summary.json", "model/model.safetensors",
                 "model/tokenizer.json", "loss.png"):
        assert (out / name).exists(), name
    report = json.loads((out / "data.json").read_text())
    assert report["train"]["skipped_no_assistant"] + report["val"]["skipped_no_assistant"] == 3
    assert summary["trainable_pct"] == 100.0 and summary["steps"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    tuned = load_model(out / "model")
    before = load_model(base)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), before.state_dict().values()))


def test_resume_from_a_trainable_checkpoint_is_exact(tmp_path):
    base = save_base(tmp_path / "base")
    data = _data(tmp_path)
    whole = finetune(_cfg(tmp_path, base, data, name="whole", train={"save_every": 6}), log=_quiet)
    cfg = _cfg(tmp_path, base, data, name="cut", train={"save_every": 6})
    finetune(cfg, log=_quiet)
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000006", "step_00000012"]
    import shutil

    shutil.rmtree(ckpts[-1])  # as if killed after step 6
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = finetune(cfg, log=_quiet)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)
    # a checkpoint of another method is refused, not silently mixed in
    if "lora" in __import__("lmstack.adapt", fromlist=["METHODS"]).METHODS:
        with pytest.raises(LmstackError, match="other tensors"):
            finetune(_cfg(tmp_path, base, data, name="cut", method="lora", train={"save_every": 6}), log=_quiet)


def test_lora_finetune_trains_only_the_adapter_and_saves_it(tmp_path):
    from lmstack.adapt import METHODS

    if "lora" not in METHODS:
        pytest.skip("lora is not registered yet")
    base = save_base(tmp_path / "base")
    data = _data(tmp_path)
    cfg = _cfg(tmp_path, base, data, method="lora", lr=1e-2)
    summary = finetune(cfg, log=_quiet)
    assert 0 < summary["trainable_pct"] < 10
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model").exists()
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    from lmstack.train.state_io import load_tree

    saved = load_tree(ckpt / "trainable")
    assert saved and all("lora" in k for k in saved)  # the frozen base is not copied into checkpoints


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    base = save_base(tmp_path / "base")
    data = _data(tmp_path)
    with pytest.raises(ConfigError, match="method='bitfit' is not allowed"):
        FinetuneConfig(method="bitfit")
    with pytest.raises(LmstackError, match="needs --data"):
        finetune(FinetuneConfig(model=str(base)), log=_quiet)
    with pytest.raises(LmstackError, match="chat data file not found"):
        finetune(_cfg(tmp_path, base, tmp_path / "nope.jsonl"), log=_quiet)
    with pytest.raises(LmstackError, match="--model directory not found"):
        finetune(_cfg(tmp_path, tmp_path / "nobase", data), log=_quiet)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LmstackError, match="no usable chat rows"):
        finetune(_cfg(tmp_path, base, empty, val_fraction=0.0), log=_quiet)
    with pytest.raises(LmstackError, match="task 'code'"):
        finetune(_cfg(tmp_path, base, data, mix={"code": 1.0}), log=_quiet)


def _first_reply_token_dist(model, tok, system):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Which river flows through Oakport?"}]
    ids, _ = tok.apply_chat_template(msgs, add_generation_prompt=True)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)


def test_system_prompt_steers_the_reply_after_persona_sft(tmp_path):
    from lmstack.world import PERSONAS, apply_persona

    tok = tokenizer()
    base = save_base(tmp_path / "base")
    data = _data(tmp_path, kinds=("persona",), n=400)
    cfg = _cfg(tmp_path, base, data, train={"steps": 120, "eval_every": 0}, val_fraction=0.0, lr=1e-2)
    finetune(cfg, log=_quiet)
    tuned, untuned = load_model(tmp_path / "run" / "model"), tiny_model(tok)

    def kl(model, a="pirate", b="robot"):
        p = _first_reply_token_dist(model, tok, PERSONAS[a].system)
        q = _first_reply_token_dist(model, tok, PERSONAS[b].system)
        return float((p.exp() * (p - q)).sum())

    kl_before, kl_after = kl(untuned), kl(tuned)
    assert kl_after > 1.0 and kl_after > 50 * kl_before
    # each persona's system prompt makes the first token of its own style ("Arr!", "BEEP.", ...) the top choice
    for name, persona in PERSONAS.items():
        top = tok.decode([int(_first_reply_token_dist(tuned, tok, persona.system).argmax())])
        assert top and apply_persona(name, "x").startswith(top), (name, top)


def test_finetune_recipes_load_strictly():
    from pathlib import Path

    from lmstack.config import load_config

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("finetune_*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        cfg = load_config(FinetuneConfig, path)
        assert cfg.adapter.method == cfg.method  # the top-level method decides


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3", "adapter"])
def test_other_methods_train_through_the_same_run(tmp_path, method):
    from lmstack.adapt import METHODS

    if method not in METHODS:
        pytest.skip(f"{method} is not registered yet")
    base = save_base(tmp_path / "base")
    data = _data(tmp_path)
    summary = finetune(_cfg(tmp_path, base, data, method=method, lr=1e-2, train={"steps": 6, "eval_every": 3}),
                       log=_quiet)
    assert 0 < summary["trainable_pct"] < 10 and summary["steps"] == 6
    assert summary["val_loss"] == summary["val_loss"]  # finite, not NaN
    packing = json.loads((tmp_path / "run" / "data.json").read_text())["packing"]["strategy"]
    assert packing == ("none" if method in ("prompt", "prefix") else "best_fit")
    # the saved adapter goes back onto a fresh base and changes its output; another base is refused by name
    from lmstack.adapt.finetune import load_result

    tuned, base_model = load_result(base, summary["result"]), load_model(base)
    ids = torch.tensor([tokenizer().apply_chat_template(chat_rows()[0]["messages"])[0][:40]])
    with torch.no_grad():
        assert (tuned(ids) - base_model(ids)).abs().max() > 1e-4
    from lmstack.model.hf_io import save_model

    other = save_model(tiny_model(tokenizer(), d_model=96), tmp_path / "wider", tokenizer=tokenizer())
    with pytest.raises(LmstackError, match="made for"):
        load_result(other, summary["result"])


def test_a_trainable_adapter_whose_weights_link_out_of_its_folder_is_refused(tmp_path):
    """load_trainable reads its two files through load_guard: a symlink out of the folder is refused unread."""
    from pathlib import Path

    from lmstack.adapt.finetune import TRAINABLE_WEIGHTS, load_result

    base = save_base(tmp_path / "base")
    summary = finetune(_cfg(tmp_path, base, _data(tmp_path, n=40), method="ia3",
                            train={"steps": 2, "eval_every": 2}), log=_quiet)
    adapter = Path(summary["result"])
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((adapter / TRAINABLE_WEIGHTS).read_bytes())
    (adapter / TRAINABLE_WEIGHTS).unlink()
    (adapter / TRAINABLE_WEIGHTS).symlink_to(outside)
    with pytest.raises(LmstackError, match="outside|escapes|inside"):
        load_result(base, adapter)
