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
from lmstack.safety.explain_command import COMMANDS
from lmstack.safety.explain import (attention_maps, explain, gradient_x_input, integrated_gradients,
                                    recording_attention, rollout)
from lmstack.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHABET = "abcdefghijklmnop"
LENGTH = 10  # characters before the '=' that asks for the copy


def copy_prompt(rng: random.Random, decoy: bool = False) -> tuple[str, str]:
    """'ckdMgbnah=' -> 'g': random filler, one marker M, the answer right after it. decoy: the answer also
    appears at another place, so only the marked occurrence tells the copy apart from the token's identity."""
    x = rng.choice(ALPHABET)
    chars = [rng.choice(ALPHABET) for _ in range(LENGTH)]
    p = rng.randrange(LENGTH - 1)
    chars[p], chars[p + 1] = "M", x
    if decoy:
        chars[rng.choice([i for i in range(LENGTH) if i not in (p, p + 1)])] = x
    return "".join(chars) + "=", x


def copied_position(tok, ids: list[int]) -> int:
    return ids.index(tok.token_to_id("M")) + 1


def train_copy_model(tok, max_steps: int) -> tuple[Transformer, float]:
    """A 2-layer model trained to answer the token after the marker, until 98% held-out accuracy on decoy
    prompts (a few seconds: ~50-100 steps); max_steps=0 gives the untrained model of the same seed."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                  max_seq_len=32)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)

    def batch(n: int, decoy: bool = False):
        pairs = [copy_prompt(rng, decoy) for _ in range(n)]
        ids = torch.tensor([tok.encode_prompt(p) for p, _ in pairs])
        return ids, torch.tensor([tok.token_to_id(x) for _, x in pairs])

    held, acc = batch(256, decoy=True), 0.0
    for step in range(1, max_steps + 1):
        ids, y = batch(64)
        loss = F.cross_entropy(model(ids, logits_to_keep=1)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                acc = (model(held[0], logits_to_keep=1)[:, -1].argmax(-1) == held[1]).float().mean().item()
            if acc >= 0.98:
                break
    return model.eval(), acc


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(texts=[ALPHABET + "M="], type="char", special_tokens="chat", show_progress=False)


@pytest.fixture(scope="module")
def copy_model(char_tok):
    model, acc = train_copy_model(char_tok, max_steps=600)
    assert acc >= 0.98, f"the copy model did not learn its task (held-out accuracy {acc:.2f})"
    return model, char_tok


def _prompts(tok, n: int, seed: int = 1) -> list[tuple[list[int], int, int]]:
    """n decoy prompts as (ids, position of the copied token, answer id)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, x = copy_prompt(rng, decoy=True)
        ids = tok.encode_prompt(text)
        out.append((ids, copied_position(tok, ids), tok.token_to_id(x)))
    return out


def _hits(model, tok, prompts, keep) -> tuple[int, int]:
    """(gradient×input, integrated gradients) peaks on the copied position, over the prompts."""
    gxi_hits = ig_hits = 0
    for ids, pos, target in prompts:
        gxi_hits += int(gradient_x_input(model, ids, target, keep_ids=keep).argmax()) == pos
        ig, fx, fb = integrated_gradients(model, ids, target, steps=32, baseline=tok.pad_id, keep_ids=keep)
        ig_hits += int(ig.argmax()) == pos
    return gxi_hits, ig_hits


def _structure(tok) -> list[int]:
    """The copy prompt's structure tokens: BOS, the marker and the '=' that asks."""
    return [tok.bos_id, tok.token_to_id("M"), tok.token_to_id("=")]


def test_gradient_attributions_peak_on_the_copied_token(copy_model):
    model, tok = copy_model
    prompts = _prompts(tok, 30)
    keep = _structure(tok)  # attributions over the content: BOS, marker and '=' held (keep_ids)
    gxi_hits, ig_hits = _hits(model, tok, prompts, keep)
    # the answer also sits at a decoy place: only the marked occurrence counts, and a random position would
    # be right 1 time in 12
    n = len(prompts)
    assert gxi_hits >= 0.7 * n, f"gradient×input peaked on the copied token {gxi_hits}/{n}"
    assert ig_hits >= 0.8 * n, f"integrated gradients peaked on the copied token {ig_hits}/{n}"
    # the control: the same model untrained does not find it, so the hits above come from what it learned
    untrained, _ = train_copy_model(tok, max_steps=0)
    gxi_control, ig_control = _hits(untrained, tok, prompts, keep)
    assert gxi_control <= 0.4 * n and ig_control <= 0.4 * n, (gxi_control, ig_control)


def test_explain_on_the_copy_model_defaults_to_its_answer_and_attention_finds_the_copy(copy_model):
    model, tok = copy_model
    hits = 0
    prompts = _prompts(tok, 10, seed=2)
    for ids, pos, target in prompts:
        ex = explain(model, ids, steps=64, baseline=tok.pad_id, keep_ids=_structure(tok))
        assert ex.target_id == target  # the trained model's greedy answer is the copy
        assert abs(ex.ig_gap) < 0.02 * abs(ex.target_logit - ex.baseline_logit) + 1e-3, ex.ig_gap
        assert ex.kept == [0, pos - 1, len(ids) - 1] and ex.integrated_gradients[ex.kept].abs().max() == 0
        hits += int(ex.attention[-1].mean(0)[-1].argmax()) == pos  # the last layer reads the copied token
    assert hits >= 0.8 * len(prompts)


def test_integrated_gradients_are_complete_and_too_few_steps_show():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.2)).eval()
    ids = torch.randint(20, 200, (12,))
    target = 7
    for rule in ("trapezoid", "riemann"):
        ig, fx, fb = integrated_gradients(model, ids, target, steps=64, baseline=3, rule=rule)
        assert abs(fx - fb) > 0.1
        assert abs(float(ig.sum()) - (fx - fb)) < 0.02 * abs(fx - fb), rule
    ex = explain(model, ids, target, steps=64, baseline=3)
    assert ex.ig_gap == pytest.approx(float(ex.integrated_gradients.sum()) - (ex.target_logit - ex.baseline_logit))
    assert ex.ig_relative_gap < 0.02
    # one step is a single gradient: the gap it leaves is a real number the report shows, not a constant
    assert explain(model, ids, target, steps=1, baseline=3).ig_relative_gap > 5 * ex.ig_relative_gap
    # held tokens: their positions get exactly zero, and the rest stays complete
    ig, fx, fb = integrated_gradients(model, ids, target, steps=64, baseline=3, keep_ids=[int(ids[0])])
    assert ig[ids == ids[0]].abs().max() == 0 and abs(float(ig.sum()) - (fx - fb)) < 0.02 * abs(fx - fb)


def test_grad_x_input_sums_to_the_derivative_along_the_embeddings():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.2)).eval()
    ids = torch.randint(0, 200, (10,)).tolist()
    target = 11
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
    assert float(gxi.sum()) == pytest.approx((f(1 + eps) - f(1 - eps)) / (2 * eps), rel=1e-2, abs=1e-4)
    held = gradient_x_input(model, ids, target, keep_ids=[ids[2]])
    assert held[2] == 0 and torch.equal(held[torch.tensor(ids) != ids[2]], gxi[torch.tensor(ids) != ids[2]])


CASES = {
    "llama gqa sdpa": dict(preset="llama-tiny", n_kv_heads=2),
    "llama naive": dict(preset="llama-tiny", attn_backend="naive"),
    "llama blockwise": dict(preset="llama-tiny", attn_backend="blockwise", attn_block_size=4),
    "alibi": dict(preset="llama-tiny", position="alibi"),
    "gpt2 learned": dict(preset="gpt2-tiny"),
    "gemma2 softcap window": dict(preset="gemma2-tiny", attn_backend="naive", sliding_window=4),
    "mistral window": dict(preset="mistral-tiny", sliding_window=5),
    "fused qk-norm": dict(preset="qwen2-tiny", qk_norm=True, fused_projections=True),
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
    windows = [cfg.window_for_layer(layer) for layer in range(cfg.n_layers)]
    for layer, window in enumerate(windows):
        if window:  # the window hides old keys (Gemma 2 has it on every other layer)
            assert probs[layer, :, -1, : 12 - window].abs().max() == 0
    assert any(windows) == bool(cfg.sliding_window)
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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random llama-tiny with a char tokenizer, saved as a model directory (for the CLI and captum tests)."""
    tok = train_tokenizer(texts=[ALPHABET + "M="], type="char", special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=32, init_std=0.2)
    return lmstack.save_model(Transformer(cfg).eval(), tmp_path_factory.mktemp("explain") / "tiny", tokenizer=tok)


def test_explain_command_writes_heatmaps_json_and_html(tiny_dir, tmp_path, capsys):
    tok = lmstack.load_tokenizer(tiny_dir)
    prompt = "abMcdefg="
    out = tmp_path / "explain"
    rc = main(["explain", "--model", str(tiny_dir), "--prompt", prompt, "--out", str(out), "--steps", "16",
               "--target", "a", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {"index.html", "attention_heads.png", "attention_mean.png", "rollout.png", "attributions.png",
                     "attributions.json", "rollout.json", "attention.safetensors", "config.yaml"}  # no temp files
    for png in ("attention_heads.png", "attention_mean.png", "rollout.png", "attributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "attributions.json").read_text())
    ids = tok.encode_prompt(prompt)
    assert summary["ids"] == ids and summary["tokens"][1:] == list(prompt)
    assert summary["target_id"] == tok.token_to_id("a") and summary["target"] == "a"
    assert len(summary["integrated_gradients"]) == len(ids) == len(summary["grad_x_input"])
    assert summary["baseline"] == f"token {tok.pad_id}" and summary["ig_relative_gap"] < 0.05
    assert summary["kept_positions"] == [0] and summary["integrated_gradients"][0] == 0  # BOS is held
    roll = json.loads((out / "rollout.json").read_text())["rollout"]
    assert all(abs(sum(row) - 1) < 1e-4 for row in roll)
    assert load_file(out / "attention.safetensors")["attention"].shape == (2, 4, len(ids), len(ids))
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "integrated gradients" in page
    assert ">M</span>" in page and "<script" not in page


def test_explain_defaults_to_the_greedy_token_and_the_flags_reach_it(tiny_dir):
    model, tok = lmstack.load_model(tiny_dir), lmstack.load_tokenizer(tiny_dir)
    ids = tok.encode_prompt("abMcdefg=")
    ex = explain(model, ids, steps=4, baseline="zero")
    with torch.no_grad():
        assert ex.target_id == int(model(torch.tensor([ids]))[0, -1].argmax())
    assert ex.kept == [] and ex.baseline == "zero" and ex.baseline_logit == 0.0  # no bias anywhere: f(0) = 0
    cfg = COMMANDS.parse(["--model", "m", "--prompt", "p", "--keep_special", "false", "--baseline", "zero",
                          "--rule", "riemann", "--steps", "8"])
    assert (cfg.keep_special, cfg.baseline, cfg.rule, cfg.steps) == (False, "zero", "riemann", 8)


def test_explain_command_refuses_bad_input(tiny_dir, tmp_path, capsys):
    cases = [(["--prompt", "   "], "--prompt is empty"),
             (["--prompt", "ab" * 40], "more than the model's context"),
             (["--prompt", "abM", "--target", "abc"], "is not one token of the vocabulary"),
             (["--prompt", "abM", "--steps", "0"], "steps must be >= 1")]
    for extra, message in cases:
        assert main(["explain", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_integrated_gradients_match_captum(tiny_dir):
    captum_attr = pytest.importorskip("captum.attr")
    model, tok = lmstack.load_model(tiny_dir), lmstack.load_tokenizer(tiny_dir)
    ids = tok.encode_prompt("abMcdefg=")
    target = tok.token_to_id("c")
    x_ids = torch.tensor([ids])
    emb = model.tok_emb(x_ids).detach()
    base = model.tok_emb(torch.full_like(x_ids, tok.pad_id)).detach()

    def forward(e):
        handle = model.tok_emb.register_forward_hook(lambda m, a, out: e)
        try:
            return model(x_ids.expand(e.shape[0], -1), logits_to_keep=1)[:, -1, target]
        finally:
            handle.remove()

    ig = captum_attr.IntegratedGradients(forward)
    # riemann_middle with n points is our midpoint rule with n steps
    theirs = ig.attribute(emb, baselines=base, n_steps=16, method="riemann_middle").sum(-1)[0]
    ours, fx, fb = integrated_gradients(model, ids, target, steps=16, baseline=tok.pad_id, rule="riemann")
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-4), (ours, theirs)
    # riemann_trapezoid puts n points 1/(n-1) apart but weighs them 1/n (its weights sum to (n-1)/n, not 1):
    # the same points as our trapezoid with n-1 steps, scaled by (n-1)/n
    theirs = ig.attribute(emb, baselines=base, n_steps=17, method="riemann_trapezoid").sum(-1)[0]
    ours, fx, fb = integrated_gradients(model, ids, target, steps=16, baseline=tok.pad_id)
    assert torch.allclose(ours * 16 / 17, theirs.float(), atol=1e-5, rtol=1e-4), (ours, theirs)
    assert abs(float(ours.sum()) - (fx - fb)) < abs(float(theirs.sum()) - (fx - fb))  # ours is the complete one
