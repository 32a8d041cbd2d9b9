"""Padded vocabularies in the model: the LM head gives rows past real_vocab_size zero probability, in training
(finite loss, no gradient into those rows, finite KL / entropy terms) and through save/load and HF export."""
import json

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.vocab import PAD_LOGIT, check_vocab, emit_vocab_size, padded_real_vocab_size

REAL, ROWS = 50, 64


def _model(real=REAL, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=ROWS, real_vocab_size=real, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                      hf_model_type="llama", **kw)
    return lmstack.Transformer(cfg)


def test_head_gives_padded_rows_zero_probability_and_leaves_real_rows_alone():
    padded, plain = _model(), _model(real=None)
    plain.load_state_dict(padded.state_dict())
    idx = torch.randint(0, REAL, (2, 10))
    lp, lq = padded(idx), plain(idx)
    assert torch.equal(lp[..., :REAL], lq[..., :REAL])                  # real rows: the same numbers
    assert (lp[..., REAL:] == PAD_LOGIT).all()
    assert (lp.softmax(-1)[..., REAL:] == 0).all()                      # exactly zero mass, not just small
    assert lq.softmax(-1)[..., REAL:].sum() > 0                          # without the mask they hold mass
    # The padded model's distribution is the plain model's softmax over the real rows only.
    torch.testing.assert_close(lp.log_softmax(-1)[..., :REAL], lq[..., :REAL].log_softmax(-1))
    # real_vocab_size == vocab_size is no padding at all
    full = _model(real=ROWS)
    full.load_state_dict(plain.state_dict())
    assert torch.equal(full(idx), lq)


def test_training_through_the_mask_stays_finite_and_never_touches_padded_rows():
    model = _model(tie_embeddings=False)
    idx = torch.randint(0, REAL, (4, 12))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    assert torch.isfinite(loss) and loss.item() < 10
    loss.backward()
    g = model.lm_head.weight.grad
    assert (g[REAL:] == 0).all() and g[:REAL].abs().sum() > 0
    # Terms that multiply probabilities by log-probabilities (distillation KL, PPO entropy) stay finite:
    # 0 * PAD_LOGIT is 0, where 0 * -inf would be NaN.
    with torch.no_grad():
        teacher = _model()(idx[:, :-1]).float()
        log_p_s, log_p_t = F.log_softmax(logits.float() / 2.0, -1), F.log_softmax(teacher / 2.0, -1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        probs = logits.float().softmax(-1)
        entropy = torch.logsumexp(logits.float(), -1) - (probs * logits.float()).sum(-1)
    assert torch.isfinite(kl).all() and (kl >= -1e-5).all()
    assert torch.isfinite(entropy).all() and (entropy <= torch.log(torch.tensor(float(REAL))) + 1e-4).all()


def test_half_precision_mask_stays_finite():
    model = _model().to(torch.float16)
    out = model(torch.randint(0, REAL, (1, 5)))
    assert torch.isfinite(out).all() and (out.float().softmax(-1)[..., REAL:] == 0).all()


def test_real_vocab_size_is_validated():
    with pytest.raises(ConfigError, match="real_vocab_size=70 must be None or between 1 and vocab_size=64"):
        ModelConfig(vocab_size=64, real_vocab_size=70)
    with pytest.raises(ConfigError, match="real_vocab_size"):
        ModelConfig(vocab_size=64, real_vocab_size=0)


def test_padded_real_vocab_size_covers_tokenizer_and_objective_ids():
    assert padded_real_vocab_size(4096, 3743) == 3743
    assert padded_real_vocab_size(4096, 4096) is None
    assert padded_real_vocab_size(512, 300, reserved=[511]) is None         # an MLM mask id at the top is real
    assert padded_real_vocab_size(512, 300, reserved=[400, 401]) == 402


def test_real_vocab_size_round_trips_through_our_layout_and_hf_export(tmp_path):
    model = _model()
    for name, cfg_kw in (("ours", dict(hf_model_type="")), ("hf", {})):
        m = model if not cfg_kw else lmstack.Transformer(model.config.replace(**cfg_kw))
        m.load_state_dict(model.state_dict())
        path = lmstack.save_model(m, tmp_path / name)
        back = lmstack.load_model(path)
        assert back.config.real_vocab_size == REAL
        idx = torch.randint(0, REAL, (1, 7))
        assert torch.equal(back(idx), m(idx))
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["vocab_size"] == ROWS
    assert hf_cfg["lmstack_real_vocab_size"] == REAL
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(REAL, ROWS))
    # config.json alone (no lmstack_config.json beside it) still carries the real size
    (tmp_path / "hf" / "lmstack_config.json").unlink()
    assert lmstack.load_model(tmp_path / "hf").config.real_vocab_size == REAL


def test_transformers_loads_the_padded_export_and_never_generates_padded_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model()
    with torch.no_grad():  # make the padded rows loud: unmasked, they would win every argmax
        model.lm_head.weight[REAL:] = torch.randn(ROWS - REAL, 32) * model.lm_head.weight[:REAL].std() * 50
    path = lmstack.save_model(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    idx = torch.randint(0, REAL, (1, 6))
    with torch.no_grad():
        theirs = hf(idx).logits
        ours = model(idx)
    torch.testing.assert_close(theirs[..., :REAL], ours[..., :REAL], atol=1e-4, rtol=1e-4)
    assert theirs[0, -1].argmax() >= REAL                     # transformers' raw logits are not masked ...
    out = hf.generate(idx, max_new_tokens=8, do_sample=False)  # ... but generate() reads suppress_tokens
    assert (out[0, 6:] < REAL).all()


class _Tok:
    def __init__(self, n):
        self.vocab_size = n


def test_check_vocab_names_both_sizes_and_paths():
    cfg = _model().config
    assert check_vocab(cfg, _Tok(40)) == 40 == emit_vocab_size(cfg, _Tok(40))
    assert check_vocab(cfg, None) == REAL == emit_vocab_size(cfg)
    with pytest.raises(LmstackError) as e:
        check_vocab(cfg, _Tok(60), model_path="runs/m", tokenizer_path="runs/tok", what="generate")
    msg = str(e.value)
    assert msg.startswith("generate: ") and "60 tokens" in msg and "50 real tokens of its 64 rows" in msg
    assert "runs/m" in msg and "runs/tok" in msg and "\n" not in msg
    assert check_vocab(torch.nn.Identity(), _Tok(40)) == 40        # a model without a config: the tokenizer's ids
    with pytest.raises(LmstackError, match="neither the model nor a tokenizer"):
        check_vocab(torch.nn.Identity(), None)
