"""Every optimizer steps FSDP2-sharded (DTensor) parameters, launched with torchrun on 2 gloo processes.

The gradients are set directly (the same full tensors in both runs, each rank given its shard), so
this isolates the optimizer: after 3 steps the weights must equal a single-process run exactly for
Lion (element-wise) and Shampoo/SOAP (they gather the full gradient), and to float round-off for
the ones whose norms, means or matmuls DTensor reduces across ranks in another order."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lmstack.model import Transformer, preset
from lmstack.train.optim import OPTIMIZERS, OptimizerConfig, build_optimizer
from lmstack.train.optim.kronecker import like_param

WORKER = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[2])
    from test_optim_fsdp import make_model, train
    dist.init_process_group("gloo")
    torch.set_num_threads(int(sys.argv[4]))  # as many as the reference run: BLAS rounding depends on it
    for name in json.loads(sys.argv[3]):
        model = make_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        train(model, name)
        full = {k: v.full_tensor().contiguous() for k, v in model.state_dict().items()}
        if dist.get_rank() == 0:
            save_file(full, f"{sys.argv[1]}/{name}.safetensors")
    dist.destroy_process_group()
''')


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("mixtral-tiny", vocab_size=64, d_model=32, n_heads=2, n_layers=1))


def train(model, name: str) -> None:
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-2, precondition_frequency=2, fused=False))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = like_param(0.01 * torch.randn(p.shape, generator=g), p)  # a DTensor's own shard
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.slow  # two torchrun processes: ~15 s on an idle 2-core machine
def test_every_optimizer_matches_single_process_under_fsdp2(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    pytest.importorskip("torch.distributed.fsdp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    names = list(OPTIMIZERS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), str(Path(__file__).parent), json.dumps(names),
                           str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = {}
    for name in names:
        ref = make_model()
        train(ref, name)
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        worst[name] = max(float((sharded[k] - v).abs().max()) for k, v in ref.state_dict().items())
    assert all(worst[n] == 0.0 for n in ("lion", "soap", "shampoo")), worst  # these never reduce a DTensor
    assert all(w < 1e-5 for w in worst.values()), worst
