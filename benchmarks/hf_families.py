"""Which HF families load, measured: for each one, a tiny random transformers model (jittered weights, a
sequence longer than any window) goes HF dir -> lmstack -> export -> transformers, and greedy decoding through
our engine is compared with transformers' generate.

Per family it writes the largest |logit difference| of each direction (lower is better; the baseline is the
1e-4 tolerance the parity tests assert) and how many of 16 greedy tokens agree.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/hf_families.py      # writes benchmarks/results/hf_families.json
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

import lmstack  # noqa: E402
from lmstack.infer import LLM, SamplingParams  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def families() -> dict[str, torch.nn.Module]:
    rope3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope3)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8)),
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                                num_experts_per_tok=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=24)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
            **COMMON, num_key_value_heads=2, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**COMMON, num_key_value_heads=2, sliding_window=8)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                                       bos_token_id=1, eos_token_id=2)),
    }


def measure(name: str, build, tmp: Path) -> dict:
    torch.manual_seed(0)
    hf = build().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():  # jitter: inits of ones / zeros would hide a norm applied the wrong way
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp / "hf")
    ours = lmstack.load_model(tmp / "hf")
    x = torch.randint(0, 128, (2, 40), generator=g)
    with torch.no_grad():
        ref, out = hf(x).logits, ours(x)
    lmstack.save_model(ours, tmp / "ours")
    back = T.AutoModelForCausalLM.from_pretrained(tmp / "ours").eval()
    with torch.no_grad():
        exported = back(x).logits
    prompt = torch.randint(3, 128, (14,), generator=g).tolist()
    hf.generation_config.eos_token_id = None  # all 16 steps, as ignore_eos does (min_new_tokens would mask EOS)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(ours, block_size=4, num_blocks=64, max_batched_tokens=8)
    got = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].outputs[0].token_ids
    load_diff, export_diff = (out - ref).abs().max().item(), (exported - out).abs().max().item()
    worst = max(load_diff, export_diff)
    agree = sum(a == b for a, b in zip(got, theirs))
    return {"benchmark": "hf_families", "metric": f"{name}_max_abs_logit_diff", "higher_is_better": False,
            "ours": worst, "baseline": {"name": "parity tolerance", "value": TOL},
            # ratio: how far inside the tolerance; an exact match (0.0) is reported as the tolerance over 1e-12
            "ratio": round(TOL / max(worst, 1e-12), 4), "goal": TOL,
            "config": {"load_diff": load_diff, "export_diff": export_diff, "exported_as": type(back).__name__,
                       "greedy_tokens_equal": agree, "greedy_tokens": 16, "dtype": "float32", "seq_len": 40,
                       "lmstack_config": {k: getattr(ours.config, k) for k in (
                           "norm_position", "norm_plus_one", "scale_embeddings", "mlp", "sliding_window",
                           "sliding_window_layers", "attn_logit_softcap", "final_logit_softcap", "attn_backend")},
                       "machine": "2 cores, shared"}}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, build in families().items():
        with tempfile.TemporaryDirectory() as d:
            rows.append(measure(name, build, Path(d)))
        c = rows[-1]["config"]
        print(f"{name}: load {c['load_diff']:.2e} export {c['export_diff']:.2e} greedy {c['greedy_tokens_equal']}/16")
    write_result("hf_families", rows)


if __name__ == "__main__":
    main()
