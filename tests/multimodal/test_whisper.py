"""The Whisper-style model: cached decoding equals the full forward, padding changes nothing, shape checks."""
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.whisper import Whisper, WhisperConfig, sinusoids

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread joins cost more than ops


def _tiny(**kw) -> Whisper:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, n_audio_ctx=50, n_text_ctx=16)
    return Whisper(WhisperConfig(**{**cfg, **kw})).eval()


def test_cached_decoding_matches_the_full_forward():
    model = _tiny()
    mel, tokens = torch.randn(2, 80, 100), torch.randint(0, 100, (2, 9))
    full = model(mel, tokens)
    enc, mask = model.encode(mel)
    state = model.new_state(enc, mask, 12)
    steps = [model.step(tokens[:, :4], state)] + [model.step(tokens[:, i:i + 1], state) for i in range(4, 9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # beam reordering keeps each row's own cache
    state = model.new_state(enc, mask, 12)
    model.step(tokens[:, :4], state)
    state.reorder(torch.tensor([1, 1, 0]))
    nxt = model.step(tokens[[1, 1, 0], 4:5], state)
    assert torch.allclose(nxt[2], full[0, 4:5], atol=1e-5) and torch.allclose(nxt[0], full[1, 4:5], atol=1e-5)


@pytest.mark.parametrize("short", [60, 61])
def test_a_padded_row_decodes_as_it_does_alone(short):
    model = _tiny()
    mel, tokens = torch.randn(2, 80, 100), torch.randint(0, 100, (2, 6))
    mel[1, :, short:] = 0.0
    batched = model(mel, tokens, frames=torch.tensor([100, short]))
    alone = model(mel[1:, :, :short], tokens[1:])
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_encoder_is_the_one_transformer_and_output_is_tied():
    model = _tiny()
    assert type(model.encoder).__name__ == "Transformer" and not model.encoder.config.causal
    assert model.head(torch.eye(32)[None]).shape == (1, 32, 100)
    assert torch.allclose(model.head(torch.eye(32)[None])[0], model.tok_emb.weight.t())


def test_sinusoids_are_whispers():
    pos = sinusoids(10, 8)
    assert torch.allclose(pos[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    assert pos[3, 0] == pytest.approx(torch.sin(torch.tensor(3.0)).item(), abs=1e-6)


def test_bad_shapes_and_configs_are_refused():
    model = _tiny()
    with pytest.raises(LmstackError, match="n_mels=80"):
        model.encode(torch.randn(1, 40, 20))
    with pytest.raises(LmstackError, match="over the model's limit"):
        model.encode(torch.randn(1, 80, 101))
    enc, _ = model.encode(torch.randn(1, 80, 20))
    with pytest.raises(LmstackError, match="n_text_ctx"):
        model.decode(torch.zeros(1, 17, dtype=torch.long), enc)
    with pytest.raises(ConfigError, match="divisible"):
        WhisperConfig(d_model=30, n_heads=4)
