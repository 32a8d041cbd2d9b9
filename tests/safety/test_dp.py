"""DP-SGD (lmstack.safety.dp) and its RDP accountant (lmstack.safety.rdp): per-sample gradients against an explicit
loop, clipping bounds, the no-noise limit equals the plain mean gradient, Poisson batches, epsilon against
opacus and a hand case, the inverse (sigma for an epsilon), refusals, and a `lmstack finetune --dp.epsilon` run."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from safetensors.torch import load_file
import torch

from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.finetune import FinetuneConfig, finetune
from lmstack.adapt.registry import get_peft_model
from lmstack.cli import run
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_io import save_model
from lmstack.safety.dp import (DPSGD, DPConfig, PoissonLoader, clip_and_sum, per_sample_grads, row_loss,
                               trainable_parameters)
from lmstack.safety.rdp import DEFAULT_ORDERS, epsilon, rdp_sampled_gaussian, sigma_for_epsilon
from lmstack.tokenizer import train_tokenizer
from lmstack.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, B = 40, 12, 5


def _model(method: str = "full") -> torch.nn.Module:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                    hf_model_type="llama", init_std=0.2))
    if method != "full":
        model = get_peft_model(model, AdapterConfig(method=method, r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # give B a value, so the LoRA gradients of A are not all zero
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    return model.train()


def _batch(rows: int = B, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T + 1), generator=g)
    mask = torch.rand(rows, T, generator=g) < 0.6
    mask[0] = False  # a row with no counted token: a zero gradient, not NaN
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
            "lengths": torch.full((rows,), T)}


def _loop_grads(model, batch) -> list[dict[str, torch.Tensor]]:
    """The reference: one forward/backward per row."""
    params = trainable_parameters(model)
    out = []
    for i in range(batch["input_ids"].shape[0]):
        logits = model(batch["input_ids"][i:i + 1])[0]
        loss = row_loss(logits, batch["targets"][i], batch["loss_mask"][i])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append({k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)})
    return out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_per_sample_grads_match_a_loop_and_clipping_bounds_each_norm(method):
    model, batch = _model(method), _batch()
    grads, losses = per_sample_grads(model, trainable_parameters(model), batch)
    ref = _loop_grads(model, batch)
    assert set(grads) == set(ref[0]) and losses.shape == (B,)
    for i, r in enumerate(ref):
        for k in r:
            torch.testing.assert_close(grads[k][i], r[k], atol=1e-5, rtol=1e-4)
    assert all(float(g[0].abs().max()) == 0.0 for g in grads.values())  # the row with no counted token

    norms = [math.sqrt(sum(float(v.pow(2).sum()) for v in r.values())) for r in ref]
    c = sorted(norms)[len(norms) // 2]  # the median: some rows get clipped, some do not
    summed, seen = clip_and_sum(grads, c)
    torch.testing.assert_close(torch.tensor(norms[1:]), seen[1:], rtol=1e-4, atol=1e-6)
    for i, r in enumerate(ref):
        scale = min(1.0, c / (norms[i] + 1e-6))
        clipped = math.sqrt(sum(float((v * scale).pow(2).sum()) for v in r.values()))
        assert clipped <= c * (1 + 1e-5)
    for k in summed:  # the sum of the loop's clipped gradients
        want = sum(r[k] * min(1.0, c / (norms[i] + 1e-6)) for i, r in enumerate(ref))
        torch.testing.assert_close(summed[k], want, atol=1e-5, rtol=1e-4)


def test_no_noise_and_a_huge_clip_give_the_plain_mean_gradient():
    model, batch = _model(), _batch()
    dp = DPSGD(sigma=0.0, max_grad_norm=1e9, sample_rate=1.0, expected_batch=B, delta=1e-5)
    dp.privatize(model, batch, torch.Generator().manual_seed(0), chunk=2)  # chunks of 2, 2, 1 rows
    got = {k: p.grad.clone() for k, p in trainable_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"])
    loss = torch.stack([row_loss(logits[i], batch["targets"][i], batch["loss_mask"][i]) for i in range(B)]).mean()
    loss.backward()
    for k, p in trainable_parameters(model).items():
        torch.testing.assert_close(got[k], p.grad, atol=1e-6, rtol=1e-4)


def test_noise_has_std_sigma_c_over_the_expected_batch():
    model = _model("lora")
    dp = DPSGD(sigma=2.0, max_grad_norm=0.5, sample_rate=0.1, expected_batch=4, delta=1e-5)
    empty = {k: v[:0] for k, v in _batch().items()}  # an empty Poisson batch: a noise-only step
    m = dp.privatize(model, empty, torch.Generator().manual_seed(0))
    noise = torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()])
    assert m["batch_rows"] == 0 and noise.numel() > 500
    assert abs(float(noise.std()) - 2.0 * 0.5 / 4) < 0.02 and abs(float(noise.mean())) < 0.02


def test_poisson_loader_samples_at_the_rate_and_resumes_exactly():
    packed = _batch(rows=200)
    loader = PoissonLoader(packed, expected_batch=20, chunk=8, seed=3)
    sizes = [next(loader)["input_ids"].shape[0] for _ in range(200)]
    assert loader.sample_rate == 0.1 and abs(sum(sizes) / len(sizes) - 20) < 1.5 and len(set(sizes)) > 3
    state = loader.state_dict()
    nxt = next(loader)["input_ids"]
    again = PoissonLoader(packed, expected_batch=20, chunk=8, seed=3)
    again.load_state_dict(state)
    assert torch.equal(next(again)["input_ids"], nxt)
    with pytest.raises(LmstackError, match="expected batch of 300 rows cannot be sampled from 200"):
        PoissonLoader(packed, expected_batch=300, chunk=8)


# ---- the accountant
SETTINGS = [(0.01, 1.1, 1000, 1e-5), (0.004, 0.8, 2500, 1e-6), (0.05, 2.0, 300, 1e-5), (0.1, 0.7, 50, 1e-5),
            (0.02, 5.0, 10_000, 1e-5)]


@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_epsilon_matches_opacus_rdp_accountant(q, sigma, steps, delta):
    accountants = pytest.importorskip("opacus.accountants")
    acc = accountants.RDPAccountant()
    acc.history = [(sigma, q, steps)]
    theirs = acc.get_epsilon(delta)
    ours = epsilon(steps, q, sigma, delta, orders=accountants.RDPAccountant.DEFAULT_ALPHAS)
    assert ours == pytest.approx(theirs, rel=1e-6)  # same orders: the same number
    assert epsilon(steps, q, sigma, delta) == pytest.approx(theirs, rel=0.01)  # our own grid: within 1%


def test_rdp_by_hand():
    # order 2 sums three terms: (1-q)^2 + 2q(1-q) + q^2 e^(1/sigma^2) = 1 + q^2 (e^(1/sigma^2) - 1)
    q, s = 0.03, 0.9
    assert rdp_sampled_gaussian(q, s, 2) == pytest.approx(math.log(1 + q * q * (math.exp(1 / s**2) - 1)), rel=1e-12)
    # a fractional order lies between its integer neighbours (RDP grows with the order)
    assert rdp_sampled_gaussian(q, s, 2) < rdp_sampled_gaussian(q, s, 2.5) < rdp_sampled_gaussian(q, s, 3)
    # no subsampling: the Gaussian mechanism, rdp = alpha / (2 sigma^2); sigma 2, 10 steps, delta 1e-5
    steps, sigma, delta = 10, 2.0, 1e-5
    by_hand = min(steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
                  for a in DEFAULT_ORDERS)
    assert epsilon(steps, 1.0, sigma, delta) == pytest.approx(by_hand, rel=1e-12)
    assert 8.07 < by_hand < 8.09  # at alpha 3.8: 10 * 3.8 / 8 + (11.51 - 1.34) / 2.8 + log(2.8 / 3.8) = 8.08
    assert epsilon(0, 0.1, 1.0, 1e-5) == 0.0 and epsilon(5, 0.1, 0.0, 1e-5) == math.inf


@pytest.mark.parametrize("target", [8.0, 1.0])
def test_sigma_for_epsilon_is_the_least_noise_within_the_budget(target):
    steps, q, delta = 600, 0.02, 1e-5
    sigma = sigma_for_epsilon(target, steps, q, delta)
    assert epsilon(steps, q, sigma, delta) <= target
    assert epsilon(steps, q, sigma * 0.99, delta) > target  # any less noise overspends
    dp = DPSGD.from_config(DPConfig(epsilon=target), rows=500, expected_batch=10, steps=steps)
    assert dp.sigma == pytest.approx(sigma) and dp.epsilon_spent(steps) <= target


def test_unreachable_targets_and_bad_settings_are_refused():
    with pytest.raises(LmstackError, match=r"epsilon=0.001 at delta=1e-05 cannot be reached in 10000 steps at "
                                           r"sample rate 0.5: even noise multiplier sigma=1000"):
        sigma_for_epsilon(0.001, 10_000, 0.5, 1e-5)
    with pytest.raises(LmstackError, match="delta=0 must lie in"):
        sigma_for_epsilon(1.0, 100, 0.01, 0)
    with pytest.raises(LmstackError, match="delta=1.5 must lie in"):
        epsilon(100, 0.01, 1.0, 1.5)
    with pytest.raises(LmstackError, match="sample_rate=2"):
        epsilon(100, 2, 1.0, 1e-5)
    with pytest.raises(LmstackError, match="target epsilon=-1"):
        sigma_for_epsilon(-1, 100, 0.01, 1e-5)
    with pytest.raises(ConfigError, match="dp.delta"):
        DPConfig(epsilon=8, delta=0)
    with pytest.raises(ConfigError, match="dp.max_grad_norm"):
        DPConfig(epsilon=8, max_grad_norm=0)
    with pytest.raises(LmstackError, match="dp.noise_multiplier=0.3 spends epsilon=.* more than dp.epsilon=1"):
        DPSGD.from_config(DPConfig(epsilon=1, noise_multiplier=0.3), rows=100, expected_batch=10, steps=100)


# ---- the finetune run
def _base_and_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(10) for b in range(6)]
    tok = train_tokenizer(texts=[json.dumps(r) for r in rows], type="char", show_progress=False,
                          special_tokens="chat")
    torch.manual_seed(0)
    base = save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                              max_seq_len=64, hf_model_type="llama", bos_token_id=tok.bos_id,
                                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)),
                      tmp_path / "base", tokenizer=tok)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data


def test_finetune_with_dp_epsilon_reports_the_epsilon_spent(tmp_path, capsys):
    base, data = _base_and_data(tmp_path)
    out = tmp_path / "dp"
    summary = run(["finetune", "--data", str(data), "--model", str(base), "--out", str(out), "--dp.epsilon", "8",
                   "--dp.max_grad_norm", "1.0", "--dp.delta", "1e-4", "--batch_size", "4", "--seq_len", "48",
                   "--val_fraction", "0.1", "--train.steps", "6", "--train.eval_every", "0", "--train.log_every",
                   "2", "--train.progress", "false", "--train.threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    dp = summary["dp"]
    assert 7.0 < dp["epsilon"] <= 8.0 and dp["max_grad_norm"] == 1.0 and dp["sampling"] == "poisson" and dp["noise_multiplier"] > 0
    assert json.loads((out / "summary.json").read_text())["dp"]["epsilon"] == dp["epsilon"]
    assert any("spent epsilon=" in line for line in lines) and any("packing off" in line for line in lines)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in logged if "epsilon" in r]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp["epsilon"])
    # with dp.noise_multiplier alone there is no target: the run reports what that sigma spent
    summary = finetune(FinetuneConfig(data=str(data), model=str(base), out=str(tmp_path / "sigma"), batch_size=4,
                                      seq_len=48, dp=DPConfig(noise_multiplier=1.0, delta=1e-4),
                                      train=TrainConfig(steps=3, eval_every=0, progress=False, threads=1)),
                       log=lambda _: None)
    assert summary["dp"]["noise_multiplier"] == 1.0 and 0 < summary["dp"]["epsilon"] < 10
    # a curriculum cannot be combined with Poisson batches
    with pytest.raises(LmstackError, match="curriculum='easy_to_hard' cannot be used with DP-SGD"):
        run(["finetune", "--data", str(data), "--model", str(base), "--out", str(tmp_path / "x"),
             "--dp.epsilon", "8", "--dp.max_grad_norm", "1.0", "--curriculum", "easy_to_hard"])


@pytest.mark.slow  # three short runs: about 6 s on a busy 2-core machine
def test_a_resumed_dp_run_draws_the_same_batches_and_noise(tmp_path):
    base, data = _base_and_data(tmp_path)

    def cfg(name):
        return FinetuneConfig(data=str(data), model=str(base), out=str(tmp_path / name), batch_size=4, seq_len=48,
                              val_fraction=0.1, method="lora", dp=DPConfig(epsilon=4.0),
                              train=TrainConfig(steps=6, save_every=3, eval_every=0, progress=False, threads=1))

    whole = finetune(cfg("whole"), log=lambda _: None)
    finetune(cfg("cut"), log=lambda _: None)
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    shutil.rmtree(ckpts[-1])  # as if killed after step 3
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = finetune(cfg("cut"), log=lambda _: None)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-6)
    assert resumed["dp"]["epsilon"] == whole["dp"]["epsilon"] and resumed["steps"] == 6
    got = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
