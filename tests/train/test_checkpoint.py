import json

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset
from lmstack.train.checkpoint import CheckpointManager
from lmstack.train.rng import restore_rng, rng_state
from lmstack.train.state_io import flatten, load_tree, save_tree, unflatten


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = Transformer(preset("llama-tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    state = opt.state_dict()
    save_tree(state, tmp_path / "opt")
    back = load_tree(tmp_path / "opt")
    assert back["param_groups"] == state["param_groups"]
    assert set(back["state"]) == set(state["state"]) and all(isinstance(k, int) for k in back["state"])
    for k in state["state"]:
        for name, v in state["state"][k].items():
            assert torch.equal(back["state"][k][name], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back)


def test_flatten_keeps_containers_and_key_types():
    tree = {1: (torch.ones(2), "a"), "x": [None, 2.5, {3: torch.zeros(1)}], "t": True}
    tensors, skel = flatten(tree)
    back = unflatten(json.loads(json.dumps(skel)), tensors)
    assert isinstance(back[1], tuple) and torch.equal(back[1][0], torch.ones(2)) and back["x"][1] == 2.5
    assert 3 in back["x"][2] and back["t"] is True
    with pytest.raises(LmstackError, match="cannot save a object"):
        flatten({"bad": object()})


@pytest.mark.parametrize("skeleton, why", [
    (b'{"__tensor__": "missing"}', "corrupt training-state skeleton"),      # names a tensor that is not there
    (b'{"__dict__": [[1]]}', "corrupt training-state skeleton"),             # a dict entry that is not a pair
    (b'{"__set__": []}', "corrupt training-state skeleton"),                 # an unknown container
    (b"[" * 100_000, "cannot read training state"),                        # nesting past the recursion limit
    (b"\xff\xfe{}", "cannot read training state"),                           # not UTF-8
    (b'{"a": ', "Expecting value at line 1"),
])
def test_a_corrupt_state_file_raises_a_named_error(tmp_path, skeleton, why):
    save_tree({"w": torch.ones(2)}, tmp_path / "opt")
    (tmp_path / "opt.json").write_bytes(skeleton)
    with pytest.raises(LmstackError, match=why) as e:
        load_tree(tmp_path / "opt")
    assert "opt.json" in str(e.value)
    (tmp_path / "opt.safetensors").write_bytes(b"garbage")
    (tmp_path / "opt.json").write_text("{}")
    with pytest.raises(LmstackError, match="cannot read training state .*opt.safetensors"):
        load_tree(tmp_path / "opt")


def test_rng_state_restores_every_generator():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    state = rng_state({"g": g})
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    restore_rng(state, {"g": g})
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b


def test_checkpoints_are_atomic_pruned_verified_and_fall_back(tmp_path):
    model = Transformer(preset("llama-tiny"))
    opt = torch.optim.AdamW(model.parameters())
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        mgr.save(step, model, opt.state_dict(), {"step": step})
    assert [p.name for p in mgr.list()] == ["step_00000020", "step_00000030"]
    (tmp_path / ".step_00000040.abc.tmp").mkdir()  # a killed save leaves only a hidden temp dir
    assert mgr.latest().name == "step_00000030"
    weights = mgr.list()[-1] / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncate the newest
    messages = []
    assert mgr.latest(log=messages.append).name == "step_00000020"
    assert "size mismatch in model/model.safetensors" in messages[0] and "moved to" in messages[0]
    assert [p.name for p in mgr.corrupt()] == ["step_00000030"]  # moved aside, not deleted
    _, _, extra = mgr.load(mgr.list()[-1])
    assert extra["step"] == 20
    state = mgr.list()[-1] / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped: only the hash can tell
    state.write_bytes(bytes(data))
    messages.clear()
    assert mgr.latest(log=messages.append) is None
    assert "checksum mismatch in state.safetensors" in messages[0]
    assert [p.name for p in mgr.corrupt()] == ["step_00000020", "step_00000030"] and mgr.exists()


def test_resume_refuses_a_changed_model_config(tmp_path):
    model = Transformer(preset("llama-tiny"))
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, model, {}, {})
    with pytest.raises(LmstackError, match="n_layers: checkpoint has 2, config has 3"):
        mgr.load(path, model_config=preset("llama-tiny", n_layers=3))
