"""Unified image tokens (issue 24, XII.6): VQ vs LFQ reconstruction at equal code bits and equal steps, against a
downsample-then-upsample baseline of the same bits; then one decoder over text + image codes, measured on
text -> image (does the generated picture hold the asked colour and shape?) and image -> text (attribute
exact match of its captions).

Set-up: the shapes world at 32x32 (seed 0; train / val / test splits). Both quantizers: the same conv
encoder/decoder (vq.py), an 8x8 grid of 8-bit codes (codebook 256), so 64 x 8 = 512 bits per image, the same
number of Adam steps and batches.

Baseline, the same 512 bits (arithmetic): the picture averaged down to 8x8 pixels and each pixel stored as 3-3-2
bit RGB (8 levels of red and green, 4 of blue): 64 pixels x 8 bits = 512 bits; decoded by upsampling back to
32x32 (the better of nearest and bilinear on the val split). Also given: 4x4 pixels at 24-bit RGB (16 x 24 = 384
bits, fewer).

Unified model: the quantizer with the better val PSNR tokenizes the pictures; a 4-layer d=128 decoder
Transformer over 513 text ids + <boi>/<eoi> + 256 codes trains on both directions at once (unified.py) on the
train split's scenes of at most 2 objects (captions "In this image you can see a small red circle and ...").
- text -> image: for each test caption, 64 codes sampled (temperature 0.8, chosen before any run; greedy also
  given), decoded by the VQ decoder, judged per asked (colour, shape) by (a) the colour check
  (unified.colour_fractions, nearest palette colour: at least 10 pixels of the asked colour) and (b) a small CNN
  saying which of the 48 (colour, shape) pairs a picture holds, trained here on the VQ decoder's reconstructions
  of the train pictures (the domain generated pictures live in). Baseline: the same judges on the decoded
  picture of ANOTHER test caption (the chance of holding the asked pair); ceiling: the decoded right picture.
- image -> text: greedy caption from the test picture's codes; exact match of its (colour, shape) set with the
  scene's. Baseline: the training set's most frequent (colour, shape) set, always answered.

Measured (2026-12-07, one thread on a shared 2-core machine, 397 s; test split, 576 pictures; 290 asked pairs in
199 test scenes of at most 2 objects):
- reconstruction MSE (PSNR): vq 0.0455 +- 0.0010 (19.4 dB), lfq 0.0578 +- 0.0013 (18.4 dB), baseline 8x8 RGB332
  0.0639 +- 0.0011 (18.0 dB; 4x4 RGB888, 384 bits: 16.7 dB). Both quantizers beat the same-bits baseline; vq beats
  lfq at equal bits and steps. Codebook: vq uses 254/256 codes (perplexity 141); lfq 64/256 (perplexity 59): two
  of its eight sign bits never flip, so it spends 6 of its 8 bits.
- text -> image (the vq tokenizer): the asked pair found by the CNN judge in 25.9% +- 2.6% of generated pictures
  against 16.9% +- 2.2% for another caption's decoded picture (ratio 1.53); ceiling, the right picture decoded:
  89.0% (the judge's false-positive rate on absent pairs is 25%). Colour check: 26.9% +- 2.6% against 17.6% +- 2.2%
  (ceiling 60.3%: the decoder blurs colours; renders 100%). Greedy decoding collapses to plain backgrounds
  (1.7% pair, 2.1% colour): sampling is what draws the objects.
- image -> text: the caption's (colour, shape) set equals the scene's in 9.5% +- 2.1% (n 199) against 1.0% for
  the most frequent training set. The unified decoder's loss was still falling when the budget ended (1.05 at
  step 600, 0.92 at 700; 171 s).

Run: flock /tmp/lmstack-bench-A.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vision_tokens.py
     .venv/bin/python benchmarks/vision_tokens.py --smoke      (seconds; writes nothing under results/)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _common import RESULTS, result, write_result

from lmstack.config import atomic_save_figure, atomic_write_text  # noqa: E402
from lmstack.multimodal.images import to_pixels  # noqa: E402
from lmstack.multimodal.shapes import COLOURS, SHAPES, Scene, render  # noqa: E402
from lmstack.multimodal.text import shapes_tokenizer  # noqa: E402
from lmstack.multimodal.unified import UnifiedVocab, caption_pairs, colour_fractions, generate_captions, \
    generate_image_codes, train_unified, unified_model  # noqa: E402
from lmstack.multimodal.vision_world import build_vision_world  # noqa: E402
from lmstack.multimodal.vq import VQVAE, VQConfig, codebook_stats, load_vq, train_vq  # noqa: E402

PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
COLOUR_MIN_PIXELS = 10
CACHE = Path("/tmp/lmstack-vision-tokens-cache")  # trained models, so a rerun of the judging costs seconds


def mean_se(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return {"mean": round(statistics.fmean(xs), 5), "n": len(xs), "stderr": None if se is None else round(se, 5)}


def per_image_mse(recon: torch.Tensor, target: torch.Tensor) -> list[float]:
    return (recon.clamp(-1, 1) - target).pow(2).mean((1, 2, 3)).tolist()


def psnr_of(mse: float) -> float:
    return 10 * math.log10(4.0 / mse)


def downsample_baseline(x: torch.Tensor, side: int, bits: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Average down to side x side, quantize each channel to 2**bits levels (uniform over [-1, 1]), upsample."""
    small = F.adaptive_avg_pool2d(x, side)
    levels = torch.tensor([2 ** b - 1 for b in bits], dtype=x.dtype)[None, :, None, None]
    q = torch.round((small + 1) / 2 * levels) / levels * 2 - 1
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(q, size=x.shape[-1], mode=mode, **kw).clamp(-1, 1)


def pair_labels(records: list[dict]) -> torch.Tensor:
    y = torch.zeros(len(records), len(PAIRS))
    for i, r in enumerate(records):
        for o in r["scene"]["objects"]:
            y[i, PAIRS.index((o["colour"], o["shape"]))] = 1
    return y


def train_judge(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    """A small CNN saying which (colour, shape) pairs a picture holds (multi-label); positives weighted by the
    negative/positive ratio, since each picture holds about 3 of the 48 pairs."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 96, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(96, len(PAIRS)))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    pos_weight = ((1 - y).sum() / y.sum()).expand(y.shape[1])
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def judge_pairs(net, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.sigmoid(net(x[i:i + 256])) for i in range(0, len(x), 256)]) > 0.5


def asked_hits(pix: torch.Tensor, asked: list[list[tuple[str, str]]], net) -> tuple[list[int], list[int]]:
    """Per asked pair: does the colour check find it; does the CNN judge find it."""
    side = pix.shape[-1]
    frac = colour_fractions(pix)
    found = judge_pairs(net, pix)
    names = list(COLOURS)
    colour_hits, pair_hits = [], []
    for i, pairs in enumerate(asked):
        for colour, shape in pairs:
            colour_hits.append(int(frac[i, names.index(colour)] * side * side >= COLOUR_MIN_PIXELS))
            pair_hits.append(int(found[i, PAIRS.index((colour, shape))]))
    return colour_hits, pair_hits


def scene_pairs(rec: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in rec["scene"]["objects"]}


def caption_of(rec: dict) -> str:
    return next(c for c in rec["captions"] if c.startswith("In this image you can see"))


def save_grid(rows: list[tuple[str, torch.Tensor]], gen_pix: torch.Tensor, gen_caps: list[str], path: Path) -> None:
    import matplotlib  # lazy: plotting only when the figure is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    cols = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(cols * 1.05, (len(rows) + 1) * 1.2))
    for r, (label, pix) in enumerate(rows + [("text->image", gen_pix)]):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(((pix[c].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
            if r == len(rows):
                words = gen_caps[c].replace("In this image you can see ", "").rstrip(".")
                ax.set_xlabel(words.replace(" and ", "\n"), fontsize=4)
    fig.tight_layout(pad=0.2)
    atomic_save_figure(fig, path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    smoke = args.smoke
    t_start = time.perf_counter()
    n_world = 600 if smoke else 6000
    vq_steps, lm_steps, judge_steps = (20, 20, 20) if smoke else (600, 700, 600)
    records = build_vision_world(n_world, 32, seed=0)
    split = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    pix = {s: to_pixels([render(Scene.from_dict(r["scene"])) for r in rs], 32) for s, rs in split.items()}
    print({s: len(r) for s, r in split.items()})

    # ---- reconstruction: vq vs lfq at equal bits and steps
    recon_rows: dict[str, dict] = {}
    models: dict[str, VQVAE] = {}
    cache = CACHE / f"{'smoke' if smoke else 'full'}-{n_world}-{vq_steps}-{lm_steps}"
    for quantizer in ("vq", "lfq"):
        where = cache / quantizer
        if (where / "trained.json").is_file():  # a rerun reuses the trained tokenizer (same config, same seed)
            model, meta = load_vq(where), json.loads((where / "trained.json").read_text())
            history, train_s = meta["history"], meta["train_s"]
        else:
            torch.manual_seed(0)
            model = VQVAE(VQConfig(image_size=32, quantizer=quantizer, codebook_size=256))
            t0 = time.perf_counter()
            history = train_vq(model, pix["train"], steps=vq_steps, batch_size=64, lr=2e-3, seed=0, log_every=100)
            train_s = time.perf_counter() - t0
            model.save(where)
            atomic_write_text(where / "trained.json", json.dumps({"history": history, "train_s": train_s}))
        codes = model.encode(pix["test"])
        mses = per_image_mse(model.decode(codes), pix["test"])
        val_mse = statistics.fmean(per_image_mse(model.decode(model.encode(pix["val"])), pix["val"]))
        models[quantizer] = model
        recon_rows[quantizer] = {"mse": mean_se(mses), "psnr_db": round(psnr_of(statistics.fmean(mses)), 3),
                                 "val_mse": round(val_mse, 5), "code_bits": model.code_bits,
                                 "codebook": codebook_stats(codes, 256), "train_s": round(train_s, 1),
                                 "history": history}
        row = recon_rows[quantizer]
        print(quantizer, row["mse"], row["psnr_db"], row["codebook"])
    base_rows = {}
    for name, side, bits in (("8x8_rgb332_512bits", 8, (3, 3, 2)), ("4x4_rgb888_384bits", 4, (8, 8, 8))):
        val = {m: statistics.fmean(per_image_mse(downsample_baseline(pix["val"], side, bits, m), pix["val"]))
               for m in ("nearest", "bilinear")}
        mode = min(val, key=val.get)
        mses = per_image_mse(downsample_baseline(pix["test"], side, bits, mode), pix["test"])
        base_rows[name] = {"mse": mean_se(mses), "psnr_db": round(psnr_of(statistics.fmean(mses)), 3),
                           "upsample": mode, "bits": side * side * sum(bits)}
    print(base_rows)

    # ---- unified decoder over text + image codes
    best = min(recon_rows, key=lambda q: recon_rows[q]["val_mse"])
    vq = models[best]
    few = {s: [i for i, r in enumerate(split[s]) if len(r["scene"]["objects"]) <= 2] for s in ("train", "test")}
    tok = shapes_tokenizer()
    vocab = UnifiedVocab(tok.vocab_size, 256, vq.cfg.grid ** 2)
    train_codes = vq.encode(pix["train"][few["train"]])
    train_caps = [caption_of(split["train"][i]) for i in few["train"]]
    torch.manual_seed(0)
    lm = unified_model(vocab, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
    where = cache / f"unified_{best}"
    if (where / "trained.json").is_file():
        lm.load_state_dict(load_file(str(where / "model.safetensors")))
        meta = json.loads((where / "trained.json").read_text())
        lm_hist, lm_train_s = meta["history"], meta["train_s"]
        lm.eval()
    else:
        t0 = time.perf_counter()
        lm_hist = train_unified(lm, vocab, tok, train_caps, train_codes, steps=lm_steps, batch_size=32, lr=2e-3,
                                seed=0, log_every=100)
        lm_train_s = time.perf_counter() - t0
        where.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(where / "model.safetensors"))
        atomic_write_text(where / "trained.json", json.dumps({"history": lm_hist, "train_s": lm_train_s}))
    print("unified", lm_hist[-1], round(lm_train_s, 1))

    test_recs = [split["test"][i] for i in few["test"]]
    test_pix = pix["test"][few["test"]]
    asked = [sorted(scene_pairs(r)) for r in test_recs]
    t0 = time.perf_counter()
    gen_codes = generate_image_codes(lm, vocab, tok, [caption_of(r) for r in test_recs], temperature=0.8, seed=0)
    gen_pix = vq.decode(gen_codes)
    t2i_s = time.perf_counter() - t0
    greedy_pix = vq.decode(generate_image_codes(lm, vocab, tok, [caption_of(r) for r in test_recs], temperature=0))
    # The CNN judge learns from the VQ decoder's pictures of the train split (the domain generated pictures are
    # drawn in), so it asks "does this decoded picture hold the pair", not "is it as sharp as a render".
    recon = lambda x: torch.cat([vq.decode(vq.encode(x[i:i + 512])) for i in range(0, len(x), 512)])  # noqa: E731
    judge = train_judge(recon(pix["train"]), pair_labels(split["train"]), judge_steps, seed=0)
    gen_colour, gen_pair = asked_hits(gen_pix, asked, judge)
    greedy_colour, greedy_pair = asked_hits(greedy_pix, asked, judge)
    # baseline: the decoded picture of ANOTHER test caption (rotated by one), judged on the same asked pairs
    test_recon = recon(test_pix)
    base_colour, base_pair = asked_hits(torch.roll(test_recon, 1, dims=0), asked, judge)
    recon_colour, recon_pair = asked_hits(test_recon, asked, judge)  # the ceiling: the right picture, decoded
    real_colour, _ = asked_hits(test_pix, asked, judge)  # the colour check on the renders themselves
    found = judge_pairs(judge, recon(pix["test"]))
    truth = pair_labels(split["test"]).bool()
    judge_exact = (found == truth).all(1).float().tolist()
    judge_false_pos = found[~truth].float().tolist()

    t0 = time.perf_counter()
    texts = generate_captions(lm, vocab, tok, vq.encode(test_pix), max_tokens=40)
    i2t_s = time.perf_counter() - t0
    exact = [int(caption_pairs(t) == scene_pairs(r)) for t, r in zip(texts, test_recs)]
    common = Counter(frozenset(scene_pairs(split["train"][i])) for i in few["train"]).most_common(1)[0][0]
    base_exact = [int(set(common) == scene_pairs(r)) for r in test_recs]
    print("t2i colour", mean_se(gen_colour), "pair", mean_se(gen_pair), "i2t exact", mean_se(exact))
    for t, r in list(zip(texts, test_recs))[:5]:
        print("  ", caption_of(r), "->", t)

    config = {"world": {"n_images": n_world, "size": 32, "seed": 0, **{s: len(r) for s, r in split.items()}},
              "vq": {"grid": "8x8", "codebook_size": 256, "bits_per_image": 512, "steps": vq_steps, "batch": 64,
                     "lr": 2e-3, "hidden": 64, "code_dim_vq": 16, "ema_decay": 0.99, "dead_after": 50,
                     "lfq_entropy_weight": 0.1},
              "unified": {"quantizer": best, "d_model": 128, "n_layers": 4, "vocab": vocab.size, "steps": lm_steps,
                          "batch": 32, "lr": 2e-3, "train_pairs": len(train_caps), "max_objects": 2,
                          "train_s": round(lm_train_s, 1), "final_loss": lm_hist[-1]["loss"], "history": lm_hist,
                          "t2i_seconds": round(t2i_s, 2), "i2t_seconds": round(i2t_s, 2),
                          "temperature": 0.8},
              "judges": {"colour_min_pixels": COLOUR_MIN_PIXELS, "cnn_steps": judge_steps,
                         "cnn_trained_on": "VQ reconstructions of the train split",
                         "colour_recall_renders": mean_se(real_colour),
                         "colour_recall_vq_recon": mean_se(recon_colour), "cnn_recall_vq_recon": mean_se(recon_pair),
                         "cnn_exact_all_48_pairs_vq_recon_test": mean_se(judge_exact),
                         "cnn_false_positive_rate_vq_recon_test": mean_se(judge_false_pos)},
              "greedy_text_to_image": {"pair_found_by_cnn": mean_se(greedy_pair),
                                       "colour_present": mean_se(greedy_colour)},
              "samples": [{"asked": caption_of(r), "generated_caption": t} for t, r in list(zip(texts, test_recs))[:8]],
              "wall_s": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads()}
    lq, vv = recon_rows["lfq"], recon_rows["vq"]
    b = base_rows["8x8_rgb332_512bits"]
    out = [
        result("vision_tokens", "test_mse_vq_512bits", False, vv["mse"]["mean"], "8x8 RGB332 upsampled (512 bits)",
               b["mse"]["mean"], goal=1.0, **config, vq_result=vv, lfq_result=lq, baselines=base_rows),
        result("vision_tokens", "test_mse_lfq_512bits", False, lq["mse"]["mean"], "8x8 RGB332 upsampled (512 bits)",
               b["mse"]["mean"], goal=1.0, vq_result=vv, lfq_result=lq, baselines=base_rows),
        result("vision_tokens", "test_mse_lfq_vs_vq", False, lq["mse"]["mean"], "vq (same bits, same steps)",
               vv["mse"]["mean"], lfq_usage=lq["codebook"], vq_usage=vv["codebook"]),
        result("vision_tokens", "text_to_image_asked_pair_found_by_cnn_judge", True, mean_se(gen_pair)["mean"],
               "the decoded picture of another caption", mean_se(base_pair)["mean"], ours_stats=mean_se(gen_pair),
               baseline_stats=mean_se(base_pair), ceiling_right_picture_decoded=mean_se(recon_pair),
               greedy=mean_se(greedy_pair)),
        result("vision_tokens", "text_to_image_asked_colour_present", True, mean_se(gen_colour)["mean"],
               "the decoded picture of another caption", mean_se(base_colour)["mean"], ours_stats=mean_se(gen_colour),
               baseline_stats=mean_se(base_colour), ceiling_right_picture_decoded=mean_se(recon_colour),
               renders=mean_se(real_colour), greedy=mean_se(greedy_colour)),
        result("vision_tokens", "image_to_text_attribute_exact_match", True, mean_se(exact)["mean"],
               "the most frequent training (colour, shape) set", mean_se(base_exact)["mean"], ours_stats=mean_se(exact),
               baseline_stats=mean_se(base_exact)),
    ]
    if not smoke:
        write_result("vision_tokens", out)
    k = 8
    base8 = downsample_baseline(pix["test"][:k], 8, (3, 3, 2), b["upsample"])
    save_grid([("original", pix["test"][:k]), ("vq", models["vq"].decode(models["vq"].encode(pix["test"][:k]))),
               ("lfq", models["lfq"].decode(models["lfq"].encode(pix["test"][:k]))), ("8x8 rgb332", base8)],
              gen_pix[:k], [caption_of(r) for r in test_recs[:k]],
              Path("/tmp/vision_tokens_smoke.png") if smoke else RESULTS / "vision_tokens.png")


if __name__ == "__main__":
    main()
