"""Exact resume: for every optimizer, k steps + save + rebuild + load + more steps gives parameters
bit-identical to an uninterrupted run (CPU fp32), with the state passed through the checkpoint
format (safetensors + JSON), a schedule driving group["lr"], an MoE model (3-D expert tensors) and a
Shampoo/SOAP preconditioner refresh on both sides of the interruption."""
import json

import pytest
import torch
import torch.nn.functional as F

from lmstack.model import Transformer, preset
from lmstack.train.optim import OPTIMIZERS, OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier
from lmstack.train.state_io import flatten, unflatten

TOTAL, CUT = 6, 3
SCHED = ScheduleConfig(name="cosine", warmup_steps=2)


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("mixtral-tiny", vocab_size=64, d_model=32, n_heads=2, n_layers=1))


def _steps(model, opt, start, stop):
    losses = []
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(SCHED, step, TOTAL)
        x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step % 2))
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()) + model.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_is_bit_exact(name):
    cfg = OptimizerConfig(name=name, lr=3e-3, layer_lr_decay=0.8, precondition_frequency=2, adafactor_beta1=0.9)
    ref = _model(0)
    ref_opt = build_optimizer(ref, cfg)
    ref_losses = _steps(ref, ref_opt, 0, TOTAL)

    first = _model(0)
    opt = build_optimizer(first, cfg)
    _steps(first, opt, 0, CUT)
    tensors, skeleton = flatten(opt.state_dict())             # what a checkpoint stores
    saved_state = unflatten(json.loads(json.dumps(skeleton)), {k: v.clone() for k, v in tensors.items()})
    saved_weights = {k: v.clone() for k, v in first.state_dict().items()}
    del first, opt

    resumed = _model(1)                                         # a different init, overwritten by the checkpoint
    resumed.load_state_dict(saved_weights)
    opt = build_optimizer(resumed, cfg)
    opt.load_state_dict(saved_state)
    losses = _steps(resumed, opt, CUT, TOTAL)
    assert losses == ref_losses[CUT:]
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    moved = [n for (n, a), (_, b) in zip(ref.named_parameters(), _model(0).named_parameters()) if not torch.equal(a, b)]
    assert len(moved) == len(list(ref.parameters()))  # every tensor was trained, so every state entry mattered
