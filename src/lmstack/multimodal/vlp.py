"""Vision-language pretraining objectives beyond CLIP's, BLIP-style (Li et al. 2022; ALBEF, Li et al. 2021):

- itc: CLIP's symmetric InfoNCE (clip.py);
- itm: image-text matching, a binary head on a fusion encoder that reads the picture's tokens and the text's
  hidden states together. Its negatives are HARD: for each picture a text drawn from the batch with probability
  softmax(ITC similarity) (the positive and texts of the same picture excluded), and for each text a picture
  drawn the same way, as ALBEF/BLIP mine them; hard_negatives=False draws them uniformly (the ablation);
- lm: an image-conditioned captioning decoder, a causal Transformer whose input is the picture's tokens
  (a prefix it reads bidirectionally) followed by the caption; the loss is next-token cross-entropy on the caption.

Every part is the one lmstack Transformer: the fusion encoder (causal=False, type embeddings telling picture from
text) and the decoder (causal, learned positions, an LM head). `vlp_loss` trains any subset of the three.
`rerank_recall` is BLIP's retrieval: rank by ITC, then re-score each query's top k by ITM (+ the ITC similarity).

Usage:
    from lmstack.multimodal.vlp import VLP, VLPConfig, vlp_loss, rerank_recall
    model = VLP(VLPConfig(clip=clip_cfg))
    losses = vlp_loss(model, {"pixels": pixels, "ids": ids, "image_ids": ids_of_pictures}, {"itc", "itm", "lm"})
    losses["loss"].backward()                    # also losses["itc"], losses["itm"], losses["lm"], losses["itm_acc"]
    recall = rerank_recall(model, pixels, ids, k=8)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.multimodal.clip import CLIP, CLIPConfig, clip_loss, retrieval_recall
from lmstack.runtime.validation import need

OBJECTIVES = ("itc", "itm", "lm")


@dataclass
class VLPConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    """The two towers and ITC (the fusion encoder and decoder take the text tower's width)."""
    fusion_layers: int = 2
    """Blocks of the ITM fusion encoder over [ITM token, picture tokens, text hidden states]. At least 2 to learn:
    with one, the ITM token's attention cannot depend on how text and picture fit (benchmarks/vision_clip.py:
    1 block stayed at the constant predictor, ITM accuracy 0.66, for 800 steps)."""
    decoder_layers: int = 2
    """Blocks of the captioning decoder."""
    n_heads: int = 4
    """Attention heads of the fusion encoder and decoder."""
    hard_negatives: bool = True
    """ITM negatives drawn by softmax(ITC similarity) (ALBEF/BLIP); False: drawn uniformly from the batch."""
    itc_weight: float = 1.0
    """Weight of the ITC loss in the sum."""
    itm_weight: float = 1.0
    """Weight of the ITM loss in the sum."""
    lm_weight: float = 1.0
    """Weight of the captioning loss in the sum."""

    def __post_init__(self) -> None:
        need(self.fusion_layers >= 1 and self.decoder_layers >= 1,
             f"fusion_layers and decoder_layers must be >= 1, got {self.fusion_layers} and {self.decoder_layers}")
        need(self.clip.text.d_model % self.n_heads == 0,
             f"text d_model={self.clip.text.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("itc_weight", "itm_weight", "lm_weight"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


class VLP(nn.Module):
    def __init__(self, cfg: VLPConfig):
        super().__init__()
        self.config = cfg
        self.clip = CLIP(cfg.clip)
        t, v = cfg.clip.text, cfg.clip.vision
        d, n_img = t.d_model, 1 + v.n_patches
        self.fusion = Transformer(ModelConfig(
            vocab_size=1, d_model=d, n_layers=cfg.fusion_layers, n_heads=cfg.n_heads, max_seq_len=1 + n_img + t.max_seq_len,
            norm="layernorm", position="none", causal=False, head="none", type_vocab_size=2, mlp="gelu",
            qkv_bias=True, out_bias=True, mlp_bias=True, init="normal"))
        self.itm_token = nn.Parameter(torch.randn(d) * 0.02)
        self.fusion_image = nn.Linear(v.d_model, d)
        self.itm_head = nn.Linear(d, 2)
        self.decoder = Transformer(ModelConfig(
            vocab_size=t.vocab_size, d_model=d, n_layers=cfg.decoder_layers, n_heads=cfg.n_heads,
            max_seq_len=n_img + t.max_seq_len, norm="layernorm", position="learned", causal=True, head="lm",
            mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, init="normal"))
        self.decoder_image = nn.Linear(v.d_model, d)
        for table in (self.fusion.tok_emb.weight,):  # the fusion encoder reads inputs_embeds only
            nn.init.zeros_(table)
            table.requires_grad_(False)

    # ---- ITM
    def itm_logits(self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, 2) not-match / match logits for the pairs (image_tokens[b], text b)."""
        b = ids.shape[0]
        img = self.fusion_image(image_tokens)
        x = torch.cat([self.itm_token.expand(b, 1, -1), img, text_hidden], dim=1)
        types = torch.cat([torch.zeros(b, 1 + img.shape[1], dtype=torch.long, device=ids.device),
                           torch.ones_like(ids)], dim=1)
        keep = torch.cat([torch.ones(b, 1 + img.shape[1], dtype=torch.long, device=ids.device),
                          (ids != self.config.clip.text.pad_token_id).long()], dim=1)
        h = self.fusion(inputs_embeds=x, token_type_ids=types, attention_mask=keep)
        return self.itm_head(h[:, 0])

    @torch.no_grad()
    def itm_match(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B,) match logit minus not-match logit for the pairs (pixels[b], ids[b])."""
        logits = self.itm_logits(self.clip.vision(pixels), self.clip.text_hidden(ids), ids)
        return logits[:, 1] - logits[:, 0]

    # ---- captioning
    def lm_loss(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the caption after the picture's tokens (BOS not predicted, PAD ignored)."""
        k = image_tokens.shape[1]
        x = torch.cat([self.decoder_image(image_tokens), self.decoder.tok_emb(ids)], dim=1)
        prefix = torch.full((ids.shape[0],), k, dtype=torch.long, device=ids.device)  # the picture sees itself whole
        logits = self.decoder(inputs_embeds=x, prefix_len=prefix)[:, k:-1]
        target = ids[:, 1:].masked_fill(ids[:, 1:] == self.config.clip.text.pad_token_id, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy captions (token ids, BOS and EOS left out) for each picture."""
        t = self.config.clip.text
        img = self.decoder_image(self.clip.vision(pixels))
        k, n = img.shape[1], pixels.shape[0]
        ids = torch.full((n, 1), t.bos_token_id, dtype=torch.long, device=pixels.device)
        done = torch.zeros(n, dtype=torch.bool, device=pixels.device)
        prefix = torch.full((n,), k, dtype=torch.long, device=pixels.device)
        for _ in range(min(max_new_tokens, t.max_seq_len - 1)):
            x = torch.cat([img, self.decoder.tok_emb(ids)], dim=1)
            nxt = self.decoder(inputs_embeds=x, prefix_len=prefix)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, t.pad_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == t.eos_token_id
            if bool(done.all()):
                break
        return [[i for i in row[1:].tolist() if i not in (t.eos_token_id, t.pad_token_id)] for row in ids]


def sample_negatives(sim: torch.Tensor, same: torch.Tensor, hard: bool, generator=None) -> torch.Tensor:
    """For each row, one column index drawn by softmax(sim) (hard) or uniformly, never where same[row, col]."""
    weights = sim.float().softmax(dim=1) if hard else torch.ones_like(sim, dtype=torch.float)
    weights = weights.masked_fill(same, 0.0)
    empty = weights.sum(dim=1) == 0
    if bool(empty.any()):
        raise LmstackError(f"ITM needs, for every picture, a text of another picture in the batch; "
                           f"{int(empty.sum())} rows have none (a batch of one picture's texts?)")
    return torch.multinomial(weights + 1e-12 * (~same), 1, generator=generator).squeeze(1)


def vlp_loss(model: VLP, batch: dict, objectives: Iterable[str] = OBJECTIVES, generator=None) -> dict:
    """The chosen objectives' losses on a batch {"pixels": (B,3,S,S), "ids": (B,T), "image_ids": (B,) optional,
    pairs with the same image_id are never each other's negatives}; "loss" is their weighted sum."""
    objectives = set(objectives)
    unknown = objectives - set(OBJECTIVES)
    if not objectives or unknown:
        raise LmstackError(f"objectives must be a non-empty subset of {', '.join(OBJECTIVES)}, got "
                           f"{sorted(objectives)}")
    pixels, ids = batch.get("pixels"), batch.get("ids")
    if pixels is None or ids is None:
        raise LmstackError("a VLP batch needs 'pixels' (B, 3, S, S) and 'ids' (B, T)")
    b = ids.shape[0]
    if pixels.shape[0] != b:
        raise LmstackError(f"a VLP batch pairs picture i with text i: got {pixels.shape[0]} pictures, {b} texts")
    cfg, clip = model.config, model.clip
    image_ids = batch.get("image_ids")
    image_ids = torch.arange(b, device=ids.device) if image_ids is None else torch.as_tensor(image_ids).to(ids.device)
    image_tokens = clip.vision(pixels)  # (B, 1 + P, d_v), shared by every objective
    out: dict = {}
    total = pixels.new_zeros(())
    if objectives & {"itc", "itm"}:
        text_hidden = clip.text_hidden(ids)
        eos = clip.eos_positions(ids)
        img_emb = F.normalize(clip.visual_projection(clip.vision.post_norm(image_tokens[:, 0])), dim=-1)
        txt_emb = F.normalize(clip.text_projection(text_hidden[torch.arange(b, device=ids.device), eos]), dim=-1)
        sim = clip.scale() * img_emb @ txt_emb.T
        if "itc" in objectives:
            out["itc"] = clip_loss(sim)
            total = total + cfg.itc_weight * out["itc"]
        if "itm" in objectives:
            if b < 2:
                raise LmstackError("ITM mines its negatives from the batch: it needs a batch of 2 or more")
            same = image_ids[:, None] == image_ids[None, :]
            with torch.no_grad():
                neg_txt = sample_negatives(sim.detach(), same, cfg.hard_negatives, generator)
                neg_img = sample_negatives(sim.detach().T, same, cfg.hard_negatives, generator)
            imgs = torch.cat([image_tokens, image_tokens, image_tokens[neg_img]])
            texts = torch.cat([text_hidden, text_hidden[neg_txt], text_hidden])
            all_ids = torch.cat([ids, ids[neg_txt], ids])
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
            logits = model.itm_logits(imgs, texts, all_ids)
            out["itm"] = F.cross_entropy(logits, labels)
            out["itm_acc"] = float((logits.argmax(1) == labels).float().mean())
            total = total + cfg.itm_weight * out["itm"]
    if "lm" in objectives:
        out["lm"] = model.lm_loss(image_tokens, ids)
        total = total + cfg.lm_weight * out["lm"]
    out["loss"] = total
    return out


@torch.no_grad()
def rerank_recall(model: VLP, pixels: torch.Tensor, ids: torch.Tensor, k: int = 8, ks: Iterable[int] = (1, 5),
                  text_image: torch.Tensor | None = None, batch_size: int = 256) -> dict:
    """BLIP's retrieval: ITC ranks every pair, ITM re-scores each query's top k (score = ITM match logit + ITC
    similarity), the rest keep their ITC order below. Returns retrieval_recall's dict of the re-ranked scores."""
    clip = model.clip
    need(k >= 1, f"k must be >= 1, got {k}")
    img_emb, txt_emb = clip.encode_image(pixels), clip.encode_text(ids)
    sim = img_emb @ txt_emb.T  # (N, M)
    image_tokens, text_hidden = clip.vision(pixels), clip.text_hidden(ids)
    pairs: set[tuple[int, int]] = set()
    top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices
    top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
    pairs.update((i, int(j)) for i in range(sim.shape[0]) for j in top_t[i])
    pairs.update((int(i), j) for j in range(sim.shape[1]) for i in top_i[j])
    pairs_list = sorted(pairs)
    match = {}
    for start in range(0, len(pairs_list), batch_size):
        chunk = torch.tensor(pairs_list[start:start + batch_size], device=sim.device)
        logits = model.itm_logits(image_tokens[chunk[:, 0]], text_hidden[chunk[:, 1]], ids[chunk[:, 1]])
        match.update(zip(pairs_list[start:start + batch_size], (logits[:, 1] - logits[:, 0]).tolist()))
    # each direction re-scores only its own query's top k; the rest stay below them, in ITC order
    i2t, t2i = sim - 1e4, sim - 1e4
    for i in range(sim.shape[0]):
        for j in top_t[i].tolist():
            i2t[i, j] = match[(i, j)] + sim[i, j]
    for j in range(sim.shape[1]):
        for i in top_i[j].tolist():
            t2i[i, j] = match[(i, j)] + sim[i, j]
    eye = torch.eye(sim.shape[1], device=sim.device)  # retrieval_recall ranks by a dot product: scores @ I
    out = retrieval_recall(i2t, eye, ks=ks, text_image=text_image)
    back = retrieval_recall(t2i, eye, ks=ks, text_image=text_image)
    out.update({key: value for key, value in back.items() if key.startswith("t2i")})
    return out
