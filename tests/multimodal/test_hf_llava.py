"""HF LlavaForConditionalGeneration <-> our projector VLM (multimodal/hf_llava.py): a tiny random Llava built from
a config (no download) gives the same logits in ours on an image + text input, and ours exported back does too."""
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig
from lmstack.multimodal.hf_llava import config_from_llava, config_to_llava, vlm_from_hf, vlm_to_hf
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on busy cores

IMAGE_ID = 99


def tiny_llava(**kw):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                   image_seq_length=16, **kw)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random, not zero-ish: every tensor carries signal, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(n_img):
    torch.manual_seed(1)
    ids = torch.tensor([[5, 7] + [IMAGE_ID] * n_img + [11, 12, 13, 14, 3]] * 2)
    return ids, torch.rand(2, 3, 32, 32) * 2 - 1


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_logits_match_both_ways(strategy):
    hf = tiny_llava(vision_feature_select_strategy=strategy)
    ours = vlm_from_hf(hf)
    assert ours.config.fusion == "projector" and ours.config.feature_layer == -2
    n_img = 16 + (strategy == "full")
    assert ours.n_image_tokens == n_img
    ids, pixels = inputs(n_img)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels=pixels)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        back = vlm_to_hf(ours)
        assert torch.allclose(back(input_ids=ids, pixel_values=pixels).logits, want, atol=1e-4)
    # the image matters: another picture changes the logits after it
    with torch.no_grad():
        other = ours(ids, pixels=pixels.flip(0))
    assert not torch.allclose(other[:, -1], got[:, -1], atol=1e-3)


def test_our_vlm_exports_to_llava():
    torch.manual_seed(2)
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=16, d_model=32, n_layers=2, n_heads=4),
                    lm=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   hf_model_type="llama"),
                    fusion="projector", feature_layer=-1, image_token_id=63)
    ours = VLM(cfg).eval()
    hf = vlm_to_hf(ours)
    assert config_from_llava(hf.config).lm.d_model == 32
    ids = torch.tensor([[1, 2] + [63] * 4 + [3, 4]])
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixels=pixels), atol=1e-4)


def test_refusals():
    with pytest.raises(LmstackError, match="projector"):
        config_to_llava(VLMConfig(lm=ModelConfig(vocab_size=64), fusion="qformer", image_token_id=1))
    hf = tiny_llava().config.to_dict()
    with pytest.raises(LmstackError, match="single layer"):
        config_from_llava(dict(hf, vision_feature_layer=[-2, -1]))
    with pytest.raises(LmstackError, match="GELU"):
        config_from_llava(dict(hf, projector_hidden_act="relu"))
