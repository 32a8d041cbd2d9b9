"""The offline preference trainer: a few steps raise preference accuracy and margins (dpo, cdpo, ipo, kto);
precomputed reference log-probs and an adapters-off reference give the same training as a frozen copy;
a reference with another tokenizer is refused."""
import contextlib
import sys
import types

import pytest
import torch
from align_helpers import make_policy

from lmstack.align.config import AlignConfig
from lmstack.align.dpo import PreferenceTrainer
from lmstack.align.losses import preference_loss
from lmstack.align.logprobs import sequence_logprobs, collate, encode_pair
from lmstack.align.preference_data import Pair, pairs_from_records
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def pairs(world):
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] in ("harmful", "benign", "helpfulness")]
    return pairs_from_records(recs[:8]).pairs


def _cfg(method="dpo", **kw):
    base = dict(method=method, batch_size=4, max_len=128,
                train={"steps": 12, "progress": False, "eval_every": 0, "log_every": 5}, optim={"lr": 3e-3},
                schedule={"warmup_steps": 0})
    for nested in ("train", "optim", "schedule"):  # a test's nested keys override the helper's, key by key
        kw[nested] = {**base[nested], **kw.get(nested, {})}
    return AlignConfig(**{**base, **kw})


@pytest.mark.parametrize("method,extra", [("dpo", {}), ("cdpo", {"label_smoothing": 0.1}), ("ipo", {}),
                                          ("kto", {})])
def test_a_few_steps_raise_preference_accuracy_and_margin(tok, pairs, method, extra):
    trainer = PreferenceTrainer(make_policy(tok), tok, _cfg(method, **extra), log=lambda s: None)
    summary = trainer.fit(pairs, pairs)
    before, after = summary["val_before"], summary["val_after"]
    # at the start policy == reference: every implicit reward is 0, no pair is won
    assert before["accuracy"] == 0.0 and before["margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["accuracy"] >= 0.8, after
    assert after["margin"] > 0.05 and after["chosen_reward"] > after["rejected_reward"]
    assert summary["history"] and {"loss", "accuracy", "chosen_reward", "rejected_reward", "lr",
                                   "grad_norm"} <= set(summary["history"][-1])
    if method == "kto":
        assert "kl" in summary["history"][-1]
    else:
        assert "margin" in summary["history"][-1]


def _losses(trainer, pairs, steps=3):
    trainer.cfg.train.steps = steps
    return [h["loss"] for h in trainer.fit(pairs, [])["history"]]


def test_precomputed_reference_equals_frozen_copy(tok, pairs):
    every_step = {"log_every": 1}
    copy_losses = _losses(PreferenceTrainer(make_policy(tok), tok, _cfg(train=every_step), log=lambda s: None), pairs)
    pre = PreferenceTrainer(make_policy(tok), tok, _cfg(reference="precomputed", train=every_step),
                            log=lambda s: None)
    pre_losses = _losses(pre, pairs)
    assert pre.reference is None  # the copy was dropped after precomputing
    assert pre_losses == pytest.approx(copy_losses, abs=1e-5)
    with pytest.raises(LmstackError, match="no precomputed reference"):
        pre.evaluate([Pair("an unseen prompt", "a", "b")])


def test_adapters_disabled_reference_hook(tok, pairs, monkeypatch):
    """reference='adapters' asks lmstack.adapt.disable_adapters(model) for the reference. A stand-in that
    swaps the starting weights back in (what disabling zero-initialised LoRA adapters amounts to) must give
    exactly the frozen-copy training."""
    policy = make_policy(tok)
    start = {k: v.clone() for k, v in policy.state_dict().items()}

    @contextlib.contextmanager
    def disable_adapters(model):
        now = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.load_state_dict(start)
        try:
            yield model
        finally:
            with torch.no_grad():
                model.load_state_dict(now)

    fake = types.ModuleType("lmstack.adapt")
    fake.disable_adapters = disable_adapters
    monkeypatch.setitem(sys.modules, "lmstack.adapt", fake)
    adapter_losses = _losses(PreferenceTrainer(policy, tok, _cfg(reference="adapters", train={"log_every": 1}),
                                               log=lambda s: None), pairs)
    copy_losses = _losses(PreferenceTrainer(make_policy(tok), tok, _cfg(train={"log_every": 1}), log=lambda s: None),
                          pairs)
    assert adapter_losses == pytest.approx(copy_losses, abs=1e-5)


def test_adapters_reference_without_lmstack_adapt_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmstack.adapt", types.ModuleType("lmstack.adapt"))  # no disable_adapters
    with pytest.raises(LmstackError, match="disable_adapters"):
        PreferenceTrainer(make_policy(tok), tok, _cfg(reference="adapters"))


def test_reference_with_another_tokenizer_is_refused(tok, world):
    other = train_tokenizer(texts=[r["text"] for r in world.corpus("arithmetic")], type="bpe", vocab_size=320,
                            special_tokens="chat", show_progress=False)
    with pytest.raises(LmstackError, match="policy tokenizer.*reference tokenizer"):
        PreferenceTrainer(make_policy(tok), tok, _cfg(), reference=make_policy(other), reference_tokenizer=other)


def test_confidence_as_weight_or_smoothing(tok):
    policy = make_policy(tok)
    pairs = [Pair("Tell me about Amberhaven.", "A lovely city by the river.", "No.", confidence=1.0),
             Pair("Hi", "Hello, how can I help?", "Go away.", confidence=0.7)]
    # move the policy off the reference so the loss is not at its symmetric point
    trainer = PreferenceTrainer(policy, tok, _cfg(confidence_as="weight"), log=lambda s: None)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    batch = collate([encode_pair(tok, *t) for t in texts], tok.pad_id)
    with torch.no_grad():
        pol = sequence_logprobs(policy, batch)
        ref = sequence_logprobs(trainer.reference, batch)
        weighted = trainer.paired_loss(pairs)["loss"]
        expect = preference_loss("dpo", pol[:2], pol[2:], ref[:2], ref[2:], weights=torch.tensor([1.0, 0.7]))["loss"]
        assert float(weighted) == pytest.approx(float(expect), abs=1e-5)
        trainer.cfg.confidence_as = "smoothing"
        smoothed = trainer.paired_loss(pairs)["loss"]
        expect = preference_loss("dpo", pol[:2], pol[2:], ref[:2], ref[2:], label_smoothing=torch.tensor([0.0, 0.3]))
        assert float(smoothed) == pytest.approx(float(expect["loss"]), abs=1e-5)


def test_config_refuses_unknown_methods_and_bad_values():
    with pytest.raises(ConfigError, match="choose one of rm, dpo, cdpo, ipo, kto, ppo, trpo, grpo, rloo, rft"):
        AlignConfig(method="sppo")
    with pytest.raises(ConfigError, match="temperature"):
        AlignConfig(method="ppo", temperature=0)
    with pytest.raises(ConfigError, match="kl_target needs kl_coef"):
        AlignConfig(method="ppo", kl_target=1.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        AlignConfig(method="cdpo")
    with pytest.raises(ConfigError, match="beta"):
        AlignConfig(beta=0)
    with pytest.raises(ConfigError, match="precomputed"):
        AlignConfig(method="kto", reference="precomputed")


def test_rpo_adds_the_chosen_nll_and_holds_up_the_chosen_likelihood(tok, pairs):
    from lmstack.align.logprobs import token_logprobs

    plain = PreferenceTrainer(make_policy(tok), tok, _cfg(), log=lambda s: None)
    rpo = PreferenceTrainer(make_policy(tok), tok, _cfg(rpo_alpha=0.5), log=lambda s: None)
    part = pairs[:4]
    out_plain, out_rpo = plain.paired_loss(part), rpo.paired_loss(part)
    # The NLL, computed independently: mean over every chosen token of -log π(token).
    batch = collate([encode_pair(tok, p.prompt, p.chosen) for p in part], tok.pad_id, 128)
    with torch.no_grad():
        lp = token_logprobs(rpo.policy, batch)
    nll = -lp.sum() / batch["completion_mask"][:, 1:].sum()
    assert float(out_rpo["nll"].detach()) == pytest.approx(float(nll), rel=1e-5)
    assert float(out_rpo["loss"].detach()) == pytest.approx(float(out_plain["loss"].detach()) + 0.5 * float(nll), rel=1e-5)
    # Trained alike, the RPO policy ends with a higher likelihood of the chosen replies than plain DPO's.
    chosen = lambda t: float(sequence_logprobs(t.policy, t._batch([(p.prompt, p.chosen) for p in pairs])).mean())  # noqa: E731
    plain.cfg.train.steps = rpo.cfg.train.steps = 15
    plain.fit(pairs, pairs)
    summary = rpo.fit(pairs, pairs)
    with torch.no_grad():
        assert chosen(rpo) > chosen(plain) + 1.0
    assert summary["val_after"]["accuracy"] >= 0.8 and "nll" in summary["history"][-1]
    with pytest.raises(ConfigError, match="rpo_alpha"):
        AlignConfig(rpo_alpha=-1.0)
