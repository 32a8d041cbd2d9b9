"""`lmstack speedrun`: the main job, end to end on this machine.

Until the training stage lands (issue #5 turns this into data -> tokenizer -> pretrain -> sample ->
report on the synthetic world), the speedrun exercises the model core end to end: it builds a model
from a preset, writes it in HF layout, converts it back through the HF loader, checks that
`transformers` (when installed) loads the export with identical logits, prints the model's counts
and samples from it with the KV-cache decode loop.

Usage:
    lmstack speedrun --preset llama-small --out runs/speedrun
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lmstack.model.commands import convert, generate, info, init


def speedrun(preset: str = "llama-small", out: str = "runs/speedrun", max_new_tokens: int = 32, seed: int = 0) -> dict:
    """Build, export, convert, verify, inspect and sample a model.

    Args:
        preset: model preset to build (see `lmstack model info --help`).
        out: run directory.
        max_new_tokens: tokens to sample at the end.
        seed: seed for weights and sampling.
    """
    start = time.perf_counter()
    run = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    print(f"== 1. build {preset} and write it in HF layout")
    hf_dir = init(preset=preset, out=str(run / "hf"), seed=seed)
    print("== 2. convert the HF directory back into lmstack")
    ours = convert(src=hf_dir, out=str(run / "converted"))
    parity = None
    try:
        import transformers  # optional: only the dev extra installs it

        import lmstack

        print("== 3. check transformers loads the export with identical logits")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        model = lmstack.load_model(ours)
        x = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            parity = float((hf(x).logits - model(x)).abs().max())
        print(f"max |logit difference| vs transformers: {parity:.2e}")
    except ImportError:
        print("== 3. transformers is not installed; skipping the parity check")
    print("== 4. model info")
    info(model=ours)
    print("== 5. sample with the KV cache")
    tokens = generate(model=ours, prompt_ids=[1, 2, 3, 4], max_new_tokens=max_new_tokens, temperature=0.8, top_k=50,
                      seed=seed)
    elapsed = time.perf_counter() - start
    print(f"speedrun finished in {elapsed:.1f}s; model directory: {ours}")
    print(f"sample again with: lmstack model generate --model {ours} --prompt_ids '[1, 2, 3]'")
    return {"run": str(run), "parity": parity, "tokens": tokens, "seconds": elapsed}


COMMANDS = speedrun
