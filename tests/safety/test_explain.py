"""Explanations (IX.9): on a model trained to copy the token after a marker, gradient×input and integrated
gradients put their largest attribution on that token; integrated gradients are complete; recorded attention
maps are distributions that reproduce every layer's output; rollout rows are distributions; `lmstack explain`
writes its heatmaps, JSON and HTML, and refuses bad input by name."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lmstack
from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.safety.explain import (attention_maps, explain, gradient_x_input, integrated_gradients,
                                    recording_attention, rollout)
from lmstack.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHABET = "abcdefghijklmnop"
LENGTH = 10  # characters before the '=' that asks for the copy


def copy_prompt(rng: random.Random) -> tuple[str, str]:
    """'ckdMgbnah=' -> 'g': filler that never repeats the answer, one marker M, the answer right after it."""
    x = rng.choice(ALPHABET)
    others = ALPHABET.replace(x, "")
    chars = [rng.choice(others) for _ in range(LENGTH)]
    p = rng.randrange(LENGTH - 1)
    chars[p], chars[p + 1] = "M", x
    return "".join(chars) + "=", x


def copied_position(tok, ids: list[int]) -> int:
    return ids.index(tok.token_to_id("M")) + 1


@pytest.fixture(scope="module")
def copy_model():
    """A 2-layer model trained (a few seconds) to answer the token after the marker; a char tokenizer."""
    tok = train_tokenizer(texts=[ALPHABET + "M="], type="char", special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                  max_seq_len=32)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)

    def batch(n: int):
        pairs = [copy_prompt(rng) for _ in range(n)]
        ids = torch.tensor([tok.encode_prompt(p) for p, _ in pairs])
        return ids, torch.tensor([tok.token_to_id(x) for _, x in pairs])

    for _ in range(600):
        ids, y = batch(64)
        loss = F.cross_entropy(model(ids, logits_to_keep=1)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, y = batch(256)
    with torch.no_grad():
        acc = (model(ids, logits_to_keep=1)[:, -1].argmax(-1) == y).float().mean().item()
    assert acc > 0.95, f"the copy model did not learn its task (held-out accuracy {acc:.2f})"
    return model, tok


def _prompts(tok, n: int, seed: int = 1) -> list[tuple[list[int], int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, x = copy_prompt(rng)
        ids = tok.encode_prompt(text)
        out.append((ids, copied_position(tok, ids), tok.token_to_id(x)))
    return out


def test_gradient_attributions_peak_on_the_copied_token(copy_model):
    model, tok = copy_model
    prompts = _prompts(tok, 24)
    gxi_hits = ig_hits = 0
    for ids, pos, target in prompts:
        gxi_hits += int(gradient_x_input(model, ids, target).argmax()) == pos
        ig, _, _ = integrated_gradients(model, ids, target, steps=32, baseline=tok.pad_id)
        ig_hits += int(ig.argmax()) == pos
    # a random token would be right 1 time in 11; the copied token must win for most prompts
    assert gxi_hits >= 0.8 * len(prompts), f"gradient×input peaked on the copied token {gxi_hits}/{len(prompts)}"
    assert ig_hits >= 0.8 * len(prompts), f"integrated gradients peaked on the copied token {ig_hits}/{len(prompts)}"


def test_explain_defaults_to_the_greedy_token_and_integrated_gradients_are_complete(copy_model):
    model, tok = copy_model
    for ids, pos, target in _prompts(tok, 4, seed=2):
        ex = explain(model, ids, steps=64, baseline=tok.pad_id)
        assert ex.target_id == target  # the trained model's greedy answer is the copy
        assert abs(ex.target_logit - ex.baseline_logit) > 1.0
        assert ex.ig_relative_gap < 0.02, ex.ig_gap
        assert abs(float(ex.integrated_gradients.sum()) - (ex.target_logit - ex.baseline_logit)) == pytest.approx(
            abs(ex.ig_gap), abs=1e-5)
        # the midpoint rule integrates the same path about as well
        ig, fx, fb = integrated_gradients(model, ids, target, steps=64, baseline=tok.pad_id, rule="riemann")
        assert abs(float(ig.sum()) - (fx - fb)) < 0.02 * abs(fx - fb)
    # too few points leave a visible gap: the number is a real check, not a constant
    coarse = explain(model, ids, steps=1, baseline="zero")
    assert coarse.ig_relative_gap > 10 * ex.ig_relative_gap


def test_grad_x_input_sums_to_the_derivative_along_the_embeddings(copy_model):
    model, tok = copy_model
    ids, _, target = _prompts(tok, 1, seed=3)[0]
    gxi = gradient_x_input(model, ids, target)
    emb = model.tok_emb(torch.tensor([ids])).detach()
    eps = 1e-3

    def f(scale: float) -> float:
        handle = model.tok_emb.register_forward_hook(lambda m, a, out: emb * scale)
        try:
            with torch.no_grad():
                return float(model(torch.tensor([ids]), logits_to_keep=1)[0, -1, target])
        finally:
            handle.remove()

    # d/ds f(s·e) at s = 1 is sum_i grad_i · e_i
    assert float(gxi.sum()) == pytest.approx((f(1 + eps) - f(1 - eps)) / (2 * eps), rel=1e-2, abs=1e-3)


CASES = {
    "llama gqa sdpa": dict(preset="llama-tiny", n_kv_heads=2),
    "llama naive": dict(preset="llama-tiny", attn_backend="naive"),
    "llama blockwise": dict(preset="llama-tiny", attn_backend="blockwise", attn_block_size=4),
    "alibi": dict(preset="llama-tiny", position="alibi"),
    "gpt2 learned": dict(preset="gpt2-tiny"),
    "gemma2 softcap window": dict(preset="gemma2-tiny", attn_backend="naive", sliding_window=4),
    "mistral window": dict(preset="mistral-tiny", sliding_window=5),
    "fused qk-norm": dict(preset="qwen3-tiny", fused_projections=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recorded_attention_is_a_distribution_that_reproduces_each_layer(case):
    kw = dict(CASES[case])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(kw.pop("preset"), **kw)).eval()
    ids = torch.randint(0, 200, (1, 12))
    backends = [b.attn.backend for b in model.blocks]
    with torch.no_grad():
        before = model(ids)
    probs, error = attention_maps(model, ids[0])
    cfg = model.config
    assert probs.shape == (cfg.n_layers, cfg.n_heads, 12, 12)
    assert torch.allclose(probs.sum(-1), torch.ones(cfg.n_layers, cfg.n_heads, 12), atol=1e-5)
    assert probs.triu(1).abs().max() == 0  # causal: nothing from the future
    if cfg.sliding_window:
        assert probs[..., -1, : 12 - cfg.sliding_window].abs().max() == 0  # the window hides old keys
    # p·v with the recorded probabilities gives the layer's own attention output
    assert error < 1e-5, error
    # recording changed nothing: same logits, the backends are back in place
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert [b.attn.backend for b in model.blocks] == backends


def test_recording_reproduces_the_whole_forward_when_the_maps_are_used():
    """Drive the model with the recorded probabilities instead of its backend: the logits come out the same."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("llama-tiny", n_kv_heads=2)).eval()
    ids = torch.randint(0, 200, (1, 9))
    probs, _ = attention_maps(model, ids[0])
    layer_iter = iter(probs)

    def replay(q, k, v, mask, scale, **kwargs):
        p = next(layer_iter)[None]
        return p @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    saved = [b.attn.backend for b in model.blocks]
    try:
        for b in model.blocks:
            b.attn.backend = replay
        with torch.no_grad():
            replayed = model(ids)
    finally:
        for b, backend in zip(model.blocks, saved):
            b.attn.backend = backend
    with torch.no_grad():
        assert torch.allclose(replayed, model(ids), atol=1e-5)


def test_rollout_rows_are_distributions_and_follow_the_layers():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 2, 6, 6) + torch.triu(torch.full((6, 6), -1e9), 1), -1)
    r = rollout(a)
    assert torch.allclose(r.sum(-1), torch.ones(6), atol=1e-6)
    assert r.triu(1).abs().max() < 1e-6
    eye = torch.eye(6)
    one = 0.5 * a[0].mean(0) + 0.5 * eye
    assert torch.allclose(rollout(a[:1]), one, atol=1e-6)
    two = (0.5 * a[1].mean(0) + 0.5 * eye) @ one  # the later layer multiplies from the left
    assert torch.allclose(rollout(a[:2]), two, atol=1e-6)
    assert torch.allclose(rollout(eye.expand(4, 2, 6, 6)), eye)  # nothing mixes: each position keeps itself
    with pytest.raises(LmstackError, match="residual"):
        rollout(a, residual=1.5)
    with pytest.raises(LmstackError, match="layers, heads, T, T"):
        rollout(a[0])


def test_bad_input_is_named():
    model = Transformer(ModelConfig.from_preset("llama-tiny", max_seq_len=16)).eval()
    with pytest.raises(LmstackError, match="prompt is empty"):
        explain(model, [])
    with pytest.raises(LmstackError, match="more than the model's context"):
        explain(model, list(range(17)))
    with pytest.raises(LmstackError, match="target token id 9999 is outside"):
        explain(model, [1, 2, 3], target=9999)
    with pytest.raises(LmstackError, match="steps >= 1"):
        integrated_gradients(model, [1, 2, 3], 4, steps=0)
    with pytest.raises(LmstackError, match="unknown baseline"):
        integrated_gradients(model, [1, 2, 3], 4, baseline="ones")
    with pytest.raises(LmstackError, match="unknown integration rule"):
        integrated_gradients(model, [1, 2, 3], 4, rule="simpson")
    linear = Transformer(ModelConfig.from_preset("llama-tiny", attention="performer")).eval()
    with pytest.raises(LmstackError, match="attention='softmax'"):
        with recording_attention(linear):
            pass


def test_explain_command_writes_heatmaps_json_and_html(copy_model, tmp_path, capsys):
    model, tok = copy_model
    path = lmstack.save_model(model, tmp_path / "copy", tokenizer=tok)
    prompt, x = copy_prompt(random.Random(7))
    out = tmp_path / "explain"
    rc = main(["explain", "--model", str(path), "--prompt", prompt, "--out", str(out), "--steps", "16",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "attention_mean.png", "rollout.png", "attributions.png", "attention_layer00.png",
            "attention_layer01.png", "attributions.json", "rollout.json", "attention.safetensors",
            "config.yaml"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind
    for png in ("attention_mean.png", "rollout.png", "attention_layer00.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "attributions.json").read_text())
    ids = tok.encode_prompt(prompt)
    assert summary["ids"] == ids and summary["target"] == x and len(summary["integrated_gradients"]) == len(ids)
    ig = summary["integrated_gradients"]
    assert max(range(len(ig)), key=ig.__getitem__) == copied_position(tok, ids)
    assert summary["baseline"] == f"token {tok.pad_id}" and summary["ig_relative_gap"] < 0.05
    roll = json.loads((out / "rollout.json").read_text())["rollout"]
    assert all(abs(sum(row) - 1) < 1e-4 for row in roll)
    assert load_file(out / "attention.safetensors")["attention"].shape == (2, 4, len(ids), len(ids))
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "integrated gradients" in page and ">M</span>" in page

    # an explicit target is explained as given
    rc = main(["explain", "--model", str(path), "--prompt", prompt, "--out", str(out), "--target", "a",
               "--steps", "4"])
    assert rc == 0 and json.loads((out / "attributions.json").read_text())["target_id"] == tok.token_to_id("a")


def test_explain_command_refuses_bad_input(copy_model, tmp_path, capsys):
    model, tok = copy_model
    path = lmstack.save_model(model, tmp_path / "copy", tokenizer=tok)
    cases = [(["--prompt", "   "], "--prompt is empty"),
             (["--prompt", "ab" * 40], "more than the model's context"),
             (["--prompt", "abM", "--target", "abc"], "is not one token of the vocabulary"),
             (["--prompt", "abM", "--steps", "0"], "steps must be >= 1")]
    for extra, message in cases:
        assert main(["explain", "--model", str(path), "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
