"""multimodal/hf_clip.py: a tiny random transformers CLIPModel converts into ours and back with equal outputs."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig
from lmstack.multimodal.hf_clip import clip_from_hf, clip_to_hf, config_from_hf, weights_from_hf, weights_to_hf
from lmstack.multimodal.vit import VisionConfig

transformers = pytest.importorskip("transformers")

EOS, PAD = 3, 0


def tiny_hf(seed: int = 0, act: str = "quick_gelu"):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=act, eos_token_id=EOS,
                         bos_token_id=1, pad_token_id=PAD),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, hidden_act=act),
        projection_dim=12)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # HF inits the norms at 1/0 and biases at 0: randomise them so the mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def inputs():
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.tensor([[1, 5, 9, 11, EOS, PAD, PAD], [1, 7, 22, 30, 31, 8, EOS], [1, 4, EOS, PAD, PAD, PAD, PAD]])
    return pixels, ids


def compare(hf, ours):
    pixels, ids = inputs()
    mask = (torch.arange(ids.shape[1])[None] <= (ids == EOS).int().argmax(1)[:, None]).long()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        torch.testing.assert_close(ours.encode_image(pixels), out.image_embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(ids), out.text_embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.logits(pixels, ids), out.logits_per_image, atol=1e-4, rtol=1e-4)
        # the ViT's hidden states line up with HF's, penultimate layer included (what LLaVA reads)
        vis = hf.vision_model(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(ours.vision(pixels), vis.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.vision(pixels, layer=-2), vis.hidden_states[-2], atol=1e-4, rtol=1e-4)


def test_hf_to_ours_matches_embeddings_and_logits():
    hf = tiny_hf()
    ours = clip_from_hf(hf)
    assert ours.config.vision.activation == "quick_gelu" and ours.config.text.eos_token_id == EOS
    compare(hf, ours)


def test_ours_to_hf_and_back_round_trips():
    torch.manual_seed(2)
    cfg = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=4, d_model=24, n_layers=2, n_heads=2,
                                         d_ff=40, activation="gelu"),
                     text=TextConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16,
                                     activation="gelu", bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD),
                     embed_dim=12, init_temperature=0.05)
    ours = CLIP(cfg).eval()
    hf = clip_to_hf(ours)
    assert hf.config.text_config.hidden_act == "gelu"
    compare(hf, ours)
    back = clip_from_hf(hf)
    assert back.config.vision == cfg.vision and back.config.text == cfg.text and back.config.embed_dim == 12
    assert abs(back.config.init_temperature - 0.05) < 1e-6
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


def test_names_map_both_ways_and_refusals():
    hf = tiny_hf(act="gelu_new")
    state = hf.state_dict()
    cfg = config_from_hf(hf.config)
    assert cfg.text.activation == "gelu_tanh"
    ours = weights_from_hf(state, cfg)
    back = weights_to_hf(ours)
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    with pytest.raises(LmstackError, match="eos_token_id=2"):
        config_from_hf(transformers.CLIPConfig(text_config=dict(eos_token_id=2)))
    with pytest.raises(LmstackError, match="hidden_act='silu'"):
        config_from_hf(transformers.CLIPConfig(text_config=dict(eos_token_id=EOS, hidden_act="silu")))
    with pytest.raises(LmstackError, match="no place"):
        weights_from_hf({"text_model.pooler.weight": torch.zeros(1)}, cfg)
