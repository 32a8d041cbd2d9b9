"""The navigation policy (issue 25 §2, XII.13): shapes, the instruction-blind baseline equal to the full model with
the instruction masked (and blind to its words), behaviour cloning that fits a few episodes, rollouts and their
metrics, the GRPO loss against a hand computation and a GRPO update tied to a frozen reference, save/load."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.align.rl_math import group_advantages
from lmstack.errors import LmstackError
from lmstack.multimodal.nav_policy import (NO_ACTION, BCConfig, GRPOConfig, NavPolicy, NavPolicyConfig,
                                           behaviour_clone, encode_instructions, evaluate, gold_batch, grpo,
                                           grpo_loss, history_ids, load_policy, metrics, nav_tokenizer, rollout,
                                           save_policy)
from lmstack.multimodal.nav_world import NavEnv, build_nav_world
from lmstack.multimodal.vit import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    records = build_nav_world(n_train=30, n_val=2, n_test=4, grid=5, cell=8, seed=0)
    return records, nav_tokenizer(records, vocab_size=320)


def tiny(tok, **kw) -> NavPolicy:
    torch.manual_seed(0)
    cfg = NavPolicyConfig(vision=VisionConfig(image_size=72, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                          vocab_size=tok.vocab_size, pad_id=tok.pad_id, d_model=32, n_layers=1, n_heads=2, max_instr=64,
                          **kw)
    return NavPolicy(cfg).eval()


def batch(policy, records, tok, n=6):
    envs = [NavEnv(r) for r in records]
    instr = encode_instructions(tok, [r["instruction"] for r in records], policy.config.max_instr)
    return gold_batch(policy, envs, instr, [(e, 1) for e in range(n)])


def test_shapes_and_inputs(world):
    records, tok = world
    policy = tiny(tok)
    pixels, ids, mask, hist, target = batch(policy, records, tok)
    assert pixels.shape == (6, 3, 72, 72) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    assert policy(pixels, ids, mask, hist).shape == (6, 4)
    assert target.tolist() == [r["gold_actions"][1] for r in records[:6]]
    assert hist[0].tolist() == [NO_ACTION] * 5 + [records[0]["gold_actions"][0]]
    assert history_ids([0, 1, 2], 2) == [1, 2] and history_ids([], 3) == [NO_ACTION] * 3
    with pytest.raises(LmstackError, match="longer than max_instr"):
        encode_instructions(tok, ["go past the red circle " * 20], 32)
    with pytest.raises(LmstackError, match="instr and instr_mask"):
        policy(pixels, ids[:, :5], mask[:, :4], hist)
    with pytest.raises(LmstackError, match="instr and instr_mask"):
        policy(pixels, torch.cat([ids, ids], 1), torch.cat([mask, mask], 1), hist)  # past max_instr
    # padding columns past the longest instruction change nothing
    longest = int(mask.sum(1).max())
    assert longest < ids.shape[1]
    with torch.no_grad():
        narrow = policy(pixels, ids[:, :longest], mask[:, :longest], hist)
        assert torch.allclose(narrow, policy(pixels, ids, mask, hist), atol=1e-6)


def test_instruction_matters_and_blind_equals_masked(world):
    records, tok = world
    full = tiny(tok)
    blind = tiny(tok, mask_instruction=True)
    blind.load_state_dict(full.state_dict())
    pixels, ids, mask, hist, _ = batch(full, records, tok)
    other_ids, other_mask = encode_instructions(tok, [records[-1]["instruction"]] * 6, 64)
    with torch.no_grad():
        a, b = full(pixels, ids, mask, hist), full(pixels, other_ids, other_mask, hist)
        assert (a - b).abs().max() > 1e-4  # the words reach the action
        hidden = full(pixels, ids, torch.zeros_like(mask), hist)  # every instruction key masked
        c, d = blind(pixels, ids, mask, hist), blind(pixels, other_ids, other_mask, hist)
    assert torch.allclose(c, d) and torch.allclose(c, hidden, atol=1e-5)


def test_behaviour_cloning_fits_a_few_episodes(world):
    records, tok = world
    few = [r for r in records if r["split"] == "train" and r["gold_len"] <= 8][:2]
    policy = tiny(tok)
    before = metrics(rollout(policy, tok, few))
    out = behaviour_clone(policy, tok, few, BCConfig(steps=45, batch_size=16, lr=4e-3, warmup=5))
    assert out["pairs"] == sum(r["gold_len"] for r in few)
    assert sum(out["losses"][-10:]) / 10 < 0.3 < 1.0 < out["losses"][0]
    after = metrics(rollout(policy, tok, few))
    assert before["success"] == 0.0 and after["success"] == 1.0 and after["spl"] == 1.0


def test_rollout_modes_and_metrics(world):
    records, tok = world
    policy = tiny(tok)
    eps = records[:4]
    assert rollout(policy, tok, eps) == rollout(policy, tok, eps)  # greedy is deterministic
    s1, s2 = (rollout(policy, tok, eps, mode="sample", seed=3) for _ in range(2))
    assert s1 == s2
    rnd = rollout(None, None, eps, mode="random", seed=0)
    assert all(1 <= r["steps"] <= 2 * r["gold_len"] + 4 for r in rnd)
    kept = rollout(policy, tok, eps[:1], mode="sample", keep=True)[0]
    assert len(kept["obs"]) == len(kept["hist"]) == kept["steps"]
    with pytest.raises(LmstackError, match="rollout mode"):
        rollout(policy, tok, eps, mode="beam")
    m = metrics([{"success": True, "spl": 0.5, "steps": 4}, {"success": False, "spl": 0.0, "steps": 6}])
    assert m["success"] == 0.5 and m["n"] == 2 and m["success_stderr"] == pytest.approx(0.5 / math.sqrt(2))
    assert m["spl"] == 0.25 and m["spl_stderr"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))
    assert evaluate(None, None, eps, mode="random")["n"] == 4
    wrong = tiny(tok)
    wrong.config.vision = VisionConfig(image_size=40, patch_size=8, d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(LmstackError, match="vision.image_size"):
        rollout(wrong, tok, eps)


def test_grpo_loss_by_hand():
    logp = torch.tensor([-0.1, -0.5, -1.0], requires_grad=True)
    ref = torch.tensor([-0.2, -0.5, -0.7])
    adv, rows = torch.tensor([1.0, -2.0]), torch.tensor([0, 0, 1])
    k3 = lambda lp, rp: math.exp(rp - lp) - 1 - (rp - lp)  # noqa: E731
    want0 = (-1.0 * -0.1 + 0.1 * k3(-0.1, -0.2) + -1.0 * -0.5 + 0.1 * k3(-0.5, -0.5)) / 2
    want1 = 2.0 * -1.0 + 0.1 * k3(-1.0, -0.7)
    loss = grpo_loss(logp, ref, adv, rows, kl_coef=0.1)
    assert float(loss.detach()) == pytest.approx((want0 + want1) / 2, rel=1e-5)
    loss.backward()
    assert float(logp.grad[0]) == pytest.approx((-1.0 + 0.1 * (1 - math.exp(-0.1))) / 2 / 2, rel=1e-4)
    adv, valid = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert adv[0] > 0 > adv[1] and bool(valid.all())


def test_grpo_needs_mixed_groups_and_moves_the_policy(world):
    records, tok = world
    few = [r for r in records if r["split"] == "train" and r["gold_len"] <= 8][:2]
    policy = tiny(tok)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    # an untrained policy never succeeds: every reward 0, every advantage 0, and at the first update the KL to
    # the reference (itself) is 0 too, so nothing moves
    out = grpo(policy, tok, few, GRPOConfig(updates=1, episodes=2, group_size=4, lr=1e-2))
    assert out["stats"][0]["success"] == 0.0 and out["stats"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(start[k], v) for k, v in policy.state_dict().items())
    # half-trained, some sampled rollouts succeed and some fail: the update moves the policy
    behaviour_clone(policy, tok, few, BCConfig(steps=25, batch_size=16, lr=4e-3, warmup=5))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    out = grpo(policy, tok, few, GRPOConfig(updates=2, episodes=2, group_size=6, lr=1e-2, seed=1))
    assert 0.0 < sum(s["success"] for s in out["stats"]) / 2 < 1.0
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert out["stats"][1]["kl"] >= 0.0
    with pytest.raises(LmstackError, match="group_size"):
        GRPOConfig(group_size=1)


def test_save_load_round_trip_and_bad_dirs(world, tmp_path):
    records, tok = world
    policy = tiny(tok)
    pixels, ids, mask, hist, _ = batch(policy, records, tok)
    path = save_policy(policy, tok, tmp_path / "nav")
    back, tok2 = load_policy(path)
    with torch.no_grad():
        assert torch.equal(back(pixels, ids, mask, hist), policy(pixels, ids, mask, hist))
    assert tok2.encode(records[0]["instruction"]) == tok.encode(records[0]["instruction"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["policy"]["d_model"] = 64
    cfg["policy"]["vision"]["d_model"] = 32
    (tmp_path / "bad").mkdir()
    save_file(load_file(str(path / "model.safetensors")), str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="shape"):
        load_policy(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "lmstack_vlm"}')
    with pytest.raises(LmstackError, match="not a navigation policy"):
        load_policy(tmp_path / "bad")
    with pytest.raises(LmstackError, match="no config.json"):
        load_policy(tmp_path / "missing")
    (path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(LmstackError, match="cannot be read"):
        load_policy(path)
