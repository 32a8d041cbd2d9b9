"""AdapterFusion and Compacter against the existing Houlsby adapters and IA3, from one small pretrained base.

1. Pretrain a small llama-style model (d 64 x 2 layers) for a fixed number of steps on the synthetic world's
   biographies, plain-text QA, city facts and worked arithmetic (no chats).
2. Single task, knowledge QA in chat form (SFT on the QA chats of half the people, scored on the other half's):
   Houlsby adapter (the existing `adapter` method), IA3, Compacter and full fine-tuning, the same steps each.
3. Fusion: two Houlsby source adapters, one trained on QA chats and one on arithmetic chats, are frozen; a
   fusion over them is trained on a 1:1 mix of both tasks and scored on both held-out sets. Its baselines: a
   new Houlsby adapter trained on the same mix for the same steps, and each source adapter alone.

Scores: teacher-forced accuracy of the assistant reply tokens, averaged per item (n items, stderr across
items), and exact = the whole reply right. Learning rates are common-practice values, untuned for every
method alike. Trainable-parameter counts are arithmetic (they match the formulas in the modules).

Usage:
    python benchmarks/adapter_fusion.py [--steps 80] [--pretrain_steps 250]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from _common import result, write_result

SEQ, BATCH = 128, 16
LR = {"full": 1e-3, "adapter": 3e-3, "ia3": 1e-2, "compacter": 3e-3, "fusion": 3e-3}
FIELDS = {"adapter": {"bottleneck_dim": 16}, "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"]},
          "compacter": {"bottleneck_dim": 16, "phm_dim": 4, "phm_rank": 1}, "full": {}}


def base_model(steps: int):
    from _tiny_lm import train_for

    from lmstack.world import World
    from lmstack.model import ModelConfig, Transformer
    from lmstack.tokenizer import train_tokenizer

    w = World(seed=0, n_people=60)
    texts = [r["text"] for r in w.corpus("pretrain", split="train")
             if r["kind"] in ("bio", "qa", "city", "country", "arithmetic")]
    chats = [r["text"] for r in w.corpus("chat", split="train")]
    tok = train_tokenizer(texts=texts + chats, type="bpe", vocab_size=1024, show_progress=False, special_tokens="chat")
    ids: list[int] = []
    for one in tok.encode_batch(texts):
        ids.extend([tok.bos_id] + one + [tok.eos_id])
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                      max_seq_len=256, hf_model_type="llama", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    losses = train_for(model, torch.tensor(ids), seconds=1e9, max_steps=steps, batch=BATCH, seq_len=SEQ, lr=3e-3)
    print(f"base: {steps} steps, final loss {sum(losses[-10:]) / 10:.3f}", flush=True)
    return model.eval(), tok, w


def tasks(tok, w):
    from lmstack.adapt.sft import encode_rows

    rows = w.corpus("chat", split="train")
    qa = [r for r in rows if r["kind"] == "qa"]
    held = set(sorted({r["person"] for r in qa})[1::2])
    qa_train, _ = encode_rows(tok, [r for r in qa if r["person"] not in held], max_len=SEQ + 1)
    qa_eval, _ = encode_rows(tok, [r for r in qa if r["person"] in held], max_len=SEQ + 1)
    ar_train, _ = encode_rows(tok, [r for r in rows if r["kind"] == "arithmetic"], max_len=SEQ + 1)
    ar_eval, _ = encode_rows(tok, [r for r in w.corpus("chat", split="val") if r["kind"] == "arithmetic"],
                             max_len=SEQ + 1)
    return {"qa": (qa_train, qa_eval), "arithmetic": (ar_train, ar_eval)}


@torch.no_grad()
def score(model, examples, pad_id: int) -> dict:
    """Per-item reply-token accuracy: mean, stderr across items, exact-match rate, n items."""
    from lmstack.adapt.sft import SFTExample, pack_examples

    model.eval()
    accs, exact = [], 0
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        width = min(SEQ, max(len(e) - 1 for e in chunk))
        b = pack_examples([SFTExample(e.ids[:width + 1], e.mask[:width + 1]) for e in chunk], width, pad_id,
                          strategy="none")
        ok = model(b["input_ids"]).argmax(-1) == b["targets"]
        mask = b["loss_mask"]
        keep = mask.sum(1) > 0
        accs += ((ok & mask).sum(1)[keep] / mask.sum(1)[keep]).tolist()
        exact += int((ok | ~mask).all(1)[keep].sum())
    n = len(accs)
    mean = sum(accs) / n
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1))
    return {"acc": mean, "stderr": sd / math.sqrt(n), "exact": exact / n, "n": n}


def train(model, examples, pad_id: int, steps: int, lr: float) -> float:
    from lmstack.adapt.sft import SFTLoader, SFTObjective, pack_examples

    loader = SFTLoader(pack_examples(examples, SEQ, pad_id, strategy="best_fit"), BATCH, seed=0)
    objective = SFTObjective(use_doc_ids=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:  # warmup, then linear decay to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - 0.9 * step / steps)
        loss, _ = objective.loss(model, next(loader))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def mix(a: list, b: list, seed: int = 0) -> list:
    import random

    n = min(len(a), len(b))
    rng = random.Random(seed)
    out = rng.sample(a, n) + rng.sample(b, n)
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--pretrain_steps", type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lmstack.adapt import AdapterConfig, add_adapter, get_peft_model, set_adapter, trainable_report

    base, tok, w = base_model(args.pretrain_steps)
    data = tasks(tok, w)
    pad = tok.pad_id
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh():
        base.load_state_dict(state)
        import copy

        return copy.deepcopy(base)

    qa_train, qa_eval = data["qa"]
    ar_train, ar_eval = data["arithmetic"]
    rows = {"base": {"qa": score(base, qa_eval, pad), "trainable": 0}}
    # 2. single task: QA
    for method in ("full", "adapter", "ia3", "compacter"):
        torch.manual_seed(0)
        model = get_peft_model(fresh(), AdapterConfig(method=method, **FIELDS[method]))
        secs = train(model, qa_train, pad, args.steps, LR[method])
        rows[method] = {"qa": score(model, qa_eval, pad), "trainable": trainable_report(model)["trainable"],
                        "train_s": secs}
        print(f"{method:>10}: trainable {rows[method]['trainable']:>7,}  QA acc {rows[method]['qa']['acc']:.3f} "
              f"± {rows[method]['qa']['stderr']:.3f} (n={rows[method]['qa']['n']})", flush=True)
    # 3. fusion over a QA adapter and an arithmetic adapter, trained on the 1:1 mix
    model = fresh()
    for p in model.parameters():
        p.requires_grad_(False)
    src = AdapterConfig(method="adapter", **FIELDS["adapter"])
    for name, train_set in (("qa", qa_train), ("arithmetic", ar_train)):
        torch.manual_seed(0)
        add_adapter(model, src, name)
        set_adapter(model, name)
        for n, p in model.named_parameters():
            p.requires_grad_(f".adapters.{name}." in n)
        train(model, train_set, pad, args.steps, LR["adapter"])
        rows[f"source {name}"] = {"qa": score(model, qa_eval, pad), "arithmetic": score(model, ar_eval, pad)}
    mixed = mix(qa_train, ar_train)
    torch.manual_seed(0)
    add_adapter(model, AdapterConfig(method="fusion", fusion_adapters=["qa", "arithmetic"]), "fusion")
    set_adapter(model, "fusion")
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_(".fusions.fusion." in n)
    fusion_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train(model, mixed, pad, args.steps, LR["fusion"])
    rows["fusion"] = {"qa": score(model, qa_eval, pad), "arithmetic": score(model, ar_eval, pad),
                      "trainable": fusion_trainable}
    torch.manual_seed(0)
    model = get_peft_model(fresh(), src)
    train(model, mixed, pad, args.steps, LR["adapter"])
    rows["adapter on mix"] = {"qa": score(model, qa_eval, pad), "arithmetic": score(model, ar_eval, pad),
                              "trainable": trainable_report(model)["trainable"]}
    for name in ("source qa", "source arithmetic", "fusion", "adapter on mix"):
        r = rows[name]
        r["mean"] = (r["qa"]["acc"] + r["arithmetic"]["acc"]) / 2
        r["mean_stderr"] = math.sqrt(r["qa"]["stderr"] ** 2 + r["arithmetic"]["stderr"] ** 2) / 2
        print(f"{name:>18}: QA {r['qa']['acc']:.3f} ± {r['qa']['stderr']:.3f}, arithmetic "
              f"{r['arithmetic']['acc']:.3f} ± {r['arithmetic']['stderr']:.3f}, mean {r['mean']:.3f}", flush=True)

    cfg = {"steps": args.steps, "pretrain_steps": args.pretrain_steps, "batch": BATCH, "seq_len": SEQ,
           "base": "llama-style d64 x2, pretrained on the world (no chats)", "lr": LR, "fields": FIELDS,
           "score": "reply-token accuracy per item, mean over n held-out items, stderr across items",
           "threads": 1, "machine": "2 cores, shared"}
    ad = rows["adapter"]
    results = []
    for method in ("compacter", "ia3", "full"):
        r = rows[method]
        results.append(result("adapter_fusion", f"qa_acc_{method}", True, r["qa"]["acc"], "Houlsby adapter",
                              ad["qa"]["acc"], stderr=r["qa"]["stderr"], baseline_stderr=ad["qa"]["stderr"],
                              n=r["qa"]["n"], exact=r["qa"]["exact"], trainable=r["trainable"],
                              adapter_trainable=ad["trainable"], base_acc=rows["base"]["qa"]["acc"], **cfg))
        results.append(result("adapter_fusion", f"trainable_params_{method}", False, r["trainable"],
                              "Houlsby adapter", ad["trainable"], **cfg))
    results.append(result("adapter_fusion", "qa_acc_adapter", True, ad["qa"]["acc"], "base model, no tuning",
                          rows["base"]["qa"]["acc"], stderr=ad["qa"]["stderr"], n=ad["qa"]["n"],
                          trainable=ad["trainable"], **cfg))
    f, m = rows["fusion"], rows["adapter on mix"]
    results.append(result("adapter_fusion", "mean_acc_qa_arithmetic_fusion", True, f["mean"],
                          "new Houlsby adapter on the same mix", m["mean"], stderr=f["mean_stderr"],
                          baseline_stderr=m["mean_stderr"], rows={k: rows[k] for k in
                                                                  ("source qa", "source arithmetic", "fusion",
                                                                   "adapter on mix")}, **cfg))
    for task in ("qa", "arithmetic"):
        results.append(result("adapter_fusion", f"{task}_acc_fusion", True, f[task]["acc"],
                              f"source {task} adapter alone", rows[f"source {task}"][task]["acc"],
                              stderr=f[task]["stderr"], baseline_stderr=rows[f"source {task}"][task]["stderr"],
                              n=f[task]["n"], **cfg))
    results.append(result("adapter_fusion", "trainable_params_fusion", False, f["trainable"],
                          "new Houlsby adapter", m["trainable"], **cfg))
    write_result("adapter_fusion", results)


if __name__ == "__main__":
    main()
