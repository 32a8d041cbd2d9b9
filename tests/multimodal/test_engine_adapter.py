"""The VLM engine adapter: pictures become placeholder ids keyed by their pixels, encoded once, served by the
unchanged engine with prefix caching keyed on the picture, and greedy output equal to a plain no-cache forward."""
import pytest
import torch
from PIL import Image
from torch import nn

from lmstack.errors import LmstackError
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.model import ModelConfig, Transformer, preset
from lmstack.multimodal.engine_adapter import (IMAGE_MARKER, ImagePrompt, ImageStore, VLMEngineModel,
                                               check_prefix_vlm, engine_model, load_engine_vlm)
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.shapes import Obj, Scene, render
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import VLM, VLMConfig, save_vlm

N_TOK = 16


class PatchEncoder(nn.Module):
    """A small real encoder: 4x4 average-pooled patches of a 16x16 picture, projected to the LM width."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, d)

    def forward(self, pixels):
        n = pixels.shape[0]
        patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4)  # (N, 3, 4, 4, 4, 4)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, N_TOK, 48)
        return self.proj(patches)


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=320, n_images=40)


@pytest.fixture(scope="module")
def parts(tok):
    torch.manual_seed(0)
    lm = Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256)).eval()
    return lm, PatchEncoder(lm.config.d_model).eval()


def make_model(parts, capacity=8):
    lm, enc = parts
    return VLMEngineModel(lm, enc, image_size=16, n_image_tokens=N_TOK, encoder=enc, store_capacity=capacity)


def picture(colour="red", shape="circle", x=16):
    return render(Scene(size=32, background="white", objects=(Obj(shape, colour, "large", x, 16, 6),)))


def reference_greedy(parts, tok, text_ids_with_marker, img, n_new):
    """A plain LM forward with inputs_embeds, no cache, argmax: what the engine must reproduce."""
    lm, enc = parts
    marker = tok.encode(IMAGE_MARKER, allow_special=False)
    i = next(k for k in range(len(text_ids_with_marker)) if text_ids_with_marker[k:k + len(marker)] == marker)
    before, after = text_ids_with_marker[:i], text_ids_with_marker[i + len(marker):]
    with torch.no_grad():
        vec = enc(to_pixels([img], 16))[0]
        out = []
        for _ in range(n_new):
            emb = torch.cat([lm.tok_emb(torch.tensor(before)), vec, lm.tok_emb(torch.tensor(after + out))])
            out.append(int(lm(inputs_embeds=emb[None])[0, -1].argmax()))
    return out


def chat_ids(tok, prompt, img, text="what colour is it?"):
    content = prompt.add(img) + " " + text
    return tok.render_messages([{"role": "user", "content": content}], add_generation_prompt=True).ids


def run(engine, rid, ids, n=6):
    engine.add_request(rid, ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    (out,) = engine.run_to_completion()
    return out


def test_store_encodes_once_pins_and_never_reuses_slots():
    store = ImageStore(n_tokens=2, capacity=1)
    calls = []

    def enc(idx):
        calls.append(list(idx))
        return torch.ones(len(idx), 2, 3)

    assert store.acquire(["a", "a"], enc) == [0, 0]  # the same picture twice: one encode, pinned twice
    assert calls == [[0]] and store.encoded == 1
    assert store.acquire(["b"], enc) == [1]
    assert len(store) == 2  # over capacity, but both pinned: nothing evicted
    store.release(["a", "a"])
    assert len(store) == 1 and not store.live(0) and store.live(1)
    store.release(["b"])
    assert store.acquire(["a"], enc) == [2]  # re-added after eviction: a fresh slot, never slot 0 again
    with pytest.raises(LmstackError, match="released more often"):
        store.release(["b", "b"])
    with pytest.raises(LmstackError, match="not in the image store"):
        store.table([0])


def test_engine_output_equals_plain_forward_and_prefix_cache_keys_on_the_picture(parts, tok):
    model = make_model(parts)
    img, other = picture("red"), picture("blue", "square", 10)
    raw_prompt = ImagePrompt(model, tok)
    raw = chat_ids(tok, raw_prompt, img)
    want = reference_greedy(parts, tok, raw, img, 6)

    results = {}
    for caching in (True, False):
        model = make_model(parts)
        engine = LLMEngine(model, tokenizer=tok, block_size=4, num_blocks=64, enable_prefix_caching=caching,
                           cuda_graphs=False)
        outs = []
        for k, pic in enumerate((img, img, other)):
            prompt = ImagePrompt(model, tok)
            ids, lease = prompt.expand(chat_ids(tok, prompt, pic))
            assert sum(t >= tok.vocab_size for t in ids) == N_TOK
            with lease:
                outs.append(run(engine, f"r{k}", ids))
        results[caching] = outs
        assert model.store.encoded == 2 and model.store.reused == 1  # each distinct picture encoded once
    cached, plain = results[True], results[False]
    assert cached[0].outputs[0].token_ids == want
    assert cached[0].num_cached_tokens == 0
    assert cached[1].num_cached_tokens > N_TOK  # the second request with the same picture hits, past the image
    assert cached[2].num_cached_tokens < cached[1].num_cached_tokens  # another picture: its blocks differ
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in plain]
    assert all(o.num_cached_tokens == 0 for o in plain)


def test_a_different_picture_changes_the_output_and_text_only_steps_are_the_lm(parts, tok):
    model = make_model(parts)
    ids = torch.tensor([tok.encode("a red circle")])
    with torch.no_grad():
        assert torch.equal(model(ids), parts[0](ids))  # no placeholder: the LM's own call
    a, b = (ImagePrompt(model, tok) for _ in range(2))
    ia, _ = a.expand(chat_ids(tok, a, picture("red")))
    ib, _ = b.expand(chat_ids(tok, b, picture("green", "triangle", 8)))
    assert ia != ib  # placeholder ids differ by picture
    with torch.no_grad():
        la, lb = model(torch.tensor([ia]))[0, -1], model(torch.tensor([ib]))[0, -1]
    assert not torch.allclose(la, lb)


def test_engine_refuses_unknown_placeholders_and_prompt_text_with_the_marker(parts, tok):
    model = make_model(parts)
    engine = LLMEngine(model, tokenizer=tok, block_size=4, num_blocks=32, cuda_graphs=False)
    with pytest.raises(LmstackError, match="outside the vocabulary"):
        engine.add_request("x", [1, 2, tok.vocab_size + 5], SamplingParams(max_tokens=2))
    prompt = ImagePrompt(model, tok)
    ids = tok.render_messages([{"role": "user", "content": prompt.add(picture()) + IMAGE_MARKER}], True).ids
    with pytest.raises(LmstackError, match="2 image markers for 1 images"):
        prompt.expand(ids)
    limited = ImagePrompt(model, tok, max_images=1)
    limited.add(picture())
    with pytest.raises(LmstackError, match="at most 1"):
        limited.add(picture())


def test_text_only_engine_is_unchanged(parts, tok):
    lm = parts[0]
    engine = LLMEngine(lm, tokenizer=tok, block_size=4, num_blocks=32, cuda_graphs=False)
    assert engine.ctx.extra_ids is None
    with pytest.raises(LmstackError, match="outside the vocabulary"):
        engine.add_request("x", [1, tok.vocab_size], SamplingParams(max_tokens=2))


def test_flamingo_is_refused():
    with pytest.raises(LmstackError, match="cross-attention"):
        check_prefix_vlm("xattn")
    check_prefix_vlm("mlp")


def tiny_vlm(tok, fusion="projector"):
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=4)
    lm = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                     eos_token_id=tok.token_to_id("<|eos|>"))
    return VLM(VLMConfig(vision=vision, lm=lm, fusion=fusion, n_queries=4,
                         image_token_id=tok.token_to_id(IMAGE_TOKEN))).eval()


@pytest.mark.parametrize("fusion", ["projector", "qformer"])
def test_engine_greedy_equals_vlm_generate(tok, fusion, tmp_path):
    vlm = tiny_vlm(tok, fusion)
    save_vlm(vlm, tok, tmp_path / "vlm")
    model, loaded_tok = load_engine_vlm(tmp_path / "vlm")
    assert model.n_image_tokens == vlm.n_image_tokens and model.image_token_id == vlm.image_token_id
    engine = LLMEngine(model, tokenizer=loaded_tok, block_size=4, num_blocks=64, cuda_graphs=False)
    img = picture("yellow", "star")
    prompt = ImagePrompt(model, loaded_tok)
    rendered = chat_ids(loaded_tok, prompt, img, "how many shapes are there?")
    ids, lease = prompt.expand(rendered)
    with lease:
        got = run(engine, "r0", ids, n=8).outputs[0].token_ids
    # the library's own path: <image> in place of the marker, expand_prompt, VLM.generate (no eos stop)
    marker = loaded_tok.encode(IMAGE_MARKER, allow_special=False)
    i = next(k for k in range(len(rendered)) if rendered[k:k + len(marker)] == marker)
    plain = rendered[:i] + [vlm.image_token_id] + rendered[i + len(marker):]
    want = vlm.generate(torch.tensor([vlm.expand_prompt(plain)]), to_pixels([img], 32), max_new_tokens=8,
                        eos_token_id=-1)[0]
    assert got == want


def test_flamingo_vlm_is_refused_by_engine_model(tok):
    with pytest.raises(LmstackError, match="fusion='xattn'"):
        engine_model(tiny_vlm(tok, "xattn"))
