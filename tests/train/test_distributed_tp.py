"""Tensor-parallel inference on 2 CPU processes (gloo), the 2-D FSDP2 x TP layout on 4, and the errors
for models that cannot be split.

Inference: for model families that stress different parts of the split (gpt2: biases on every
projection, non-gated MLP, learned positions; llama with ALiBi + sliding window: per-head slopes;
mixtral: MoE layers stay replicated; qwen2 + QK-norm: a per-head norm on local heads), the TP model's
logits must equal a single process's within 1e-5, greedy decoding through the KV cache must produce
the same tokens, each rank's KV cache must be 1/2 the size, and every gradient must equal the single
process's.
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset

from test_distributed import spawn  # tests/train is on sys.path under pytest

CONFIGS = {
    "gpt2": ("gpt2-tiny", {}),
    "llama_alibi_window": ("llama-tiny", {"n_kv_heads": 2, "position": "alibi", "sliding_window": 6}),
    "mixtral": ("mixtral-tiny", {"n_kv_heads": 2}),
    "qwen2_qk_norm": ("qwen2-tiny", {"qk_norm": True}),
}


def _env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _grad_report(model, ref, ids) -> dict:
    """Backward through both models; every gradient must be whole on each rank (no pending Partial sums:
    the optimizer and gradient noise read them as ordinary tensors) and equal the single process's."""
    from torch.distributed.tensor import DTensor, Partial

    model.train(), ref.train()
    model(ids).square().mean().backward()
    ref(ids).square().mean().backward()
    partial, worst = [], 0.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        g = p.grad
        if isinstance(g, DTensor):
            if any(isinstance(pl, Partial) for pl in g.placements):
                partial.append(name)
            g = g.full_tensor()
        worst = max(worst, (g - q.grad).abs().max().item())
    return {"partial_grads": partial, "max_grad_diff": worst}


def _inference_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _env(rank, world_size, port)
    from lmstack.model.reference_decode import reference_decode
    from lmstack.train import distributed as D

    cfg = D.DistributedConfig(strategy="tp", backend="gloo")
    D.init_distributed(cfg)
    results = {}
    try:
        for name, (preset_name, overrides) in CONFIGS.items():
            try:
                torch.manual_seed(0)
                ref = Transformer(preset(preset_name, **overrides)).eval()
                model = Transformer(ref.config).eval()
                model.load_state_dict(ref.state_dict())
                model = D.parallelize(model, cfg, torch.device("cpu"))
                ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
                with torch.no_grad():
                    diff = (model(ids) - ref(ids)).abs().max().item()
                tokens_tp = reference_decode(model, ids[:, :4], max_new_tokens=8)
                tokens_ref = reference_decode(ref, ids[:, :4], max_new_tokens=8)
                grads = _grad_report(model, ref, ids)
                results[name] = {"max_logit_diff": diff, "same_tokens": torch.equal(tokens_tp, tokens_ref), **grads,
                                 "cache_bytes": model.new_cache(2, max_len=16).nbytes(),
                                 "full_cache_bytes": ref.new_cache(2, max_len=16).nbytes()}
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        (Path(out) / f"tp_inference_rank{rank}.json").write_text(json.dumps(results))
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def tp_inference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    spawn(_inference_worker, 2, str(out))
    return [json.loads((out / f"tp_inference_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_logits_and_decoding_match_one_process(tp_inference, name):
    for rank, results in enumerate(tp_inference):
        r = results[name]
        assert "error" not in r, f"{name} failed on rank {rank}:\n{r['error']}"
        assert r["max_logit_diff"] < 1e-5
        assert r["partial_grads"] == [] and r["max_grad_diff"] < 1e-6
        assert r["same_tokens"]
        assert r["cache_bytes"] * 2 == r["full_cache_bytes"]


# ---- 2-D: FSDP2 across 2 groups x TP inside each group of 2, on 4 processes
def _two_d_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _env(rank, world_size, port)
    import test_distributed as T

    from lmstack.train import distributed as D
    from lmstack.train.parallel.memory import local_memory_bytes

    cfg = D.DistributedConfig(strategy="tp", tp_size=2, backend="gloo")
    D.init_distributed(cfg)
    try:
        dp_rank, dp_size = D.data_parallel_info(cfg)
        per = T.ROWS // dp_size
        data = T.batches()[:, dp_rank * per:(dp_rank + 1) * per]
        torch.manual_seed(0)
        raw = Transformer(T.model_config())
        model = D.parallelize(raw, cfg, torch.device("cpu"))
        opt = D.wrap_optimizer(model, T.make_optimizer, cfg)
        losses = [T.step(model, opt, data[i], D.clip_grad_norm_, D.all_reduce_mean)[0] for i in range(T.STEPS)]
        state = D.full_state_dict(model)
        result = {"dp": [dp_rank, dp_size], "losses": losses, "memory": local_memory_bytes(model, opt)}
        if D.is_main_process():
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "two_d.safetensors"))
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        (Path(out) / f"two_d_rank{rank}.json").write_text(json.dumps(result))
        D.cleanup()


@pytest.mark.slow  # 4 processes: ~35 s on 2 cores
def test_fsdp2_plus_tensor_parallel_2d_matches_one_process(tmp_path):
    import test_distributed as T
    from safetensors.torch import load_file

    spawn(_two_d_worker, 4, str(tmp_path))
    results = [json.loads((tmp_path / f"two_d_rank{r}.json").read_text()) for r in range(4)]
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank} failed:\n{r['error']}"
    assert [r["dp"] for r in results] == [[0, 2], [0, 2], [1, 2], [1, 2]]  # TP groups are neighbours
    torch.manual_seed(0)
    ref = Transformer(T.model_config())
    opt = T.make_optimizer(ref)
    losses = [T.step(ref, opt, T.batches()[i], torch.nn.utils.clip_grad_norm_)[0] for i in range(T.STEPS)]
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(losses), atol=T.LOSS_TOL, rtol=0)
    final = load_file(str(tmp_path / "two_d.safetensors"))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(final[k], v, atol=T.WEIGHT_TOL, rtol=0, msg=lambda m: f"{k}: {m}")
    # each of the 4 ranks holds about 1/4 of the projections (TP x FSDP) and 1/2 of the rest (FSDP)
    full = sum(p.numel() * 4 for p in ref.parameters())
    assert results[0]["memory"]["params"] < 0.4 * full


# ---- errors that need no processes
def test_tensor_parallel_refuses_unsplittable_models():
    from lmstack.train.distributed import check_tensor_parallel

    with pytest.raises(LmstackError, match=r"n_kv_heads=1 divisible by tp_size=2"):
        check_tensor_parallel(preset("llama-tiny"), 2)  # 4 query heads share 1 KV head
    with pytest.raises(LmstackError, match=r"n_heads=4, n_kv_heads=4, d_ff=256 divisible by tp_size=3"):
        check_tensor_parallel(preset("gpt2-tiny"), 3)
    with pytest.raises(LmstackError, match=r"d_ff=100"):
        check_tensor_parallel(preset("gpt2-tiny", d_ff=100), 8)
    with pytest.raises(LmstackError, match="attention='softmax' only"):
        check_tensor_parallel(preset("bert-tiny", attention="performer"), 2)
    check_tensor_parallel(preset("llama-tiny", n_kv_heads=2), 2)  # splits fine


def test_tp_size_must_divide_world_and_needs_tp_strategy():
    from lmstack.train.distributed import DistributedConfig
    from lmstack.train.parallel.setup import resolve_tp_size

    assert resolve_tp_size(0, 4) == 4 and resolve_tp_size(2, 4) == 2
    with pytest.raises(LmstackError, match=r"tp_size=3 must divide the world size 4 \(choose one of 1, 2, 4\)"):
        resolve_tp_size(3, 4)
    with pytest.raises(ConfigError, match="tp_size=2 needs strategy='tp'"):
        DistributedConfig(strategy="fsdp2", tp_size=2)
    with pytest.raises(ConfigError, match="tp_size must be >= 0"):
        DistributedConfig(strategy="tp", tp_size=-1)
    with pytest.raises(ConfigError, match="tp_size=1 splits nothing"):
        DistributedConfig(strategy="tp", tp_size=1)
    with pytest.raises(ConfigError, match="backend='mpi' is not allowed; choose one of 'auto', 'gloo', 'nccl'"):
        DistributedConfig(backend="mpi")
