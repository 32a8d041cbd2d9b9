"""Padded vocabularies: what the LM-head mask changes, measured on Tiny Shakespeare.

Two identical small models (same seed, data order and steps) are trained with an embedding table padded
past the tokenizer (BPE ids rounded up to a multiple of 64, as the speedrun rounds 3,743 up to 4,096):
  - "unmasked": padded rows left alone, as training did before real_vocab_size (the baseline);
  - "masked":   real_vocab_size = the tokenizer's size, so the head gives padded rows zero probability.
Then, on held-out (context, continuation) items:
  - val_ce_real_ids: cross-entropy over the real ids (the unmasked model scored at its best, cut to the
    tokenizer) -- the mask must not cost quality;
  - padded_mass: probability the model puts on padded rows (config);
  - item disagreement: |in-process score - served score| per item, in nats, through a live `lmstack serve`
    (OpenAICompletionsLM) against LocalLM. "before" is LocalLM's old rule (log-softmax over every row)
    against the server, which always cut to the tokenizer's ids; "after" is today's LocalLM (one rule).

Usage:
    python benchmarks/padded_vocab.py            # ~3 minutes on 2 shared cores; writes results/padded_vocab.json
"""
from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import result, write_result

import lmstack
from lmstack.model.presets import preset
from lmstack.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
STEPS, BATCH, SEQ, LR, N_ITEMS = 400, 16, 64, 3e-3, 100


CURVE_AT = (0, 25, 50, 100, 200, 400)


def train(model, ids: torch.Tensor, seed: int, probe=None) -> list[float]:
    """Plain AdamW next-token loop; probe(step) runs at the steps in CURVE_AT (before that step's update)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    model.train()
    for step in range(STEPS + 1):
        if probe is not None and step in CURVE_AT:
            probe(step)
            model.train()
        if step == STEPS:
            break
        lr = LR * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=g)
        x = torch.stack([ids[s:s + SEQ] for s in starts])
        y = torch.stack([ids[s + 1:s + SEQ + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def held_out_stats(model, ids: torch.Tensor, n_real: int) -> tuple[float, float, float]:
    """(CE over real ids, mean and max probability mass on padded rows) on held-out windows."""
    model.eval()
    x = torch.stack([ids[s:s + SEQ] for s in range(0, len(ids) - SEQ - 1, SEQ)][:64])
    y = torch.stack([ids[s + 1:s + SEQ + 1] for s in range(0, len(ids) - SEQ - 1, SEQ)][:64])
    logits = model(x).float()
    ce = F.cross_entropy(logits[..., :n_real].flatten(0, 1), y.flatten()).item()
    mass = logits.softmax(-1)[..., n_real:].sum(-1)
    return ce, mass.mean().item(), mass.max().item()


def items(text: str, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    while len(out) < N_ITEMS:
        i = rng.randrange(0, len(text) - 200)
        i = text.find(" ", i) + 1
        ctx, cont = text[i:i + 120].rsplit(" ", 1)[0], ""
        rest = text[i + len(ctx):]
        cont = " " + " ".join(rest.split()[:3])
        if ctx.strip() and cont.strip():
            out.append((ctx, cont))
    return out


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from serve_helpers import start_server

    from lmstack.eval.lm import TokenRules as LocalLMRules
    from lmstack.eval.local_lm import LocalLM
    from lmstack.eval.openai_lm import OpenAICompletionsLM

    text = DATA.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    train_text, val_text = text[:split], text[split:]
    tok = train_tokenizer(texts=train_text.split("\n\n")[:2000], type="bpe", vocab_size=480, special_tokens="chat",
                          show_progress=False)
    n_real = tok.vocab_size
    rows = -(-n_real // 64) * 64
    train_ids = torch.tensor(tok.encode(train_text, add_special_tokens=False))
    val_ids = torch.tensor(tok.encode(val_text, add_special_tokens=False))
    cfg = dict(vocab_size=rows, d_model=128, n_layers=2, n_heads=4, max_seq_len=256)
    qa = items(val_text, random.Random(0))
    rec: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("unmasked", "masked"):
            torch.manual_seed(0)
            extra = {"real_vocab_size": n_real} if kind == "masked" else {}
            model = lmstack.Transformer(preset("llama-tiny", **cfg, **extra))
            start = time.perf_counter()
            pairs = [LocalLMRules(tok).pair(c, x) for c, x in qa]
            curve = {}

            @torch.no_grad()
            def probe(step):  # max item |all-rows score - real-rows score| (the served rule) during training
                model.eval()
                worst = 0.0
                for ctx, cont in pairs[:40]:
                    logits = model(torch.tensor([ctx + cont]))[0].float()
                    rows = range(len(ctx) - 1, len(ctx) - 1 + len(cont))
                    full = logits.log_softmax(-1)
                    cut = logits[:, :n_real].log_softmax(-1)
                    worst = max(worst, abs(sum(float(full[r, t] - cut[r, t]) for r, t in zip(rows, cont))))
                curve[str(step)] = worst

            losses = train(model, train_ids, seed=1, probe=probe)
            ce, mass, mass_max = held_out_stats(model, val_ids, n_real)
            path = lmstack.save_model(model.eval(), Path(tmp) / kind, tokenizer=tok)
            local = LocalLM(path, batch_size=16, device="cpu")
            after = [ll for ll, _ in local.loglikelihood(qa)]
            # LocalLM's rule before this fix: log-softmax over every row of the head, padded ones included.
            pairs = [local.rules.pair(c, x) for c, x in qa]
            before = []
            with torch.no_grad():
                for ctx, cont in pairs:
                    logp = model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
                    before.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            srv = start_server(path)
            try:
                remote = OpenAICompletionsLM(srv.url, "tiny-llama", tokenizer=path, max_length=255, batch_size=16)
                served = [ll for ll, _ in remote.loglikelihood(qa)]
                remote.close()
            finally:
                srv.stop()
            rec[kind] = dict(val_ce=ce, padded_mass_mean=mass, padded_mass_max=mass_max, final_train_loss=losses[-1],
                             train_seconds=time.perf_counter() - start,
                             max_diff_before=max(abs(a - b) for a, b in zip(before, served)),
                             mean_diff_before=sum(abs(a - b) for a, b in zip(before, served)) / len(qa),
                             max_diff_after=max(abs(a - b) for a, b in zip(after, served)), curve=curve)
            print(kind, rec[kind])
    common = dict(machine="2 cores, shared", data="tinyshakespeare input.txt, 90/10 split", tokenizer=f"bpe {n_real} ids",
                  table_rows=rows, padded_rows=rows - n_real, model="llama-tiny d128 L2 H4", steps=STEPS, batch=BATCH,
                  seq_len=SEQ, lr=LR, n_items=len(qa), threads=1)
    u, m = rec["unmasked"], rec["masked"]
    out = [
        result("padded_vocab", "val_ce_real_ids", False, m["val_ce"], "unmasked padded rows (before)", u["val_ce"],
               goal=1.0, padded_mass_mean_masked=m["padded_mass_mean"], padded_mass_mean_unmasked=u["padded_mass_mean"],
               padded_mass_max_unmasked=u["padded_mass_max"], **common),
        result("padded_vocab", "max_local_vs_served_nats_unmasked_model", False, u["max_diff_after"],
               "LocalLM over all rows (before)", u["max_diff_before"], goal=None,
               mean_before=u["mean_diff_before"], masked_model_max_after=m["max_diff_after"],
               masked_model_max_before=m["max_diff_before"], curve_steps=list(CURVE_AT),
               curve_max_all_rows_minus_real_rows_nats=[u["curve"][str(s)] for s in CURVE_AT], **common),
    ]
    # A zero would make the ratio infinite; JSON has no infinity, so store null and say why.
    if u["max_diff_after"] == 0:
        raise SystemExit("after = 0 exactly: the ratio is unbounded; report the numbers instead")
    write_result("padded_vocab", out)


if __name__ == "__main__":
    main()
