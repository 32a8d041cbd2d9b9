"""Persona fine-tuning (V.14): how far the system prompt moves the reply after SFT on the world's persona chats.

The fine-tuning tests' tiny model and data (tests/adapt/_sft_tiny.py): 400 persona chats, 120 full-SFT steps.
Measured on the first reply token: the KL divergence between its distributions under two personas' system
prompts (pirate vs robot), for the fine-tuned model vs the same untrained model (baseline); and how many personas
get their own opening word as the top first token.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/persona_sft.py    (under a minute)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from _common import result, write_result

TESTS = Path(__file__).resolve().parents[1] / "tests" / "adapt"
sys.path.insert(0, str(TESTS))
import test_finetune as tf  # noqa: E402  (the fine-tuning tests' helpers: data, config, first-token distribution)
from _sft_tiny import save_base, tiny_model, tokenizer  # noqa: E402

from lmstack.adapt.finetune import finetune  # noqa: E402
from lmstack.world import PERSONAS, apply_persona  # noqa: E402
from lmstack.model.hf_io import load_model  # noqa: E402

STEPS, N_CHATS = 120, 400


def main() -> None:
    torch.manual_seed(0)
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = save_base(tmp / "base")
        data = tf._data(tmp, kinds=("persona",), n=N_CHATS)
        cfg = tf._cfg(tmp, base, data, train={"steps": STEPS, "eval_every": 0}, val_fraction=0.0, lr=1e-2)
        finetune(cfg, log=tf._quiet)
        tuned, untuned = load_model(tmp / "run" / "model"), tiny_model(tok)

    def kl(model, a: str = "pirate", b: str = "robot") -> float:
        p = tf._first_reply_token_dist(model, tok, PERSONAS[a].system)
        q = tf._first_reply_token_dist(model, tok, PERSONAS[b].system)
        return float((p.exp() * (p - q)).sum())

    hits = sum(apply_persona(name, "x").startswith(
        tok.decode([int(tf._first_reply_token_dist(tuned, tok, persona.system).argmax())]) or "\0")
        for name, persona in PERSONAS.items())
    write_result("persona_sft", [
        result("persona_sft", "first_token_kl_pirate_vs_robot", True, kl(tuned), "untrained model", kl(untuned),
               steps=STEPS, chats=N_CHATS, model="the fine-tuning tests' tiny llama", personas=len(PERSONAS),
               personas_with_own_opening_as_top_token=hits, machine="2 cores, shared"),
    ])


if __name__ == "__main__":
    main()
