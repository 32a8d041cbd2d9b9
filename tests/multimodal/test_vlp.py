"""multimodal/vlp.py: ITC + ITM with hard negatives + image-conditioned LM, alone or jointly; ITM re-ranking."""
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.clip import CLIPConfig, TextConfig, retrieval_recall, tokenize
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlp import VLP, VLPConfig, rerank_recall, sample_negatives, vlp_loss

TEXTS = ["a red circle.", "a blue star.", "a green square.", "a pink cross.", "a small yellow diamond."]


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(vocab_size=400, n_images=40)


def tiny(tok, **kw) -> VLP:
    torch.manual_seed(0)
    clip = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                      text=TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=24),
                      embed_dim=16)
    return VLP(VLPConfig(clip=clip, decoder_layers=1, n_heads=2, **kw))


def batch(tok, n=5):
    torch.manual_seed(1)
    return {"pixels": torch.rand(n, 3, 16, 16) * 2 - 1, "ids": tokenize(tok, TEXTS[:n], 24)}


def grads(model):
    return {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("clip.") else "")
            for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("objectives,reached,untouched", [
    ({"itc"}, {"clip.text", "clip.vision", "clip.logit_scale"}, {"decoder", "fusion", "itm_head"}),
    ({"itm"}, {"fusion", "itm_head", "clip.text", "clip.vision"}, {"decoder", "clip.logit_scale"}),
    ({"lm"}, {"decoder", "decoder_image", "clip.vision"}, {"clip.text", "fusion", "itm_head"}),
])
def test_each_objective_trains_alone_and_reaches_only_its_parts(tok, objectives, reached, untouched):
    model = tiny(tok).train()
    out = vlp_loss(model, batch(tok), objectives, generator=torch.Generator().manual_seed(0))
    assert set(out) >= objectives | {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    got = grads(model)
    assert reached <= got and not (untouched & got)


def test_joint_loss_is_the_weighted_sum(tok):
    model = tiny(tok, itm_weight=0.5, lm_weight=2.0)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same negatives in both calls
    out = vlp_loss(model, batch(tok), generator=gen())
    assert 0 <= out["itm_acc"] <= 1
    torch.testing.assert_close(out["loss"], out["itc"] + 0.5 * out["itm"] + 2.0 * out["lm"])
    itm = vlp_loss(model, batch(tok), {"itm"}, generator=gen())["itm"]
    torch.testing.assert_close(itm, out["itm"])


def test_hard_negatives_follow_similarity_and_skip_the_same_picture():
    sim = torch.tensor([[9.0, 8.0, -5.0, -5.0], [8.0, 9.0, -5.0, -5.0], [-5.0, -5.0, 9.0, 8.0], [-5.0, -5.0, 8.0, 9.0]])
    same = torch.eye(4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    hard = torch.stack([sample_negatives(sim * 3, same, True, gen) for _ in range(200)])
    assert (hard == torch.tensor([1, 0, 3, 2])).float().mean() > 0.95  # the confusable text, not a random one
    easy = torch.stack([sample_negatives(sim * 3, same, False, gen) for _ in range(200)])
    assert 0.2 < (easy == torch.tensor([1, 0, 3, 2])).float().mean() < 0.5
    assert not (hard == torch.arange(4)).any() and not (easy == torch.arange(4)).any()
    # two captions of one picture are never each other's negatives
    ids = torch.tensor([0, 0, 1, 1])
    same = ids[:, None] == ids[None, :]
    picks = torch.stack([sample_negatives(sim, same, True, gen) for _ in range(50)])
    assert not (ids[picks] == ids).any()
    with pytest.raises(LmstackError, match="another picture"):
        sample_negatives(sim, torch.ones(4, 4, dtype=torch.bool), True, gen)


def test_lm_loss_is_conditioned_on_the_picture_and_ignores_padding(tok):
    model = tiny(tok).eval()
    b = batch(tok, 2)
    base = vlp_loss(model, b, {"lm"})["lm"]
    other = vlp_loss(model, dict(b, pixels=torch.rand(2, 3, 16, 16)), {"lm"})["lm"]
    assert not torch.allclose(base, other)
    # the shorter caption's padding is no target
    ids = b["ids"]
    longer = torch.cat([ids, torch.full((2, 3), tok.pad_id)], dim=1)
    torch.testing.assert_close(vlp_loss(model, dict(b, ids=longer), {"lm"})["lm"], base)
    captions = model.caption(b["pixels"], max_new_tokens=4)
    assert len(captions) == 2 and all(len(c) <= 4 for c in captions)


def test_rerank_uses_itm_inside_the_top_k(tok, monkeypatch):
    model = tiny(tok).eval()
    b = batch(tok)
    with torch.no_grad():
        plain = retrieval_recall(model.clip.encode_image(b["pixels"]), model.clip.encode_text(b["ids"]), ks=(1,))
    # an oracle ITM (match only on the diagonal): with k = all, re-ranking finds every pair
    oracle_ids = {tuple(r.tolist()): i for i, r in enumerate(b["ids"])}

    def oracle(image_tokens, text_hidden, ids):
        rows = [(image_tokens[n] - model.clip.vision(b["pixels"])).abs().sum((1, 2)).argmin() for n in range(len(ids))]
        match = torch.tensor([float(int(r) == oracle_ids[tuple(t.tolist())]) for r, t in zip(rows, ids)])
        return torch.stack([torch.zeros_like(match), 50 * match], dim=1)

    monkeypatch.setattr(model, "itm_logits", oracle)
    full = rerank_recall(model, b["pixels"], b["ids"], k=5, ks=(1,))
    assert full["i2t@1"] == 1.0 and full["t2i@1"] == 1.0
    one = rerank_recall(model, b["pixels"], b["ids"], k=1, ks=(1,))
    assert one["i2t@1"] == plain["i2t@1"] and one["t2i@1"] == plain["t2i@1"]


def test_refusals(tok):
    model = tiny(tok)
    b = batch(tok, 2)
    with pytest.raises(LmstackError, match="objectives"):
        vlp_loss(model, b, {"mlm"})
    with pytest.raises(LmstackError, match="2 or more"):
        vlp_loss(model, batch(tok, 1), {"itm"})
    with pytest.raises(LmstackError, match="'pixels'"):
        vlp_loss(model, {"ids": b["ids"]})
    with pytest.raises(ConfigError, match="itm_weight"):
        VLPConfig(itm_weight=-1)
