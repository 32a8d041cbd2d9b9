"""The VLM (multimodal/vlm.py): three fusions, image splicing at <image>, Flamingo's frozen-LM identity at init,
KV-cached generation equal to the uncached loop, and the VLM directory (save/load, refusals)."""
import json

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf_io import save_model
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vision_world import build_vision_world
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig, load_vlm, read_vlm_config, save_vlm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on busy cores


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=330, n_images=20)


def make(tok, fusion, **kw):
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=4)
    lm = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=96,
                     eos_token_id=tok.token_to_id("<|eos|>"))
    return VLM(VLMConfig(vision=vision, lm=lm, fusion=fusion, n_queries=4,
                         image_token_id=tok.token_to_id(IMAGE_TOKEN), **kw)).eval()


@pytest.fixture(scope="module")
def pixels():
    recs = build_vision_world(n_images=2, size=32, seed=0)
    return to_pixels([render(Scene.from_dict(r["scene"])) for r in recs], size=32)


def prompt(vlm, tok, text="<image> How many shapes are there?"):
    return torch.tensor([vlm.expand_prompt(tok.encode(text))])


def test_image_token_counts_and_prompt_expansion(tok):
    image_id = tok.token_to_id(IMAGE_TOKEN)
    proj, qf, xa = make(tok, "projector"), make(tok, "qformer"), make(tok, "xattn")
    assert (proj.n_image_tokens, qf.n_image_tokens, xa.n_image_tokens) == (16, 4, 0)
    assert make(tok, "projector", feature_select="full").n_image_tokens == 17
    ids = tok.encode("<image> What colour is the star?")
    assert proj.expand_prompt(ids).count(image_id) == 16
    assert qf.expand_prompt(ids).count(image_id) == 4
    assert xa.expand_prompt(ids) == ids
    assert isinstance(proj.lm, Transformer)


def test_encode_images_and_spliced_vectors(tok, pixels):
    vlm = make(tok, "projector")
    emb = vlm.encode_images(pixels)
    assert emb.shape == (2, 16, 32)
    ids = prompt(vlm, tok).repeat(2, 1)
    a = vlm(ids, pixels=pixels)
    assert torch.allclose(a, vlm(ids, image_embeds=emb), atol=1e-6)
    # the picture changes what follows it, and the two rows read their own pictures
    assert not torch.allclose(a[0, -1], a[1, -1])
    # a text-only prefix before the picture is untouched by it (causal LM)
    ids2 = torch.tensor([vlm.expand_prompt(tok.encode("Look: <image> What is it?"))] * 2)
    b = vlm(ids2, pixels=pixels)
    first = int((ids2[0] == vlm.image_token_id).nonzero()[0])
    assert torch.allclose(b[0, :first], b[1, :first], atol=1e-6)


def test_splice_refuses_a_wrong_count(tok, pixels):
    vlm = make(tok, "qformer")
    ids = torch.tensor([tok.encode("<image> How many shapes are there?")])  # not expanded: 1 slot, 4 needed
    with pytest.raises(LmstackError, match="expand the prompt"):
        vlm(ids, pixels=pixels[:1])
    with pytest.raises(LmstackError, match="no picture"):
        vlm(prompt(vlm, tok))
    with pytest.raises(LmstackError, match="pass the picture once"):
        vlm(prompt(vlm, tok), pixels=pixels[:1], image_embeds=vlm.encode_images(pixels[:1]))


def test_xattn_with_closed_gates_is_the_frozen_lm(tok, pixels):
    vlm = make(tok, "xattn", freeze_lm=True)
    ids = prompt(vlm, tok).repeat(2, 1)
    assert torch.equal(vlm(ids, pixels=pixels), vlm.lm(ids))
    assert not any(p.requires_grad for p in vlm.lm.parameters())
    assert all(p.requires_grad for p in vlm.xattn.parameters())
    with torch.no_grad():
        for layer in vlm.xattn:
            layer.attn_gate.fill_(0.5)
    out = vlm(ids, pixels=pixels)
    assert not torch.allclose(out, vlm.lm(ids))
    assert not torch.allclose(out[0], out[1])  # each row reads its own image
    with pytest.raises(LmstackError, match="one image per row"):
        vlm(ids, pixels=pixels[:1])
    with pytest.raises(LmstackError, match="no image vectors"):
        vlm.encode_images(pixels)


@pytest.mark.parametrize("fusion", ["projector", "qformer", "xattn"])
def test_cached_greedy_generate_equals_the_uncached_loop(tok, pixels, fusion):
    vlm = make(tok, fusion)
    if fusion == "xattn":
        with torch.no_grad():
            for layer in vlm.xattn:
                layer.attn_gate.fill_(0.7)
                layer.ff_gate.fill_(0.7)
    ids = prompt(vlm, tok).repeat(2, 1)
    got = vlm.generate(ids, pixels, max_new_tokens=6, eos_token_id=-1)
    seq = ids
    for _ in range(6):
        last = vlm(seq, pixels=pixels)[:, -1]
        last[:, vlm.image_token_id] = float("-inf")
        nxt = last.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert got == seq[:, ids.shape[1]:].tolist()


def test_generate_stops_at_eos_and_checks_lengths(tok, pixels):
    vlm = make(tok, "projector")
    ids = prompt(vlm, tok)
    first = vlm.generate(ids, pixels[:1], max_new_tokens=3, eos_token_id=-1)[0]
    assert vlm.generate(ids, pixels[:1], max_new_tokens=3, eos_token_id=first[0]) == [[]]
    if first[1] != first[0]:
        assert vlm.generate(ids, pixels[:1], max_new_tokens=3, eos_token_id=first[1]) == [first[:1]]
    with pytest.raises(LmstackError, match="max_seq_len"):
        vlm.generate(ids, pixels[:1], max_new_tokens=200)


def test_labels_give_the_answer_only_loss(tok, pixels):
    vlm = make(tok, "projector")
    ids = prompt(vlm, tok)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    out = vlm(ids, pixels=pixels[:1], labels=labels)
    logp = torch.log_softmax(out.logits[0, -4:-1], -1)
    expect = -logp.gather(-1, ids[0, -3:, None]).mean()
    assert torch.allclose(out.loss, expect, atol=1e-5)


def test_config_refusals(tok):
    with pytest.raises(LmstackError, match="fusion"):
        make(tok, "concat")
    with pytest.raises(LmstackError, match="image_token_id"):
        VLM(VLMConfig())
    with pytest.raises(LmstackError, match="feature_layer"):
        make(tok, "projector", feature_layer=-5)


@pytest.mark.parametrize("fusion", ["projector", "xattn"])
def test_save_and_load_round_trip(tok, pixels, fusion, tmp_path):
    vlm = make(tok, fusion, feature_layer=-2)
    ids = prompt(vlm, tok)
    save_vlm(vlm, tok, tmp_path / "vlm")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "vlm").iterdir()}
    back = load_vlm(tmp_path / "vlm")
    assert back.config == vlm.config
    assert torch.equal(back(ids, pixels=pixels[:1]), vlm(ids, pixels=pixels[:1]))


def test_load_refuses_other_directories(tok, tmp_path):
    lm = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4))
    save_model(lm, tmp_path / "text")
    with pytest.raises(LmstackError, match="text-only model"):
        load_vlm(tmp_path / "text")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(LmstackError, match="not a VLM"):
        read_vlm_config(tmp_path / "clip")
    with pytest.raises(LmstackError, match="no config.json"):
        load_vlm(tmp_path)
    vlm = make(tok, "qformer")
    save_vlm(vlm, tok, tmp_path / "v")
    (tmp_path / "v" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LmstackError, match="safetensors"):
        load_vlm(tmp_path / "v")
    data = json.loads((tmp_path / "v" / "config.json").read_text())
    data["vlm"]["fusion"] = "mystery"
    (tmp_path / "v" / "config.json").write_text(json.dumps(data))
    with pytest.raises(LmstackError, match="fusion"):
        load_vlm(tmp_path / "v")
