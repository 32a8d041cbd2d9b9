"""Distributed training on 2 CPU processes (gloo), as torchtitan tests it.

One mp.spawn runs every strategy in turn (starting processes costs more than the training): for each,
5 AdamW steps with gradient clipping on a tiny qwen2-style model (qkv biases, tied embeddings, GQA,
QK-norm) with a fixed global batch of 4 rows. The parent then checks the loss trajectory, gradient
norms, final weights and final optimizer moments against a single process fed the same global batch,
that saving and resuming through the gathered (full) states continues exactly, and that the FSDP2
checkpoint loads in one process with the same logits.

Tolerance: fp32 all-reduce and reduce-scatter add the ranks' partial gradients in another order than
one process does, and tensor parallelism splits matmul sums, so results differ by rounding only.
Losses must agree within 1e-5 (measured: <= 5e-7) and weights within 1e-4 absolute (measured: 5e-6
for ddp/zero1/fsdp2, 3e-5 for tp; Adam divides by sqrt(v), so for gradients near zero a rounding
difference becomes an update difference of up to lr * 1e-3 per step).
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset

STEPS, RESUME_AT, ROWS, SEQ = 5, 3, 4, 16
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4
STRATEGIES = ["ddp", "zero1", "fsdp2", "fsdp2_ac", "tp", "fsdp2_moe_shared", "zero1_moe_shared"]


def model_config(name: str = ""):
    """The tiny model of a case: qwen2-style (qkv biases, tied embeddings, GQA) with QK-norm; cases named
    *_moe_shared use a mixtral-style MoE whose 3 layers share 2 blocks (ALBERT-style).
    The MoE load-balancing loss is off: it is a product of batch statistics, so the mean of each rank's
    loss is not the loss of the global batch (data parallelism changes it by design, ~1e-2 here)."""
    if name.endswith("_moe_shared"):
        return preset("mixtral-tiny", vocab_size=128, max_seq_len=32, n_layers=3, n_unique_layers=2,
                      router_aux_loss_coef=0.0)
    return preset("qwen2-tiny", vocab_size=128, max_seq_len=32, qk_norm=True)


def batches() -> torch.Tensor:
    """(STEPS, ROWS, SEQ+1) token ids: one fixed global batch, seen at every step (so the loss falls)."""
    rows = torch.randint(0, 128, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return rows.expand(STEPS, -1, -1)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))


def step(model, optimizer, rows: torch.Tensor, clip, mean=float) -> tuple[float, float]:
    """One optimizer step; returns (global mean loss, gradient norm before clipping)."""
    logits = model(rows[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    norm = clip([p for p in model.parameters()], 0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean(float(loss.detach())), float(norm)


# ---- the distributed side (runs in the spawned processes)
def _run_strategy(name: str, out: Path) -> dict:
    from lmstack.model.hf_io import load_model, save_model
    from lmstack.train import distributed as D
    from lmstack.train.state_io import load_tree, save_tree

    strategy, ac = name.split("_")[0], name.endswith("_ac")
    cfg = D.DistributedConfig(strategy=strategy, backend="gloo", activation_checkpointing=ac)
    dp_rank, dp_size = D.data_parallel_info(cfg)
    per = ROWS // dp_size
    data = batches()[:, dp_rank * per:(dp_rank + 1) * per]

    def build(seed: int):
        torch.manual_seed(seed)
        raw = Transformer(model_config(name))
        model = D.parallelize(raw, cfg, torch.device("cpu"))
        return raw, model, D.wrap_optimizer(model, make_optimizer, cfg)

    raw, model, opt = build(0)
    forwards = []
    raw.blocks[0].attn.register_forward_hook(lambda *_: forwards.append(1))
    losses, norms = [], []
    for i in range(STEPS):
        if i == RESUME_AT:  # a checkpoint the way the trainer writes one: gathered, then safetensors
            state, opt_state = D.full_state_dict(model), D.full_optimizer_state_dict(model, opt)
            if D.is_main_process():
                save_model(raw, out / f"{name}_ckpt", state_dict=state)
                save_tree(opt_state, out / f"{name}_ckpt" / "optimizer")
            D.barrier()
        loss, norm = step(model, opt, data[i], D.clip_grad_norm_, D.all_reduce_mean)
        losses.append(loss)
        norms.append(norm)
    forwards_per_step = len(forwards) / STEPS
    # per-rank bytes with everything alive at once: weights, gradients (one more backward) and moments
    F.cross_entropy(model(data[0, :, :-1]).flatten(0, 1), data[0, :, 1:].flatten()).backward()
    memory = D.local_memory_bytes(model, opt)
    # gradient noise drawn whole (same seed everywhere) lands on each rank's shard of every gradient
    noise_ok = True
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
        before = D.gather_full(p.grad)
        p.grad.add_(D.distribute_like(noise, p.grad))
        noise_ok &= torch.allclose(D.gather_full(p.grad), before + noise)
    opt.zero_grad(set_to_none=True)
    final, final_opt = D.full_state_dict(model), D.full_optimizer_state_dict(model, opt)
    # state kept beside the model (EMA weights, say) is gathered the same way, on every rank
    beside = D.gather_full({"ema": {k: v.detach().clone() for k, v in raw.state_dict().items()}, "n": [1]})
    gathered_ok = beside["n"] == [1] and all(torch.equal(beside["ema"][k], v) for k, v in final.items())
    with torch.no_grad():
        logits = model(batches()[0, :, :-1])

    # resume: a fresh model with other weights, loaded from the checkpoint, must continue identically
    _, model2, opt2 = build(1)
    D.load_full_state_dict(model2, load_model(out / f"{name}_ckpt").state_dict())
    D.load_full_optimizer_state_dict(model2, opt2, load_tree(out / f"{name}_ckpt" / "optimizer"))
    resumed = [step(model2, opt2, data[i], D.clip_grad_norm_, D.all_reduce_mean)[0] for i in range(RESUME_AT, STEPS)]
    resumed_state = D.full_state_dict(model2)
    if D.is_main_process():
        from safetensors.torch import save_file

        save_model(raw, out / f"{name}_final", state_dict=final)
        save_tree(final_opt, out / f"{name}_final_optimizer")
        save_file({"logits": logits.contiguous()}, str(out / f"{name}_logits.safetensors"))
        save_file({k: v.contiguous() for k, v in resumed_state.items()}, str(out / f"{name}_resumed.safetensors"))
    return {"losses": losses, "norms": norms, "resumed_losses": resumed, "memory": memory, "gathered_ok": gathered_ok,
            "noise_ok": noise_ok,
            "block0_forwards_per_step": forwards_per_step}


def _worker(rank: int, world_size: int, port: int, out: str, names: list[str]) -> None:
    # The environment torchrun would give each process; init_distributed reads it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lmstack.train import distributed as D

    got = D.init_distributed(D.DistributedConfig(backend="auto"))
    out = Path(out)
    try:
        for name in names:
            try:
                result = {"init": [got[0], got[1], str(got[2])], **_run_strategy(name, out)}
            except Exception:  # keep going: one broken strategy should not hide the others
                result = {"error": traceback.format_exc()}
            (out / f"{name}_rank{rank}.json").write_text(json.dumps(result))
            D.barrier()
    finally:
        D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world_size: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


# ---- the single-process reference and the checks
def reference(name: str = "") -> dict:
    """The single-process run: the whole global batch in one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    torch.manual_seed(0)
    ref = Transformer(model_config(name))
    opt = make_optimizer(ref)
    losses, norms = [], []
    for i in range(STEPS):
        loss, norm = step(ref, opt, batches()[i], torch.nn.utils.clip_grad_norm_)
        losses.append(loss)
        norms.append(norm)
    ref_opt = get_optimizer_state_dict(ref, opt, options=StateDictOptions(full_state_dict=True))
    return {"losses": losses, "norms": norms, "model": ref, "optimizer": ref_opt}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spawn(_worker, 2, str(out), STRATEGIES)
    return out, {"": reference(), "moe_shared": reference("x_moe_shared")}


def load_result(out: Path, name: str, rank: int = 0) -> dict:
    result = json.loads((out / f"{name}_rank{rank}.json").read_text())
    assert "error" not in result, f"{name} failed on rank {rank}:\n{result['error']}"
    return result


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_matches_single_process(runs, name):
    from lmstack.model.hf_io import load_model
    from lmstack.train.state_io import load_tree

    out, refs = runs
    ref = refs["moe_shared" if name.endswith("_moe_shared") else ""]
    result = load_result(out, name)
    assert result["init"] == [0, 2, "cpu"]
    assert ref["norms"][0] > 0.5, "clipping should be active in this test"
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), atol=LOSS_TOL, rtol=0)
    torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(ref["norms"]), atol=LOSS_TOL, rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # the run really trains
    assert result["gathered_ok"] and result["noise_ok"]
    final = load_model(out / f"{name}_final").state_dict()
    expected = ref["model"].state_dict()
    assert set(final) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, atol=WEIGHT_TOL, rtol=0, msg=lambda m: f"{name} weight {k}: {m}")
    # the gathered optimizer state has the same moments as the single process's
    opt = load_tree(out / f"{name}_final_optimizer")
    assert set(opt["state"]) == set(ref["optimizer"]["state"])
    for param, moments in ref["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(opt["state"][param][key], value, atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"{name} optimizer {param}.{key}: {m}")
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.1, 0.0]


@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_from_gathered_checkpoint_continues_identically(runs, name):
    from safetensors.torch import load_file

    from lmstack.model.hf_io import load_model

    out, _ = runs
    result = load_result(out, name)
    torch.testing.assert_close(torch.tensor(result["resumed_losses"]), torch.tensor(result["losses"][RESUME_AT:]),
                               atol=1e-6, rtol=0)
    resumed = load_file(str(out / f"{name}_resumed.safetensors"))
    final = load_model(out / f"{name}_final").state_dict()
    for k, v in final.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=0)


def test_fsdp2_checkpoint_loads_in_one_process_with_same_logits(runs):
    import lmstack
    from safetensors.torch import load_file

    out, _ = runs
    model = lmstack.load_model(out / "fsdp2_final")
    sharded_logits = load_file(str(out / "fsdp2_logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model(batches()[0, :, :-1])
    torch.testing.assert_close(logits, sharded_logits, atol=1e-5, rtol=0)


def test_sharding_cuts_per_rank_memory(runs):
    out, _ = runs
    mem = {name: [load_result(out, name, r)["memory"] for r in (0, 1)] for name in ("ddp", "zero1", "fsdp2", "tp")}
    ddp = mem["ddp"][0]
    assert mem["ddp"][1] == ddp  # replicas hold the same bytes
    for r in (0, 1):
        # ZeRO-3: params, grads and Adam moments are each split in two (up to padding of odd rows)
        assert mem["fsdp2"][r]["total"] <= 0.55 * ddp["total"]
        # ZeRO-1: whole params and grads, but only this rank's share of the moments
        assert mem["zero1"][r]["params"] == ddp["params"]
        assert mem["zero1"][r]["optimizer"] < 0.75 * ddp["optimizer"]
        # TP: the projections are split, embeddings and norms are not
        assert mem["tp"][r]["params"] < 0.8 * ddp["params"]
        assert mem["fsdp2"][r]["grads"] <= 0.55 * ddp["grads"] and ddp["grads"] == ddp["params"]
    assert sum(m["optimizer"] for m in mem["zero1"]) == pytest.approx(ddp["optimizer"], rel=0.01)


def test_activation_checkpointing_recomputes_each_block(runs):
    out, _ = runs
    # block 0 runs once per forward; with checkpointing its forward runs again in the backward pass
    assert load_result(out, "fsdp2")["block0_forwards_per_step"] == 1
    assert load_result(out, "fsdp2_ac")["block0_forwards_per_step"] == 2


# ---- without torchrun: one process, nothing changes
def test_single_process_without_torchrun(monkeypatch):
    from lmstack.train import distributed as D

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = D.DistributedConfig(strategy="fsdp2", backend="gloo", activation_checkpointing=True)
    assert D.init_distributed(cfg) == (0, 1, torch.device("cpu"))
    assert D.is_main_process() and D.all_reduce_mean(3.5) == 3.5 and D.data_parallel_info(cfg) == (0, 1)
    model = Transformer(model_config())
    assert D.parallelize(model, cfg, torch.device("cpu")) is model and model.checkpoint_blocks
    opt = D.wrap_optimizer(model, make_optimizer, D.DistributedConfig(strategy="zero1"))
    assert type(opt) is torch.optim.AdamW
    step(model, opt, batches()[0], D.clip_grad_norm_)
    state = D.full_state_dict(model)
    assert set(state) == set(model.state_dict()) and all(v.device.type == "cpu" for v in state.values())
    opt_state = D.full_optimizer_state_dict(model, opt)
    assert "tok_emb.weight" in opt_state["state"]  # keyed by name, the same format in every strategy
    D.barrier()
    D.cleanup()


def test_clip_grad_norm_matches_torch():
    from lmstack.train.distributed import clip_grad_norm_

    for max_norm in (1e-3, 1e3):
        torch.manual_seed(0)
        a, b = Transformer(model_config()), Transformer(model_config())
        b.load_state_dict(a.state_dict())
        for m in (a, b):
            F.cross_entropy(m(batches()[0, :, :-1]).flatten(0, 1), batches()[0, :, 1:].flatten()).backward()
        ours = clip_grad_norm_(a.parameters(), max_norm)
        theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        torch.testing.assert_close(ours, theirs)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_config_errors_name_the_field():
    from lmstack.config import from_dict
    from lmstack.train.distributed import DistributedConfig
    from lmstack.train.parallel.setup import resolve_backend

    with pytest.raises(ConfigError, match="strategy='zero3' is not allowed; choose one of 'none', 'ddp', 'fsdp2'"):
        from_dict(DistributedConfig, {"strategy": "zero3"})
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        DistributedConfig(timeout_s=0)
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "gloo"
        with pytest.raises(LmstackError, match="backend='nccl' needs CUDA"):
            resolve_backend("nccl")
