"""The CUDA paths, checked and timed on a GPU in one short run: bf16 autocast training, SDPA's flash kernel,
FSDP2 and DDP on NCCL, the inference engine, and the speed each buys against its plain alternative.
The engine's GPU paths (issue 18 §2) each run once: decode CUDA graphs (capture + replay equal eager, host
syncs per decode step, speed with and without), device sampling (greedy exact, sampled in distribution,
seeded reproducible), the KV pool sized from measured memory, and the flex_attention paged backend.

Each check prints PASS/FAIL with its numbers and never hides the others; timings are medians after warm-ups
(CUDA-synchronised). Results go to benchmarks/results/cuda_check.json (and --out DIR). Needs only torch (+
transformers for the decode baseline); run from the repo root:
    PYTHONPATH=src python3 benchmarks/cuda_check.py --out /tmp/out
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmstack.model import Transformer, preset  # noqa: E402

DEV = torch.device("cuda")
RESULTS: dict[str, dict] = {}


def check(name):
    def wrap(fn):
        def run():
            t = time.perf_counter()
            try:
                out = fn() or {}
                RESULTS[name] = {"ok": bool(out.pop("ok", True)), **out, "seconds": round(time.perf_counter() - t, 1)}
            except Exception as e:  # one broken check must not hide the others
                traceback.print_exc()
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            print(("PASS " if RESULTS[name]["ok"] else "FAIL ") + name, json.dumps(RESULTS[name]), flush=True)
        return run
    return wrap


def cuda_time(fn, repeat=5, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def medium(**kw):  # ~125M-parameter llama-style model
    return preset("llama-small", vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                  max_seq_len=1024, **kw)


@check("bf16_autocast_training")
def bf16_training():
    from lmstack.train.precision import Precision

    prec = Precision.resolve("auto", DEV)
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=256, max_seq_len=128)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = torch.randint(0, 256, (8, 65), device=DEV)
    losses = []
    for _ in range(40):
        with prec.autocast():
            logits = model(rows[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        prec.backward(loss)
        prec.step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"ok": prec.name == "bf16" and logits.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in
                                                                                 model.parameters())
            and losses[-1] < 0.5 * losses[0], "precision": prec.name, "logits_dtype": str(logits.dtype),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


@check("sdpa_flash_matches_naive")
def sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, kv in (("mha", 8), ("gqa", 2)):
        torch.manual_seed(0)
        cfg = preset("llama-tiny", vocab_size=512, d_model=512, n_layers=2, n_heads=8, n_kv_heads=kv, max_seq_len=512)
        ref = Transformer(cfg.replace(attn_backend="naive")).to(DEV).eval()
        fast = Transformer(cfg).to(DEV).eval()
        fast.load_state_dict(ref.state_dict())
        block = Transformer(cfg.replace(attn_backend="blockwise")).to(DEV).eval()
        block.load_state_dict(ref.state_dict())
        ids = torch.randint(0, 512, (2, 512), device=DEV)
        with torch.no_grad():
            want = ref(ids).float()
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
                got = fast(ids).float()  # raises if the flash kernel cannot run these inputs
            blk = block(ids).float()
        out[name] = {"flash_bf16_vs_naive_fp32": float((got - want).abs().max()),
                     "blockwise_vs_naive_fp32": float((blk - want).abs().max()), "logit_scale": float(want.abs().max())}
    ok = all(v["flash_bf16_vs_naive_fp32"] < 0.05 * v["logit_scale"] + 0.05 and v["blockwise_vs_naive_fp32"] < 1e-3
             for v in out.values())
    return {"ok": ok, **out}


def _init_single_rank_pg():
    from lmstack.train.distributed import DistributedConfig
    from lmstack.train.parallel.setup import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return init_distributed(DistributedConfig(strategy="fsdp2", backend="nccl"))


@check("fsdp2_and_ddp_on_nccl")
def fsdp_nccl():
    import torch.distributed as dist

    from lmstack.train import distributed as D

    rank, world, device = _init_single_rank_pg()
    out = {"backend": dist.get_backend(), "world_size": world}
    try:
        rows = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1)).to(device)

        def losses(strategy):
            torch.manual_seed(0)
            model = Transformer(preset("qwen2-tiny", vocab_size=256, max_seq_len=64))
            cfg = D.DistributedConfig(strategy=strategy, backend="nccl")
            model = D.parallelize(model, cfg, device)
            opt = D.wrap_optimizer(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), cfg)
            seen = []
            for _ in range(5):
                loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
                loss.backward()
                D.clip_grad_norm_(list(model.parameters()), 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
                seen.append(float(loss))
            return seen, type(model).__name__

        plain, _ = losses("none")
        for strategy in ("fsdp2", "ddp"):
            got, kind = losses(strategy)
            out[strategy] = {"max_loss_diff": max(abs(a - b) for a, b in zip(got, plain)), "wrapped": kind,
                             "loss_first_last": [round(got[0], 4), round(got[-1], 4)]}
    finally:
        dist.destroy_process_group()
    return {"ok": all(out[s]["max_loss_diff"] < 1e-4 for s in ("fsdp2", "ddp")), **out}


@check("engine_greedy_equals_generate")
def engine():
    import lmstack
    from lmstack.model.reference_decode import reference_decode

    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=300, max_seq_len=256)).to(DEV).eval()
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 17, 40)]
    llm = lmstack.LLM(model, device="cuda", gpu_memory_utilization=0.3)  # the pool is sized from free memory
    outs = llm.generate(prompts, lmstack.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    same = []
    for p, o in zip(prompts, outs):
        ref = reference_decode(model, torch.tensor([p], device=DEV), 24, temperature=0.0)[0, len(p):].tolist()
        same.append(ref == o.outputs[0].token_ids)
    return {"ok": all(same), "identical": same}


@check("train_speed_bf16_vs_fp32_and_vs_transformers")
def train_speed():
    from lmstack.train.precision import Precision

    torch.manual_seed(0)
    cfg = medium()
    model = Transformer(cfg).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    rows = torch.randint(0, cfg.vocab_size, (8, 1025), device=DEV)

    def step(prec):
        def fn():
            with prec.autocast():
                loss = F.cross_entropy(model(rows[:, :-1]).float().flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    tokens = rows[:, :-1].numel()
    bf16 = tokens / cuda_time(step(Precision.resolve("bf16", DEV)))
    fp32 = tokens / cuda_time(step(Precision.resolve("fp32", DEV)))
    out = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "tokens_per_s_bf16": round(bf16),
           "tokens_per_s_fp32": round(fp32), "bf16_over_fp32": round(bf16 / fp32, 2)}
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                          num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=1024,
                                          tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")).to(DEV)
        hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

        def hstep():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(hf(rows[:, :-1]).logits.float().flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            hopt.step()
            hopt.zero_grad(set_to_none=True)

        hf_tps = tokens / cuda_time(hstep)
        out.update(transformers_tokens_per_s_bf16=round(hf_tps), ours_over_transformers=round(bf16 / hf_tps, 3),
                   transformers_params_M=round(sum(p.numel() for p in hf.parameters()) / 1e6, 1))
        del hf, hopt
    except Exception as e:
        out["transformers_error"] = f"{type(e).__name__}: {e}"[:300]
    return {"ok": bf16 > fp32, **out}


@check("attention_flash_vs_naive")
def attention_speed():
    out = {}
    for t in (2048, 4096):
        cfg = preset("llama-tiny", vocab_size=1024, d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, max_seq_len=t)
        ids = torch.randint(0, 1024, (4, t), device=DEV)
        for backend in ("sdpa", "naive"):
            model = Transformer(cfg.replace(attn_backend=backend)).to(DEV).eval()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                sec = cuda_time(lambda: model(ids, return_hidden=True))
            out[f"T{t}_{backend}"] = {"ms": round(1e3 * sec, 2),
                                      "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            del model
        out[f"T{t}_speedup"] = round(out[f"T{t}_naive"]["ms"] / out[f"T{t}_sdpa"]["ms"], 2)
    return out


@check("decode_engine_vs_transformers")
def decode_speed():
    import lmstack

    torch.manual_seed(0)
    cfg = medium(tie_embeddings=False)
    model = Transformer(cfg).to(DEV, torch.bfloat16).eval()
    prompts = [torch.randint(3, cfg.vocab_size, (64,)).tolist() for _ in range(16)]
    params = lmstack.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm = lmstack.LLM(model, device="cuda", dtype=torch.bfloat16, max_num_seqs=16,
                      gpu_memory_utilization=0.3)  # leaves room for transformers in the same process
    llm.generate(prompts[:2], lmstack.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    ours = 16 * 128 / (time.perf_counter() - t)
    out = {"engine_tokens_per_s": round(ours)}
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                          num_key_value_heads=cfg.n_kv_heads, tie_word_embeddings=False)
                              ).to(DEV, torch.bfloat16).eval()
        ids = torch.tensor(prompts, device=DEV)
        hf.generate(ids[:2], max_new_tokens=8, do_sample=False, min_new_tokens=8)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize()
        base = 16 * 128 / (time.perf_counter() - t)
        out.update(transformers_tokens_per_s=round(base), ratio=round(ours / base, 3))
    except Exception as e:
        out["transformers_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def _engine_logits(graphs: bool, backend: str = "sdpa", dtype=torch.float32):
    """Greedy tokens and every step's logits of a small batch through the engine (tiny llama, CUDA)."""
    import lmstack
    from lmstack.infer.engine import LLMEngine

    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=300, max_seq_len=256)).to(DEV, dtype).eval()
    eng = LLMEngine(model, max_num_seqs=8, block_size=16, num_blocks=64, dtype=dtype, device="cuda",
                    max_model_len=256, cuda_graphs=graphs, attention_backend=backend)
    seen, run = [], eng.runner.run
    eng.runner.run = lambda plan, *a: seen.append(run(plan, *a).float().cpu()) or seen[-1].to(DEV)
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate((5, 17, 40, 9, 23)):
        eng.add_request(f"r{i}", torch.randint(3, 300, (n,), generator=g).tolist(),
                        lmstack.SamplingParams(max_tokens=12 + 4 * i, temperature=0.0, ignore_eos=True))
    tokens = {o.request_id: o.outputs[0].token_ids for o in eng.run_to_completion()}
    return tokens, seen, eng


@check("decode_cuda_graphs_equal_eager")
def decode_graphs():
    import warnings

    import lmstack

    eager_tokens, eager_logits, _ = _engine_logits(False)
    graph_tokens, graph_logits, eng = _engine_logits(True)
    diff = max(float((a - b).abs().max()) for a, b in zip(eager_logits, graph_logits))
    out = {"identical_tokens": eager_tokens == graph_tokens, "max_logit_diff": diff,
           "replays": eng.runner.graphs.replays, "graphs_captured": len(eng.runner.graphs.entries)}
    # host syncs per pure decode step (torch's sync debug mode warns once per synchronising call)
    eng.add_request("sync", list(range(3, 20)), lmstack.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(20):
                eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out["host_syncs_per_decode_step"] = sum("synchroniz" in str(w.message) for w in caught) / 20
    # speed: 16 sequences of a ~125M model, bf16, decode with and without graphs
    speed = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = Transformer(medium(tie_embeddings=False)).to(DEV, torch.bfloat16).eval()
        llm = lmstack.LLM(model, device="cuda", dtype=torch.bfloat16, max_num_seqs=16, max_model_len=512,
                          num_blocks=16 * 32 + 8, cuda_graphs=graphs)
        prompts = [torch.randint(3, 32000, (64,)).tolist() for _ in range(16)]
        params = lmstack.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params)  # warm-up (captures)
        sync_t = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        speed["graphs" if graphs else "eager"] = round(16 * 128 / (time.perf_counter() - sync_t))
        del llm, model
    out.update(tokens_per_s_16_seqs=speed, graphs_over_eager=round(speed["graphs"] / speed["eager"], 3))
    return {"ok": out["identical_tokens"] and diff < 1e-3 and out["replays"] > 0, **out}


@check("device_sampling_matches_cpu")
def device_sampling():
    from lmstack.infer import SamplingParams
    from lmstack.infer import logits_processors as lp
    from lmstack.infer.sampler import Sampler, seeded_generator
    from lmstack.infer.sequence import Request

    def seqs(params):
        out = []
        for i, p in enumerate(params):
            seq = Request(f"r{i}", None, [1, 2, 3, 4], p).seqs[0]
            seq.output_ids.extend([5, 6, 5, 30])  # every row the same history: one distribution
            seq.generator = seeded_generator(p.seed, 0)  # as the request builder does (None without a seed)
            out.append(seq)
        return out

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 3
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, frequency_penalty=0.7, logit_bias={7: 4.0})] * 2
    cpu_tok, _ = Sampler(0).sample(seqs(greedy), logits)
    dev_tok, _ = Sampler(0, device=DEV).sample(seqs(greedy), logits.to(DEV))
    # sampled rows: 4000 draws of one processed distribution on the device vs its CPU probabilities
    params = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02, top_k=50, repetition_penalty=1.2,
                            presence_penalty=0.3)
    row = logits[:1].expand(4000, -1).contiguous()
    want = lp.process(row[:1], [lp.SamplingRow(params, [1, 2, 3, 4], [5, 6, 5, 30])]).softmax(-1)[0]
    sampler = Sampler(1, device=DEV)
    tokens, _ = sampler.sample(seqs([params] * 4000), row.to(DEV))
    freq = torch.bincount(torch.tensor(tokens), minlength=1000).float() / 4000
    dist_err = float((freq - want).abs().max())
    seeded = SamplingParams(temperature=1.0, seed=42, top_p=0.95)
    a, _ = Sampler(2, device=DEV).sample(seqs([seeded] * 4), logits[:4].to(DEV))
    b, _ = Sampler(3, device=DEV).sample(seqs([seeded] * 4), logits[:4].to(DEV))
    gens = seqs([seeded])
    Sampler(0, device=DEV).sample(gens, logits[:1].to(DEV))
    out = {"greedy_identical": cpu_tok == dev_tok, "sampled_max_freq_err": round(dist_err, 4),
           "banned_drawn": int((freq[want == 0] > 0).sum()), "seeded_reproducible": a == b,
           "seeded_generator_device": str(gens[0].generator.device)}
    # 4000 draws: a frequency's standard error is at most 0.008; allow 4 of them
    return {"ok": out["greedy_identical"] and dist_err < 0.032 and out["banned_drawn"] == 0 and a == b
            and gens[0].generator.device.type == "cuda", **out}


@check("kv_pool_sized_from_free_memory")
def kv_pool():
    import lmstack
    from lmstack.infer.engine import LLMEngine
    from lmstack.infer.kv_pool_sizing import bytes_per_block

    torch.manual_seed(0)
    model = Transformer(medium(tie_embeddings=False)).to(DEV, torch.bfloat16).eval()
    util = 0.5
    eng = LLMEngine(model, dtype=torch.bfloat16, device="cuda", max_model_len=1024, gpu_memory_utilization=util)
    total = torch.cuda.get_device_properties(0).total_memory
    pool = eng.runner.cache.nbytes()
    per = bytes_per_block(model.config, torch.bfloat16, eng.block_size)
    used = torch.cuda.memory_allocated()
    out = {"num_blocks": eng.num_blocks, "pool_GiB": round(pool / 2**30, 2), "allocated_GiB": round(used / 2**30, 2),
           "budget_GiB": round(util * total / 2**30, 2), "bytes_per_block": per}
    eng.add_request("x", list(range(3, 200)), lmstack.SamplingParams(max_tokens=8, temperature=0.0))
    eng.run_to_completion()
    out["peak_GiB_after_a_request"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del eng, model
    torch.cuda.empty_cache()
    return {"ok": out["num_blocks"] > 1000 and used <= util * total * 1.02, **out}


@check("flex_paged_backend_equals_sdpa")
def flex_backend():
    import lmstack

    sdpa_tokens, sdpa_logits, _ = _engine_logits(False, "sdpa")
    flex_tokens, flex_logits, _ = _engine_logits(False, "flex")
    diff = max(float((a - b).abs().max()) for a, b in zip(sdpa_logits, flex_logits))
    speed = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = Transformer(medium(tie_embeddings=False)).to(DEV, torch.bfloat16).eval()
        llm = lmstack.LLM(model, device="cuda", dtype=torch.bfloat16, max_num_seqs=16, max_model_len=512,
                          num_blocks=16 * 32 + 8, attention_backend=backend, cuda_graphs=False)
        prompts = [torch.randint(3, 32000, (64,)).tolist() for _ in range(16)]
        params = lmstack.SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params)  # warm-up (flex compiles)
        t = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        speed[backend] = round(16 * 64 / (time.perf_counter() - t))
        del llm, model
    return {"ok": sdpa_tokens == flex_tokens and diff < 1e-3, "identical_tokens": sdpa_tokens == flex_tokens,
            "max_logit_diff": diff, "tokens_per_s_16_seqs_eager_steps": speed,
            "flex_over_sdpa": round(speed["flex"] / speed["sdpa"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    RESULTS["device"] = {"ok": True, "name": torch.cuda.get_device_name(), "torch": torch.__version__}
    for fn in (bf16_training, sdpa_flash, fsdp_nccl, engine, train_speed, attention_speed, decode_speed,
               decode_graphs, device_sampling, kv_pool, flex_backend):
        fn()
    text = json.dumps({"date": time.strftime("%Y-%m-%d"), "results": RESULTS}, indent=1)
    path = Path(__file__).resolve().parent / "results" / "cuda_check.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cuda_check.json").write_text(text)
    print("all checks passed" if all(r.get("ok", True) for r in RESULTS.values()) else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
