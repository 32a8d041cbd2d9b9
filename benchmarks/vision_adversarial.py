"""Adversarial robustness of the shapes world's CLIP and VLM (issue 24 §3, XII.12): FGSM and PGD under L-inf
eps in {1, 2, 4, 8}/255, the typographic attack (a wrong colour word written on the picture) against a neutral word
(the control), and adversarial training -- TeCoA on the CLIP, Madry on the VQA VLM -- with every table measured
before and after.

Pictures: one-object scenes of the shapes world (shapes.render; colour x shape pairs outside HELDOUT_PAIRS, random
size, place, background and texture), 32x32. Train (seed 1) and test (seed 2) scenes are drawn apart; the trial
runs that chose the caption and prompts below used other seeds.
- CLIP (clip.py; ViT 32px/patch 4, d 64 x 2 blocks; text d 64 x 2; embed 64) trained with H1's clip_train.fit on
  the caption "a picture of a <size> <colour> <shape>.". Task: zero-shot COLOUR of the object (8 classes), each
  colour's embedding the ensemble of "a picture of a <size> <colour> <shape>." over the 2 sizes x 6 shapes. (A
  2-core budget trains colour well and shape poorly, so the 44-way composition accuracy is only reported, clean.)
- VLM (vlm.py; the same ViT, projector, LM d 64 x 2) trained with H2's vlm_train.train_vlm on "What colour is the
  <shape>?" (vlm_train's prompt "<image> Q: ... A:"); accuracy = the greedy first answer token is the right colour
  (every colour is one token, then eos).
- Attacks (multimodal/attacks.py) ascend the model's own loss: CLIP's zero-shot cross-entropy over the 8 colours,
  the VLM's cross-entropy of the answer token. PGD: 10 steps of 2.5 eps / 10 from a random start, each picture's
  strongest iterate kept. Typographic: the word (a wrong colour, or a neutral word of no colour or shape) in white
  with a black outline, 9 px, in the half of the picture the object is not in, so both words cover the same kind of
  background and never the object.
- A reading CLIP: the same CLIP trained (750 steps) on the same pictures, half of them with a random colour word
  written on and named in the caption ("a picture of a small red circle and the word pink."), the way web
  captions transcribe text in photos; added after the first runs showed the standard models ignore the words.
- TeCoA (adversarial_train.adversarial_train_clip): the CLIP's ViT + visual projection fine-tuned on PGD pictures
  (eps 4/255, 3 steps) against the fixed colour prompts. Madry (adversarial_train.adversarial_train): the whole VLM
  fine-tuned on PGD pictures (eps 4/255, 3 steps) for the answer token. Both, and both eps-0 controls, draw a random
  word on 25% of each batch first (AdvTrainConfig.overlay_prob; OVERLAY_WORDS: colours, shapes and neutral words
  kept apart from this test's NEUTRAL; random size, place, ink; label unchanged). Then every row is measured again.
- Diagnosis (the earlier Madry recipe, no overlays, rerun on a copy): clean and word accuracy, and how far a
  neutral word moves the ViT patch features the LM reads, on the patches its ink touches and on the others.

Records (ratio > 1 = ours ahead): each attacked accuracy against the clean accuracy (ratio = share kept); PGD against
FGSM at each eps (lower accuracy = stronger attack, ratio = FGSM / PGD); the adversarially trained model against the
standard one under each attack and clean (the clean cost); the wrong word against the neutral word. Every accuracy
has its n and binomial stderr; config holds steps and seconds of each training run. Examples: vision_adversarial.png.

Goals (set before the first full run, against the standard model): the robust model at least 1.5x the baseline's
accuracy under PGD at the training eps (4/255), and at least 0.9x its clean accuracy. That run showed the
fine-tune's extra supervised steps alone add robustness, so the eps-0 control was added and the goals moved to it
unchanged.

Measured (2026-12-07, one seed, 576 s on one shared core; CLIP n=512, VQA n=256, acc +- stderr):
- standard CLIP (ITC 500 steps, 48 s), zero-shot colour clean 0.940 +- 0.011. FGSM eps 1/2/4/8: 0.852, 0.779,
  0.652, 0.369; PGD: 0.834, 0.711, 0.506, 0.256 (PGD stronger than FGSM at every eps; 44-way composition 0.332).
- TeCoA (200 steps, 63 s) vs the clean fine-tune (same 200 steps, 17 s; both with overlays): clean 0.996 vs 0.998;
  PGD eps 2/4/8: 0.992 vs 0.885, 0.973 vs 0.686 (ratio 1.42: the 1.5 goal missed), 0.789 vs 0.359 (2.20).
  Composition accuracy falls, 0.176 vs 0.217: colour-only training narrows the tower.
- VQA colour (VLM 200 steps, 40 s): clean 0.996; PGD eps 1/2/4/8: 0.910, 0.797, 0.680, 0.430 (FGSM 0.918, 0.813,
  0.711, 0.477). Madry (60 steps, 49 s) vs the clean fine-tune (60 steps, 12 s; both with overlays): clean 0.988
  vs 1.000 (0.99x, goal met); PGD eps 4: 0.789 vs 0.656 (1.20x, goal 1.5 missed); eps 8: 0.547 vs 0.434 (1.26x).
- the defect this run fixes: Madry without overlays (the earlier recipe, rerun here, same numbers) made the VLM
  fragile to ANY word on the picture: 0.715 +- 0.028 (wrong colour word) and 0.754 +- 0.027 (neutral word) against
  0.984 / 1.000 for the eps-0 control of then. What we measured: the word reaches the object's patches. A neutral
  word moves the ViT patch features it does not touch by 0.259 (relative) after Madry without overlays, against
  0.191 for the standard VLM it started from, while the patches under the ink move alike in every model
  (0.61-0.63): training on PGD pictures alone, with no word ever in them, let attention carry the text's strong
  edges into the object's tokens. The fix trains on words (overlays): the leak falls to 0.141 (Madry) and 0.126
  (its control), and accuracy to 0.984 +- 0.008 (wrong word) and 0.973 +- 0.010 (neutral) against the control's
  0.988 / 0.988. The gap to the control closed from 0.27 to 0.004 (wrong word) and from 0.25 to 0.016 (neutral
  word, 1.3 stderr of the difference); PGD robustness did not pay for it (eps 4: 0.789, before 0.797).
- typographic on the others: no model here reads. Wrong vs neutral word: CLIP 0.930 vs 0.934, VQA 0.934 vs 0.965;
  the models answer the written colour 1.4% (CLIP) and 0.8% (VQA) of the time, what their ~7% errors spread over
  the 7 wrong colours give by chance (~1%). They never saw text in training, unlike web-trained CLIP, whose reading
  is what the attack exploits.
- the reading CLIP (750 steps, 69 s) does fall for it: clean 0.947, wrong word 0.602 +- 0.022 against neutral
  word 0.895 +- 0.014 (ratio 0.67); it answers the written colour 7.4% of the time (its 40% errors spread over 7
  colours would give 5.7%): the word mostly scrambles its colour reading rather than replacing it. Reading also
  cost it robustness: PGD 8/255 0.125 against the standard CLIP's 0.256.
- every record keeps the run before the overlays in config.earlier_attempts.

Run: flock /tmp/lmstack-bench-A.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vision_adversarial.py  (8-12 min)
     .venv/bin/python benchmarks/vision_adversarial.py --smoke     (seconds; writes nothing under results/)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from _common import RESULTS, result, write_result

from lmstack.config import atomic_write_bytes  # noqa: E402
from lmstack.model import ModelConfig  # noqa: E402
from lmstack.multimodal.adversarial_train import AdvTrainConfig, adversarial_train, adversarial_train_clip, \
    zero_shot_logits, zero_shot_loss  # noqa: E402
from lmstack.multimodal.attacks import AttackConfig, attack, typographic_pixels  # noqa: E402
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig, label_embeddings  # noqa: E402
from lmstack.multimodal.clip_train import CLIPTrainConfig, fit  # noqa: E402
from lmstack.multimodal.images import from_pixels, to_pixels  # noqa: E402
from lmstack.multimodal.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES, Obj, Scene, radius_for, \
    render  # noqa: E402
from lmstack.multimodal.text import IMAGE_TOKEN, shapes_tokenizer  # noqa: E402
from lmstack.multimodal.vision_world import HELDOUT_PAIRS  # noqa: E402
from lmstack.multimodal.vit import VisionConfig  # noqa: E402
from lmstack.multimodal.vlm import VLM, VLMConfig  # noqa: E402
from lmstack.multimodal.vlm_train import VLMTrainConfig, encode_example, train_vlm  # noqa: E402

NAME = "vision_adversarial"
EPS = (1, 2, 4, 8)
COLS = sorted(COLOURS)
PAIRS = [(c, s) for c in COLS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
NEUTRAL = ("word", "label", "text", "hello", "photo")  # no colour, no shape: the control's words
FONT = 9
OVERLAY = 0.25  # share of training pictures with a random word drawn on in every fine-tune (AdvTrainConfig)
# the one line each earlier record moves to config.earlier_attempts when this run replaces it
CHANGED = ("word overlays added to every fine-tune (overlay_prob 0.25: TeCoA, Madry and both eps-0 controls; "
           "random colour/shape/neutral words, size, place, ink; labels unchanged) to fix the Madry VLM's "
           "fragility to written words")


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def acc(hits: torch.Tensor) -> dict:
    p = hits.float().mean().item()
    return {"acc": round(p, 4), "n": int(hits.numel()), "stderr": round(stderr(p, hits.numel()), 4)}


def scenes(n: int, size: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape = rng.choice(PAIRS)
        size_name = rng.choice(sorted(SIZES))
        r = radius_for(size_name, size)
        obj = Obj(shape, colour, size_name, rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r), r)
        out.append(Scene(size, rng.choice(sorted(BACKGROUNDS)), rng.choice(TEXTURES), rng.randrange(2 ** 31), (obj,)))
    return out


def records_of(scs: list[Scene]) -> list[dict]:
    """What clip_train.fit and vlm_train.train_vlm read: a caption, and one colour question per picture.

    One caption template: with paraphrases added ("a red circle on a gray background.", ...) this CLIP's ITC loss
    stayed near log(batch) for 400 steps (trial runs on other seeds), with one template it learns in 200."""
    out = []
    for s in scs:
        o = s.objects[0]
        question = {"type": "colour", "question": f"What colour is the {o.shape}?", "answer": o.colour}
        out.append({"captions": [f"a picture of a {o.size} {o.colour} {o.shape}."], "vqa": [question]})
    return out


def typo_words(scs: list[Scene], seed: int) -> tuple[list[str], list[str], list[str]]:
    """(wrong colour word, neutral word, position) per picture; the text goes in the half without the object."""
    rng = random.Random(seed)
    wrong = [rng.choice([c for c in COLS if c != s.objects[0].colour]) for s in scs]
    neutral = [rng.choice(NEUTRAL) for _ in scs]
    where = ["bottom" if s.objects[0].cy < s.size / 2 else "top" for s in scs]
    return wrong, neutral, where


def write_words(pixels: torch.Tensor, words: list[str], where: list[str]) -> torch.Tensor:
    out = pixels.clone()
    for pos in ("top", "bottom"):
        idx = [i for i, w in enumerate(where) if w == pos]
        if idx:
            out[idx] = typographic_pixels(pixels[idx], [words[i] for i in idx], font_size=FONT, position=pos)
    return out


# ---- the two models under attack
class ClipColour:
    """Zero-shot colour over the ensembled prompts: logits, per-picture loss, predictions."""

    def __init__(self, clip: CLIP, tok):
        self.clip = clip
        templates = [f"a picture of a {size} {{}} {s}." for size in sorted(SIZES) for s in SHAPES]
        self.class_emb = label_embeddings(clip, tok, COLS, templates)
        self.pair_emb = label_embeddings(clip, tok, [f"{c} {s}" for c, s in PAIRS],
                                         [f"a picture of a {size} {{}}." for size in sorted(SIZES)])

    def loss_fn(self, y):
        fn = zero_shot_loss(self.clip.encode_image, self.class_emb, self.clip.scale().detach())
        return lambda x: fn(x, y)

    @torch.no_grad()
    def predict(self, x):
        return zero_shot_logits(self.clip.encode_image, self.class_emb, x, self.clip.scale()).argmax(-1)

    @torch.no_grad()
    def predict_pair(self, x):
        return zero_shot_logits(self.clip.encode_image, self.pair_emb, x, self.clip.scale()).argmax(-1)


class VlmColour:
    """The VLM's greedy first answer token to 'What colour is the <shape>?', scored against the colour's token."""

    def __init__(self, vlm: VLM, tok, scs: list[Scene]):
        self.vlm = vlm
        self.colour_ids = torch.tensor([tok.encode(" " + c)[0] for c in COLS])
        rows = [encode_example(vlm, tok, f"What colour is the {s.objects[0].shape}?", None, True)[0] for s in scs]
        if len({len(r) for r in rows}) != 1:
            raise SystemExit("the colour questions tokenise to different lengths; batch them by length")
        self.ids = torch.tensor(rows)

    def _logits(self, x, idx):
        return self.vlm(self.ids[idx], pixels=x)[:, -1]

    def loss_fn(self, y, idx):
        target = self.colour_ids[y]
        return lambda x: F.cross_entropy(self._logits(x, idx), target, reduction="none")

    @torch.no_grad()
    def predict(self, x, idx):
        tokens = self._logits(x, idx).argmax(-1)
        index = {int(t): i for i, t in enumerate(self.colour_ids)}
        return torch.tensor([index.get(t, -1) for t in tokens.tolist()])  # -1: a first token that is no colour


def with_written_words(records: list[dict], pixels: torch.Tensor, scs: list[Scene], frac: float, seed: int):
    """The reading CLIP's data: a share `frac` of the pictures get a random colour word written in the object-free
    half, and their caption names it ("a picture of a small red circle and the word pink."), as web captions
    often transcribe the text in a photo. Returns new (records, pixels)."""
    rng = random.Random(seed)
    words = [rng.choice(COLS) if rng.random() < frac else None for _ in scs]
    idx = [i for i, w in enumerate(words) if w]
    where = ["bottom" if s.objects[0].cy < s.size / 2 else "top" for s in scs]
    pixels = pixels.clone()
    if idx:
        pixels[idx] = write_words(pixels[idx], [words[i] for i in idx], [where[i] for i in idx])
    records = [dict(r) for r in records]
    for i in idx:
        records[i]["captions"] = [records[i]["captions"][0][:-1] + f" and the word {words[i]}."]
    return records, pixels


def answer_loss(vlm: VLM):
    """loss_fn(pixels, prompt ids, answer token) for adversarial_train: cross-entropy of the first answer token."""
    return lambda x, ids, tgt: F.cross_entropy(vlm(ids, pixels=x)[:, -1], tgt, reduction="none")


def table(model, pixels: torch.Tensor, y: torch.Tensor, typo: tuple, pgd_steps: int, batch: int, vqa: bool) -> dict:
    """Accuracy clean, under FGSM and PGD at each eps, and with the wrong / neutral word written on."""
    def run(x_fn) -> dict:
        preds = []
        for start in range(0, len(y), batch):
            idx = torch.arange(start, min(start + batch, len(y)))
            x = x_fn(pixels[idx], y[idx], idx)
            preds.append(model.predict(x, idx) if vqa else model.predict(x))
        return acc(torch.cat(preds) == y)

    def attacked(cfg):
        def x_fn(x, yy, idx):
            fn = model.loss_fn(yy, idx) if vqa else model.loss_fn(yy)
            return attack(cfg, fn, x)
        return x_fn

    out = {"clean": run(lambda x, yy, idx: x)}
    for kind in ("fgsm", "pgd"):
        for eps in EPS:
            out[f"{kind}_eps{eps}"] = run(attacked(AttackConfig(kind=kind, eps=eps, steps=pgd_steps, seed=eps)))
    wrong, neutral, where = typo
    x_wrong, x_neutral = write_words(pixels, wrong, where), write_words(pixels, neutral, where)
    out["typo_wrong"] = run(lambda x, yy, idx: x_wrong[idx])
    out["typo_neutral"] = run(lambda x, yy, idx: x_neutral[idx])
    said = torch.tensor([COLS.index(w) for w in wrong])
    preds = torch.cat([(model.predict(x_wrong[i:i + batch], torch.arange(i, min(i + batch, len(y)))) if vqa
                        else model.predict(x_wrong[i:i + batch])) for i in range(0, len(y), batch)])
    out["typo_follows_word"] = acc(preds == said)  # how often the model answers the written colour
    return out


def figure(clip_model: ClipColour, pixels: torch.Tensor, y: torch.Tensor, typo: tuple, path) -> None:
    """Four test pictures: clean, FGSM 8/255, PGD 8/255, the PGD perturbation x10, wrong word, neutral word."""
    k, scale, tile = 4, 4, 32 * 4
    x = pixels[:k]
    fgsm8 = attack(AttackConfig(kind="fgsm", eps=8), clip_model.loss_fn(y[:k]), x)
    pgd8 = attack(AttackConfig(kind="pgd", eps=8, steps=10), clip_model.loss_fn(y[:k]), x)
    pert = ((pgd8 - x) * 10).clamp(-1, 1)
    wrong, neutral, where = typo
    cols = [("clean", x), ("FGSM 8/255", fgsm8), ("PGD 8/255", pgd8), ("PGD delta x10", pert),
            ("wrong word", write_words(x, wrong[:k], where[:k])),
            ("neutral word", write_words(x, neutral[:k], where[:k]))]
    font = ImageFont.load_default(size=11)
    canvas = Image.new("RGB", (len(cols) * (tile + 6), 16 + k * (tile + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, batch) in enumerate(cols):
        draw.text((c * (tile + 6), 2), title, fill=(0, 0, 0), font=font)
        preds = clip_model.predict(batch).tolist()
        for r, img in enumerate(from_pixels(batch)):
            top = 16 + r * (tile + 16)
            canvas.paste(img.resize((tile, tile), Image.NEAREST), (c * (tile + 6), top))
            if c != 3:
                ok = preds[r] == int(y[r])
                draw.text((c * (tile + 6), top + tile + 1), f"CLIP: {COLS[preds[r]]}", font=font,
                          fill=(0, 120, 0) if ok else (200, 0, 0))
    buf = io.BytesIO()
    canvas.quantize(colors=128).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    print(f"wrote {path} ({len(buf.getvalue()) // 1024} KB)")


def records_out(model: str, tab: dict, common: dict) -> list[dict]:
    rows = []
    clean = tab["clean"]
    for kind in ("fgsm", "pgd"):
        for eps in EPS:
            r = tab[f"{kind}_eps{eps}"]
            rows.append(result(NAME, f"{model}_acc_{kind}_eps{eps}", True, r["acc"], "clean accuracy", clean["acc"],
                               attacked=r, clean=clean, **common))
    for eps in EPS:
        f, p = tab[f"fgsm_eps{eps}"], tab[f"pgd_eps{eps}"]
        rows.append(result(NAME, f"{model}_acc_pgd_vs_fgsm_eps{eps}", False, max(p["acc"], 1e-4), "FGSM",
                           max(f["acc"], 1e-4), goal=1.0, pgd=p, fgsm=f, **common))
    w, n = tab["typo_wrong"], tab["typo_neutral"]
    rows.append(result(NAME, f"{model}_acc_typographic_wrong_vs_neutral_word", True, w["acc"],
                       "neutral word (control)", n["acc"], wrong=w, neutral=n, clean=clean,
                       follows_written_word=tab["typo_follows_word"], **common))
    return rows


@torch.no_grad()
def word_shift(vlm: VLM, pixels: torch.Tensor, x_word: torch.Tensor) -> dict:
    """How far a written word moves the ViT's patch features the LM reads, relative to their mean norm: on the
    patches the word's ink touches, and on the others (the object's), which only attention can reach."""
    f0, f1 = vlm.features(pixels), vlm.features(x_word)
    ps = vlm.config.vision.patch_size
    touched = F.max_pool2d((x_word != pixels).any(1, keepdim=True).float(), ps).flatten(1).bool()
    delta = (f1 - f0).norm(dim=-1) / f0.norm(dim=-1).mean(dim=-1, keepdim=True)
    return {"word_patches": round(delta[touched].mean().item(), 4),
            "other_patches": round(delta[~touched].mean().item(), 4)}


def vlm_words_only(vq: VlmColour, pixels: torch.Tensor, y: torch.Tensor, typo: tuple, batch: int) -> dict:
    """The cheap part of table(): accuracy clean and with each written word (no FGSM/PGD)."""
    wrong, neutral, where = typo
    out = {}
    for key, x in (("clean", pixels), ("typo_wrong", write_words(pixels, wrong, where)),
                   ("typo_neutral", write_words(pixels, neutral, where))):
        preds = torch.cat([vq.predict(x[i:i + batch], torch.arange(i, min(i + batch, len(y))))
                           for i in range(0, len(y), batch)])
        out[key] = acc(preds == y)
    return out


def earlier_attempts() -> dict:
    """metric -> the earlier runs' numbers (the current file's record, newest first, and what it kept before)."""
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    out = {}
    for r in json.loads(path.read_text()):
        before = r["config"].get("total_seconds")
        last = {"ours": r["ours"], "baseline": r["baseline"]["value"], "ratio": r["ratio"], "date": r["date"],
                "total_seconds": before}
        out[r["metric"]] = [last] + r["config"].get("earlier_attempts", [])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps; writes nothing under results/")
    ap.add_argument("--n_train", type=int, default=3000)
    ap.add_argument("--n_test", type=int, default=512)
    ap.add_argument("--n_vqa", type=int, default=256)
    ap.add_argument("--clip_steps", type=int, default=500)
    ap.add_argument("--vlm_steps", type=int, default=200)
    ap.add_argument("--tecoa_steps", type=int, default=200)
    ap.add_argument("--reader_steps", type=int, default=750)
    ap.add_argument("--vlm_adv_steps", type=int, default=60)
    ap.add_argument("--pgd_steps", type=int, default=10)
    args = ap.parse_args()
    if args.smoke:
        args.n_train, args.n_test, args.n_vqa, args.clip_steps, args.vlm_steps, args.tecoa_steps = 64, 16, 8, 3, 3, 2
        args.vlm_adv_steps, args.reader_steps = 2, 3
        args.pgd_steps = 2
    size, t_start = 32, time.perf_counter()
    torch.manual_seed(0)
    tok = shapes_tokenizer()
    train_sc, test_sc = scenes(args.n_train, size, seed=1), scenes(args.n_test, size, seed=2)
    train_px = to_pixels([render(s) for s in train_sc], size)
    test_px = to_pixels([render(s) for s in test_sc], size)
    y = torch.tensor([COLS.index(s.objects[0].colour) for s in test_sc])
    y_pair = torch.tensor([PAIRS.index((s.objects[0].colour, s.objects[0].shape)) for s in test_sc])
    typo = typo_words(test_sc, seed=3)
    vision = VisionConfig(image_size=size, patch_size=4, d_model=64, n_layers=2, n_heads=4)

    # CLIP, trained with clip_train.fit
    text = TextConfig(vocab_size=tok.vocab_size, max_seq_len=24, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
    clip = CLIP(CLIPConfig(vision=vision, text=text, embed_dim=64))
    clip_cfg = CLIPTrainConfig(steps=args.clip_steps, batch_size=64, lr=3e-3, warmup=50, seed=0, progress=False,
                               log_every=max(1, args.clip_steps // 5))
    t = time.perf_counter()
    rows = fit(clip, tok, records_of(train_sc), train_px, clip_cfg)
    clip_train = {"steps": rows[-1]["step"], "seconds": round(time.perf_counter() - t, 1), "loss": rows[-1]["loss"]}
    clip.eval()
    print("clip trained:", clip_train)
    standard = ClipColour(clip, tok)
    t = time.perf_counter()
    tab_std = table(standard, test_px, y, typo, args.pgd_steps, 128, vqa=False)
    tab_std["pair_clean"] = acc(standard.predict_pair(test_px) == y_pair)
    print("clip standard:", tab_std, f"{time.perf_counter() - t:.0f}s")
    figure(standard, test_px, y, typo,
           RESULTS / f"{NAME}.png" if not args.smoke else "/tmp/vision_adversarial_smoke.png")

    # a CLIP that learned to read: half its training pictures carry a colour word that their caption names
    torch.manual_seed(0)
    reader = CLIP(CLIPConfig(vision=vision, text=text, embed_dim=64))
    read_records, read_px = with_written_words(records_of(train_sc), train_px, train_sc, 0.5, seed=4)
    t = time.perf_counter()
    rows = fit(reader, tok, read_records, read_px, dataclasses.replace(clip_cfg, steps=args.reader_steps))
    reader_train = {"steps": rows[-1]["step"], "seconds": round(time.perf_counter() - t, 1), "loss": rows[-1]["loss"],
                    "written_word_share": 0.5}
    reader.eval()
    tab_reader = table(ClipColour(reader, tok), test_px, y, typo, args.pgd_steps, 128, vqa=False)
    print("reading clip:", reader_train, tab_reader)

    # TeCoA: adversarial fine-tuning of the image tower against the fixed colour prompts
    train_y = torch.tensor([COLS.index(s.objects[0].colour) for s in train_sc])
    tecoa_cfg = AdvTrainConfig(steps=args.tecoa_steps, batch_size=64, lr=5e-4, seed=0, overlay_prob=OVERLAY,
                               attack=AttackConfig(kind="pgd", eps=4, steps=3))
    # the control: the same loop, steps and lr on clean pictures (eps 0), so the gain is the attack's, not the
    # extra supervised steps'
    clip_ft = copy.deepcopy(clip)
    hist_ft = adversarial_train_clip(clip_ft, train_px, train_y, standard.class_emb,
                                     dataclasses.replace(tecoa_cfg, attack=AttackConfig(kind="pgd", eps=0)))
    clip_ft.eval()
    control = ClipColour(clip_ft, tok)
    control.class_emb = standard.class_emb
    tab_clip_ft = table(control, test_px, y, typo, args.pgd_steps, 128, vqa=False)
    tab_clip_ft["pair_clean"] = acc(control.predict_pair(test_px) == y_pair)
    clip_ft_train = {"steps": hist_ft["steps"], "seconds": round(hist_ft["seconds"], 1)}
    print("clip clean fine-tune:", clip_ft_train, tab_clip_ft)
    hist = adversarial_train_clip(clip, train_px, train_y, standard.class_emb, tecoa_cfg)
    clip.eval()
    tecoa_train = {"steps": hist["steps"], "seconds": round(hist["seconds"], 1), "adv_loss_first": hist["adv_loss"][0],
                   "adv_loss_last": sum(hist["adv_loss"][-10:]) / len(hist["adv_loss"][-10:])}
    print("tecoa:", tecoa_train)
    robust = ClipColour(clip, tok)
    robust.class_emb = standard.class_emb  # the text side is untouched; the same prompts
    tab_tecoa = table(robust, test_px, y, typo, args.pgd_steps, 128, vqa=False)
    tab_tecoa["pair_clean"] = acc(robust.predict_pair(test_px) == y_pair)
    print("clip tecoa:", tab_tecoa)

    # VLM, trained with vlm_train.train_vlm on the colour questions
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vision=vision, lm=ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                                      max_seq_len=96), image_token_id=tok.token_to_id(IMAGE_TOKEN)))
    vlm_stats = train_vlm(VLMTrainConfig(task="vqa", steps=args.vlm_steps, batch_size=64, lr=2e-3, warmup=20),
                          records_of(train_sc), vlm, tok, pixels=train_px)
    vlm.eval()
    vlm_train = {"steps": vlm_stats["steps"], "seconds": round(vlm_stats["seconds"], 1),
                 "loss_last": vlm_stats["loss_last"]}
    print("vlm trained:", vlm_train)
    vq_sc = test_sc[:args.n_vqa]
    vq = VlmColour(vlm, tok, vq_sc)
    typo_vq = tuple(part[:args.n_vqa] for part in typo)
    tab_vlm = table(vq, test_px[:args.n_vqa], y[:args.n_vqa], typo_vq, args.pgd_steps, 64, vqa=True)
    print("vlm:", tab_vlm)

    # Madry adversarial training of the whole VLM on the colour questions (the generic loop)
    train_vq = VlmColour(vlm, tok, train_sc)
    train_target = train_vq.colour_ids[torch.tensor([COLS.index(s.objects[0].colour) for s in train_sc])]
    vlm_adv_cfg = AdvTrainConfig(steps=args.vlm_adv_steps, batch_size=64, lr=5e-4, seed=0, overlay_prob=OVERLAY,
                                 attack=AttackConfig(kind="pgd", eps=4, steps=3))
    vlm_ft = copy.deepcopy(vlm)  # the control: the same loop on clean pictures
    hist_ft = adversarial_train(vlm_ft, answer_loss(vlm_ft), (train_px, train_vq.ids, train_target),
                                dataclasses.replace(vlm_adv_cfg, attack=AttackConfig(kind="pgd", eps=0)))
    vlm_ft.eval()
    vlm_ft_train = {"steps": hist_ft["steps"], "seconds": round(hist_ft["seconds"], 1)}
    vq_ft = VlmColour(vlm_ft, tok, vq_sc)
    tab_vlm_ft = table(vq_ft, test_px[:args.n_vqa], y[:args.n_vqa], typo_vq, args.pgd_steps, 64, vqa=True)
    print("vlm clean fine-tune:", vlm_ft_train, tab_vlm_ft)
    # the diagnosis: the earlier recipe (Madry, no overlays) on a copy, scored on words only, and how far a word
    # moves each model's patch features
    vlm_plain = copy.deepcopy(vlm)
    hist_plain = adversarial_train(vlm_plain, answer_loss(vlm_plain), (train_px, train_vq.ids, train_target),
                                   dataclasses.replace(vlm_adv_cfg, overlay_prob=0.0))
    vlm_plain.eval()
    x_vq = test_px[:args.n_vqa]
    x_word = write_words(x_vq, typo_vq[1], typo_vq[2])
    tab_plain = vlm_words_only(VlmColour(vlm_plain, tok, vq_sc), x_vq, y[:args.n_vqa], typo_vq, 64)
    shifts = {"standard": word_shift(vlm, x_vq, x_word), "clean_finetune": word_shift(vlm_ft, x_vq, x_word),
              "madry_no_overlay": word_shift(vlm_plain, x_vq, x_word)}
    print("madry without overlays:", round(hist_plain["seconds"], 1), tab_plain)
    hist = adversarial_train(vlm, answer_loss(vlm), (train_px, train_vq.ids, train_target), vlm_adv_cfg)
    vlm.eval()
    shifts["madry_overlay"] = word_shift(vlm, x_vq, x_word)
    print("patch feature shift by a neutral word:", shifts)
    vlm_adv_train = {"steps": hist["steps"], "seconds": round(hist["seconds"], 1),
                     "adv_loss_first": hist["adv_loss"][0],
                     "adv_loss_last": sum(hist["adv_loss"][-10:]) / len(hist["adv_loss"][-10:])}
    print("vlm adversarial training:", vlm_adv_train)
    tab_vlm_adv = table(vq, test_px[:args.n_vqa], y[:args.n_vqa], typo_vq, args.pgd_steps, 64, vqa=True)
    print("vlm after adversarial training:", tab_vlm_adv)

    common = {"image_size": size, "n_train": args.n_train, "pgd_steps": args.pgd_steps,
              "pgd_step_size": "2.5 * eps / steps, random start, best iterate", "eps_units": "1/255 of [0,1] pixels",
              "clip_train": clip_train, "tecoa_train": dict(tecoa_train, attack="pgd eps 4/255, 3 steps", lr=5e-4),
              "clip_clean_finetune": clip_ft_train, "reading_clip_train": reader_train,
              "vlm_clean_finetune": vlm_ft_train,
              "vlm_train": vlm_train, "vlm_adv_train": dict(vlm_adv_train, attack="pgd eps 4/255, 3 steps", lr=5e-4),
              "font_size": FONT, "overlay_prob": OVERLAY,
              "overlay_words": "adversarial_train.OVERLAY_WORDS (colours, shapes, neutral words apart from the "
                               "test's NEUTRAL)",
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    out = records_out("clip_zero_shot_colour", tab_std, dict(common, model="standard CLIP"))
    out += records_out("clip_tecoa_zero_shot_colour", tab_tecoa, dict(common, model="CLIP after TeCoA"))
    out += records_out("vqa_colour", tab_vlm, dict(common, model="VLM (projector)"))
    out += records_out("vqa_colour_adv_trained", tab_vlm_adv, dict(common, model="VLM after Madry training"))
    out += records_out("clip_reading_zero_shot_colour", tab_reader,
                       dict(common, model="CLIP trained with written colour words named in half its captions"))
    out += records_out("clip_clean_finetune_zero_shot_colour", tab_clip_ft, dict(common, model="CLIP, clean fine-tune"))
    out += records_out("vqa_colour_clean_finetune", tab_vlm_ft, dict(common, model="VLM, clean fine-tune"))
    keys = ["clean"] + [f"{k}_eps{e}" for k in ("fgsm", "pgd") for e in EPS] + ["typo_wrong"]
    control = "the same fine-tune on clean pictures (eps 0; same loop, steps, lr, batches)"
    for prefix, ours, base, base_name, goals in (
            ("clip_tecoa_vs_clean_finetune", tab_tecoa, tab_clip_ft, "CLIP: " + control, True),
            ("clip_tecoa_vs_standard", tab_tecoa, tab_std, "standard CLIP (no fine-tune)", False),
            ("vqa_adv_trained_vs_clean_finetune", tab_vlm_adv, tab_vlm_ft, "VLM: " + control, True),
            ("vqa_adv_trained_vs_standard", tab_vlm_adv, tab_vlm, "standard VLM (no fine-tune)", False)):
        for key in keys:
            # goals set before the first run with controls: 1.5x the control's accuracy under PGD at the training
            # eps, and at least 90% of its clean accuracy
            goal = (1.5 if key == "pgd_eps4" else (0.9 if key == "clean" else None)) if goals else None
            out.append(result(NAME, f"{prefix}_acc_{key}", True, ours[key]["acc"], base_name, base[key]["acc"],
                              goal=goal, robust=ours[key], standard=base[key], **common))
    out.append(result(NAME, "clip_tecoa_vs_clean_finetune_acc_pair_clean", True, tab_tecoa["pair_clean"]["acc"],
                      "CLIP: " + control, tab_clip_ft["pair_clean"]["acc"], tecoa=tab_tecoa["pair_clean"],
                      control=tab_clip_ft["pair_clean"], standard=tab_std["pair_clean"],
                      task="44-way colour x shape zero-shot", **common))
    w, n = tab_plain["typo_wrong"], tab_plain["typo_neutral"]
    out.append(result(NAME, "vqa_colour_adv_trained_no_overlay_acc_typographic_wrong_vs_neutral_word", True,
                      w["acc"], "neutral word (control)", n["acc"], wrong=w, neutral=n, clean=tab_plain["clean"],
                      model="VLM after Madry training WITHOUT word overlays (the earlier recipe; diagnosis)",
                      madry_no_overlay_train={"steps": hist_plain["steps"], "seconds": round(hist_plain["seconds"], 1)},
                      **common))
    out.append(result(NAME, "vqa_adv_trained_word_feature_shift_other_patches", False,
                      shifts["madry_overlay"]["other_patches"], "Madry without overlays",
                      shifts["madry_no_overlay"]["other_patches"], shifts=shifts,
                      what="mean |f(picture + neutral word) - f(picture)| / mean |f(picture)| over the ViT patch "
                           "features the LM reads, on patches the word does not touch (word_patches: those it does)",
                      **common))
    print(f"total {time.perf_counter() - t_start:.0f}s")
    if not args.smoke:
        earlier = earlier_attempts()
        for r in out:
            if r["metric"] in earlier:
                r["config"]["earlier_attempts"] = [dict(earlier[r["metric"]][0], what_changed=CHANGED)] + \
                    earlier[r["metric"]][1:]
        write_result(NAME, out)


if __name__ == "__main__":
    main()
