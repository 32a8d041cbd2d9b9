"""multimodal/vq.py: the VQ-VAE with a codebook (EMA, dead-code restarts) or a lookup-free quantizer."""
import json
import math

import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.multimodal.vq import VQVAE, LookupFreeQuantizer, VectorQuantizer, VQConfig, codebook_stats, load_vq, \
    psnr, train_vq

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(quantizer: str, **kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQConfig(image_size=16, hidden=16, downsample=2, quantizer=quantizer, codebook_size=16,
                          code_dim=4, **kw))


def world_pixels(n: int = 24, size: int = 16) -> torch.Tensor:
    return to_pixels([render(Scene.from_dict(r["scene"])) for r in build_vision_world(n, 32, seed=1)], size)


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_encode_decode_shapes_and_equal_code_bits(quantizer):
    vq = tiny(quantizer)
    x = world_pixels(4)
    codes = vq.encode(x)
    assert codes.shape == (4, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    out = vq.decode(codes)
    assert out.shape == (4, 3, 16, 16) and float(out.abs().max()) <= 1.0
    assert vq.code_bits == 16 * 4  # a 4x4 grid of 4-bit codes, whichever quantizer


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_training_lowers_reconstruction_error(quantizer):
    vq = tiny(quantizer)
    x = world_pixels(24)
    before = psnr(vq.decode(vq.encode(x)), x)
    history = train_vq(vq, x, steps=120, batch_size=8, lr=1e-2, seed=0, log_every=40)
    after = psnr(vq.decode(vq.encode(x)), x)
    assert [h["step"] for h in history] == [40, 80, 120]
    assert after > before + 2.5, (before, after)  # measured: +6.0 dB (vq), +4.3 dB (lfq)


def test_decode_refuses_codes_outside_the_codebook_naming_the_id():
    vq = tiny("vq")
    codes = torch.zeros(1, 16, dtype=torch.long)
    codes[0, 3] = 16
    with pytest.raises(LmstackError, match="code id 16 is outside the codebook"):
        vq.decode(codes)
    with pytest.raises(LmstackError, match="code id -1"):
        vq.decode(codes * 0 - 1)
    with pytest.raises(LmstackError, match=r"shape \(N, 16\)"):
        vq.decode(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(LmstackError, match="integers"):
        vq.decode(torch.zeros(1, 16))
    with pytest.raises(LmstackError, match=r"pixels must have shape \(N, 3, 16, 16\)"):
        vq.encode(torch.zeros(1, 3, 32, 32))


def test_ema_moves_the_codebook_without_gradients_and_only_in_training():
    vq = tiny("vq", ema_decay=0.9)
    assert "quantizer.codebook" not in dict(vq.named_parameters())  # state, not a parameter
    x = world_pixels(8)
    before = vq.quantizer.codebook.clone()
    vq.eval()
    vq(x)
    assert torch.equal(vq.quantizer.codebook, before)
    vq.train()
    vq(x)
    assert not torch.equal(vq.quantizer.codebook, before)
    # ema_decay=0: the codebook is a parameter that its own loss term moves
    grad_book = tiny("vq", ema_decay=0.0)
    _, _, loss = grad_book(x)
    loss.backward()
    assert grad_book.quantizer.codebook.grad is not None and grad_book.quantizer.codebook.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_the_encoder():
    for quantizer in ("vq", "lfq"):
        vq = tiny(quantizer)
        _, _, loss = vq(world_pixels(4))
        loss.backward()
        first = vq.encoder[0].weight.grad
        assert first is not None and first.abs().sum() > 0, quantizer


def test_dead_codes_restart_on_encoder_outputs():
    cfg = VQConfig(quantizer="vq", codebook_size=8, code_dim=2, dead_after=1, ema_decay=0.0)
    q = VectorQuantizer(cfg)
    with torch.no_grad():
        q.codebook[:] = 100.0  # far from every latent...
        q.codebook[0] = 0.0    # ...but row 0, which takes every vector
    z = torch.randn(4, 2, 3, 3)
    q.train()
    _, codes, _ = q(z)
    assert set(codes.flatten().tolist()) == {0}
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for row in q.codebook[1:]:  # each restarted row now sits on one of the batch's latents
        assert torch.isclose(flat, row[None]).all(1).any()
    _, codes, _ = q(z)
    assert len(set(codes.flatten().tolist())) > 1  # the restarted codes are used at once
    off = VectorQuantizer(VQConfig(quantizer="vq", codebook_size=8, code_dim=2, dead_after=0, ema_decay=0.0))
    with torch.no_grad():
        off.codebook[:] = 100.0
        off.codebook[0] = 0.0
    off.train()
    off(z)
    assert float(off.codebook.detach()[1:].min()) == 100.0  # dead_after=0: no restarts


def test_lfq_codes_are_the_latent_signs_as_bits():
    q = LookupFreeQuantizer(VQConfig(quantizer="lfq", codebook_size=8))
    z = torch.tensor([[0.5, -2.0, 0.1], [-0.3, 0.2, 0.9]])  # two latents of 3 bits
    zz = z.T.reshape(1, 3, 1, 2)  # (N=1, D=3, h=1, w=2)
    q_st, codes, _ = q(zz)
    assert codes.tolist() == [[1 + 4, 2 + 4]]  # bit i = (z_i > 0), little-endian
    assert torch.equal(q.lookup(codes)[0], torch.sign(z))
    assert torch.equal(q_st.reshape(3, 2).T, torch.sign(z))


def test_lfq_entropy_penalty_prefers_confident_spread_codes():
    q = LookupFreeQuantizer(VQConfig(quantizer="lfq", codebook_size=4, entropy_temperature=0.1))
    spread = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    collapsed = torch.tensor([[1.0, 1.0]] * 4)
    unsure = torch.zeros(4, 2)
    assert q.entropy_penalty(spread) < q.entropy_penalty(collapsed)
    assert q.entropy_penalty(spread) < q.entropy_penalty(unsure)
    assert float(q.entropy_penalty(spread)) == pytest.approx(-math.log(4), abs=1e-3)


def test_codebook_stats_and_psnr_arithmetic():
    stats = codebook_stats(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), 8)
    assert stats["usage"] == 0.5 and stats["used"] == 4 and stats["perplexity"] == pytest.approx(4.0)
    assert codebook_stats(torch.zeros(3, 5, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.2, x) == pytest.approx(20.0)  # mse 0.04 over a peak-to-peak of 2: 10 log10(4 / 0.04)


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_save_load_round_trip(tmp_path, quantizer):
    vq = tiny(quantizer)
    train_vq(vq, world_pixels(8), steps=3, batch_size=4)
    codes = vq.encode(world_pixels(3))
    vq.save(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["vq_config.json", "vq_model.safetensors"]
    back = load_vq(tmp_path / "vq")
    assert back.cfg == vq.cfg
    assert torch.equal(back.decode(codes), vq.decode(codes))
    assert torch.equal(back.encode(world_pixels(3)), codes)


def test_load_refuses_bad_directories(tmp_path):
    with pytest.raises(LmstackError, match="not found"):
        load_vq(tmp_path / "nothing")
    vq = tiny("vq")
    vq.save(tmp_path / "a")
    cfg_file = tmp_path / "a" / "vq_config.json"
    meta = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(meta, quantizer="fsq")))
    with pytest.raises(ConfigError, match="quantizer='fsq'"):
        load_vq(tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(meta, format="other")))
    with pytest.raises(LmstackError, match="not an lmstack VQ-VAE config"):
        load_vq(tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(meta, hidden=8)))
    with pytest.raises(LmstackError, match="does not fit"):
        load_vq(tmp_path / "a")


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="codebook_size=100 must be a power of two"):
        VQConfig(codebook_size=100)
    with pytest.raises(ConfigError, match="image_size=30 must be a multiple of 2\\*\\*downsample=4"):
        VQConfig(image_size=30)
    with pytest.raises(ConfigError, match="ema_decay"):
        VQConfig(ema_decay=1.0)
