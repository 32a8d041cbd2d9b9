"""Parity with transformers' Whisper: a tiny random WhisperForConditionalGeneration loads into ours and gives the
same logits to 1e-4 on our log-mel; our cached greedy decoding picks transformers' tokens; bad checkpoints."""
import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.asr import SpeechRecognizer, TaskIds, asr_tokenizer, greedy_decode
from lmstack.multimodal.audio import log_mel
from lmstack.multimodal.hf_whisper import from_hf_whisper, load_hf_whisper_dir, whisper_state_from_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread joins cost more than ops


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.WhisperConfig(vocab_size=100, num_mel_bins=80, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
                                     max_target_positions=24, decoder_start_token_id=95, pad_token_id=99,
                                     bos_token_id=99, eos_token_id=99)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves biases and norms at 0/1: perturb them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _mel() -> torch.Tensor:
    t = np.arange(16000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    return log_mel(clip, pad_to_seconds=1.0)[None]  # (1, 80, 100): 2 * max_source_positions frames


def test_logits_match_transformers_on_our_log_mel(hf_model):
    ours = from_hf_whisper(hf_model)
    mel, ids = _mel(), torch.tensor([[95, 96, 97, 98, 5, 17, 33, 2]])
    with torch.no_grad():
        theirs = hf_model(input_features=mel, decoder_input_ids=ids).logits
        mine = ours(mel, ids)
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs, atol=1e-4), float((mine - theirs).abs().max())


def test_cached_greedy_decoding_matches_transformers_uncached(hf_model, tmp_path):
    ours = from_hf_whisper(hf_model)
    ids = TaskIds(asr_tokenizer())
    mel = _mel()
    got = greedy_decode(ours, mel, None, ids, max_tokens=10)[0]
    seq = torch.tensor([ids.prompt])
    want = []
    with torch.no_grad():
        for _ in range(10):
            logits = hf_model(input_features=mel, decoder_input_ids=seq).logits[0, -1]
            logits[ids.suppress] = float("-inf")
            nxt = int(logits.argmax())
            if nxt == ids.eot:
                break
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert got == want and len(want) > 0
    # the converted model is an ordinary SpeechRecognizer: save, load, same transcript
    asr = SpeechRecognizer(ours, asr_tokenizer())
    clip = (0.2 * np.random.default_rng(0).standard_normal(12000)).astype(np.float32)
    assert SpeechRecognizer.from_dir(asr.save(tmp_path / "m")).transcribe(clip) == asr.transcribe(clip)


def test_hf_directory_loads_without_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_hf_whisper_dir(tmp_path / "hf")
    mel, ids = _mel(), torch.tensor([[95, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(ours(mel, ids), hf_model(input_features=mel, decoder_input_ids=ids).logits, atol=1e-4)


def test_a_checkpoint_that_does_not_fit_is_refused(hf_model):
    ours = from_hf_whisper(hf_model)
    state = dict(hf_model.state_dict())
    state.pop("model.decoder.layers.1.fc2.bias")
    with pytest.raises(LmstackError, match="fc2.bias"):
        whisper_state_from_hf(state, ours.config)
    state = dict(hf_model.state_dict())
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(LmstackError, match="does not use"):
        whisper_state_from_hf(state, ours.config)
