"""Video encoders (temporal, divided space-time, frame-mean baseline), clip checks, VideoCLIP and VideoQA."""
import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import TextConfig, clip_loss
from lmstack.multimodal.video_model import (ENCODERS, VideoCLIP, VideoCLIPConfig, VideoConfig, VideoQA,
                                            VideoQAConfig, build_video_encoder, clip_to_pixels, n_video_tokens)
from lmstack.multimodal.vit import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # two threads collapse on the shared cores
TINY = VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=2, n_heads=2)


def _encoder(kind: str, frames: int = 4):
    torch.manual_seed(0)
    enc = build_video_encoder(VideoConfig(vision=TINY, frames=frames, encoder=kind, temporal_layers=1)).eval()
    with torch.no_grad():  # large random weights: attention far from uniform, so order effects are not hidden
        for p in enc.parameters():
            p.normal_(0, 0.3)
    return enc


def _clip(b: int = 2, frames: int = 4) -> torch.Tensor:
    return torch.rand(b, frames, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_reversed_clip_changes_every_encoder_but_the_frame_mean(kind):
    enc, x = _encoder(kind), _clip()
    with torch.no_grad():
        fwd, rev = enc.encode(x), enc.encode(x.flip(1))
    assert fwd.shape == (2, 32)
    if kind == "mean":
        torch.testing.assert_close(fwd, rev, atol=1e-6, rtol=1e-6)  # equal up to the order of a float sum
    else:
        assert (fwd - rev).abs().max() > 1e-4  # 100x that rounding


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_tokens_have_the_advertised_count(kind):
    enc = _encoder(kind)
    with torch.no_grad():
        tokens = enc.tokens(_clip())
    assert tokens.shape == (2, n_video_tokens(enc.config), 32)


def test_divided_attention_mixes_frames_and_the_per_frame_vit_does_not():
    x = _clip(1)
    y = x.clone()
    y[:, 0] = -y[:, 0]  # change the first frame only
    div, mean = _encoder("divided"), _encoder("mean")
    with torch.no_grad():
        assert (div.tokens(x)[:, 3] - div.tokens(y)[:, 3]).abs().max() > 1e-3  # frame 3 saw frame 0 through time
        fx, fy = mean.frame_vectors(x), mean.frame_vectors(y)
    torch.testing.assert_close(fx[:, 1:], fy[:, 1:])
    assert (fx[:, 0] - fy[:, 0]).abs().max() > 1e-3


def test_clip_to_pixels_checks_frames_size_and_dtype():
    good = np.full((4, 16, 16, 3), 255, dtype=np.uint8)
    px = clip_to_pixels(good, frames=4, size=16)
    assert px.shape == (4, 3, 16, 16) and float(px.max()) == 1.0
    with pytest.raises(LmstackError, match="no frames"):
        clip_to_pixels(np.zeros((0, 16, 16, 3), np.uint8), frames=4, size=16)
    with pytest.raises(LmstackError, match="3 frames; this model reads exactly 4"):
        clip_to_pixels(good[:3], frames=4, size=16)
    with pytest.raises(LmstackError, match="16x16 RGB"):
        clip_to_pixels(np.zeros((4, 8, 16, 3), np.uint8), frames=4, size=16)
    with pytest.raises(LmstackError, match="uint8"):
        clip_to_pixels(good.astype(np.float32), frames=4, size=16)
    with pytest.raises(LmstackError, match="numpy array"):
        clip_to_pixels([[1]], frames=4, size=16)


def test_encoder_refuses_empty_or_misshapen_clips():
    enc = _encoder("temporal")
    with pytest.raises(LmstackError, match="no frames"):
        enc.encode(torch.zeros(1, 0, 3, 16, 16))
    with pytest.raises(LmstackError, match="reads exactly 4"):
        enc.encode(torch.zeros(1, 5, 3, 16, 16))
    with pytest.raises(LmstackError, match=r"\(3, 16, 16\)"):
        enc.encode(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(LmstackError, match="batch, frames"):
        enc.encode(torch.zeros(4, 3, 16, 16))
    with pytest.raises(LmstackError, match="floats"):
        enc.encode(torch.zeros(1, 4, 3, 16, 16, dtype=torch.uint8))


def test_config_names_bad_values():
    with pytest.raises(LmstackError, match="encoder"):
        VideoConfig(encoder="lstm")
    with pytest.raises(LmstackError, match="frames"):
        VideoConfig(frames=0)


def test_qa_logits_do_not_depend_on_padding():
    torch.manual_seed(0)
    qa = VideoQA(VideoQAConfig(video=VideoConfig(vision=TINY, frames=4, encoder="temporal", temporal_layers=1),
                               vocab_size=50, n_answers=7, d_model=32, n_layers=1, n_heads=2, max_question_len=12)).eval()
    x = _clip(1)
    short = torch.tensor([[0, 5, 6, 1]])
    padded = torch.tensor([[0, 5, 6, 1, 2, 2, 2]])
    with torch.no_grad():
        alone = qa(x, short)
        with_pad = qa(x, padded, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
        unmasked = qa(x, padded)
    assert alone.shape == (1, 7)
    torch.testing.assert_close(alone, with_pad, atol=1e-5, rtol=1e-5)
    assert (alone - unmasked).abs().max() > 1e-4  # the mask is what makes them equal
    with pytest.raises(LmstackError, match="max_question_len"):
        qa(x, torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(LmstackError, match="0..49"):
        qa(x, torch.tensor([[0, 50, 1]]))


def test_video_clip_loss_is_clip_loss_of_scaled_cosines():
    torch.manual_seed(0)
    cfg = VideoCLIPConfig(video=VideoConfig(vision=TINY, frames=4, encoder="mean"),
                          text=TextConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, max_seq_len=16),
                          embed_dim=16)
    model = VideoCLIP(cfg).eval()
    x, ids = _clip(3), torch.tensor([[0, 5, 1, 2], [0, 6, 7, 1], [0, 8, 1, 2]])
    with torch.no_grad():
        loss = model(x, ids)
        want = clip_loss(model.scale() * model.encode_video(x) @ model.encode_text(ids).T)
    torch.testing.assert_close(loss, want)
    assert model.encode_video(x).norm(dim=-1).sub(1).abs().max() < 1e-5
    with pytest.raises(LmstackError, match="EOS"):
        model.encode_text(torch.tensor([[0, 5, 6]]))
    with pytest.raises(LmstackError, match="3 clips, 2 texts"):
        model(x, ids[:2])
