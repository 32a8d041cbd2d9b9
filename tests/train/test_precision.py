"""Mixed precision policy: auto never picks bf16 on CPU; bf16 autocast really computes in bf16 and trains."""
import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.train.precision import Precision


def test_auto_is_fp32_on_cpu_and_bad_names_are_refused():
    prec = Precision.resolve("auto", torch.device("cpu"))
    assert prec.name == "fp32" and prec.scaler is None
    with prec.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp8'"):
        Precision.resolve("fp8", torch.device("cpu"))


def test_bf16_autocast_computes_in_bf16_and_a_step_tracks_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    x = torch.randint(0, 64, (2, 16))
    losses = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        prec = Precision.resolve(name, torch.device("cpu"))
        with prec.autocast():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        assert logits.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
        prec.backward(loss)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        losses[name] = loss.item()
    # bf16 keeps ~3 significant digits: same loss to about 1e-2, but not bit-identical.
    assert abs(losses["bf16"] - losses["fp32"]) < 2e-2
    assert losses["bf16"] != losses["fp32"]


def test_fp16_uses_a_grad_scaler():
    prec = Precision.resolve("fp16", torch.device("cpu"))
    assert isinstance(prec.scaler, torch.amp.GradScaler)
