"""Tensor-parallel serving on this CPU: the engine over 2 processes (gloo) against the same engine in 1 process.

The model is llama-base (~123M parameters, random weights, seed 0) with n_kv_heads=6 instead of 3, since 3 KV
heads do not split 2 ways. Both engines use the whole machine: 2 ranks on `--threads` // 2 threads each, against
one process on 1 and on `--threads` threads, the faster of which is the baseline (on a busy machine one thread
can beat two: see infer/threads.py). Workloads: batch 1 (one request)
and batch 8 (8 concurrent requests), `--prompt_len`-token random prompts, `--new_tokens` greedy tokens each
(EOS ignored); tokens/s is output tokens over wall-clock seconds. The two engines live in one process and run
alternately `--repeats` times, so load from other processes hits both alike; each keeps its best run (all
times are recorded). For the 2-rank engine, rank 0 also records where a step's time goes: seconds blocked in
the all-reduces (two per block; waiting for the slower rank included) and in sending the step to the worker.
Greedy outputs of both engines are compared token for token.

On one CPU socket, 2-way tensor parallelism cannot win: both ranks share the same cores and memory bandwidth,
and each step adds 2 x n_layers all-reduces plus one step message. It is measured here to show what it costs;
tensor parallelism pays when the model does not fit one device (on GPUs, with NCCL).

Usage:
    python benchmarks/tp_serving.py [--repeats 3] [--new_tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import result, write_result

import lmstack
from lmstack.infer import LLM, SamplingParams
from lmstack.model import Transformer, preset


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, threads: int) -> tuple[float, list, dict]:
    torch.set_num_threads(threads)
    tp = llm.engine.tp
    before = (tp.reduce.seconds, tp.reduce.calls, tp.send_seconds) if tp is not None else None
    steps = llm.engine.stats()["steps"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    secs = time.perf_counter() - start
    comm = {"steps": llm.engine.stats()["steps"] - steps}
    if tp is not None:
        comm.update(allreduce_s=tp.reduce.seconds - before[0], allreduces=tp.reduce.calls - before[1],
                    send_s=tp.send_seconds - before[2])
    return secs, [o.outputs[0].token_ids for o in outs], comm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="the machine's threads: each of 2 ranks gets half")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset("llama-base", n_kv_heads=6)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as d:
        model = Transformer(cfg).eval()
        n_params = model.num_parameters()
        lmstack.save_model(model, d)
        del model
        one = LLM(d, max_num_seqs=max(args.batches), enable_prefix_caching=False)
        torch.set_num_threads(args.threads)
        two = LLM(d, max_num_seqs=max(args.batches), enable_prefix_caching=False, tensor_parallel_size=2)
        engines = {f"tp1_threads{t}": (one, t) for t in sorted({1, args.threads})}
        engines["tp2"] = (two, max(1, args.threads // 2))
        try:
            results = []
            for batch in args.batches:
                prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
                           for _ in range(batch)]
                for llm, threads in engines.values():  # warm-up (first-call allocations, kernel builds)
                    run(llm, prompts, params, threads)
                times, outs, comms = {k: [] for k in engines}, {}, []
                for _ in range(args.repeats):
                    for name, (llm, threads) in engines.items():
                        secs, outs[name], comm = run(llm, prompts, params, threads)
                        times[name].append(secs)
                        if name == "tp2":
                            comms.append((secs, comm))
                tokens = batch * args.new_tokens
                tok_s = {k: tokens / min(v) for k, v in times.items()}
                base = max((k for k in tok_s if k != "tp2"), key=tok_s.get)
                secs, comm = min(comms, key=lambda c: c[0])  # the best tp2 run's breakdown
                same = sum(a == b for a, b in zip(outs[base], outs["tp2"]))
                per_step_ms = 1000 * secs / comm["steps"]
                reduce_ms = 1000 * comm["allreduce_s"] / comm["steps"]
                send_ms = 1000 * comm["send_s"] / comm["steps"]
                print(f"batch {batch}: 1 process " + ", ".join(f"{k[4:]} {v:.1f}" for k, v in tok_s.items() if k != "tp2")
                      + f" tok/s, 2 ranks {tok_s['tp2']:.1f} tok/s; "
                      f"per 2-rank step {per_step_ms:.1f} ms, of which all-reduces {reduce_ms:.1f} ms "
                      f"({comm['allreduces'] // comm['steps']} per step), step message {send_ms:.2f} ms; "
                      f"identical greedy outputs {same}/{batch}", flush=True)
                results.append(result(
                    "tp_serving", f"tokens_per_s_batch{batch}", True, round(tok_s["tp2"], 2),
                    f"the same engine in 1 process (its faster thread count: {base[4:]})", round(tok_s[base], 2),
                    preset="llama-base", n_kv_heads=6, params=n_params, tensor_parallel_size=2, backend="gloo",
                    threads_per_rank=max(1, args.threads // 2), batch=batch, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, dtype="float32", machine="2 cores, shared",
                    identical_greedy_outputs=f"{same}/{batch}",
                    tokens_per_s={k: round(v, 2) for k, v in tok_s.items()},
                    all_times_s={k: [round(t, 3) for t in v] for k, v in times.items()}))
                results.append(result(
                    "tp_serving", f"allreduce_ms_per_step_batch{batch}", False, round(reduce_ms, 3),
                    "the 2-rank step's wall time (ms)", round(per_step_ms, 3), batch=batch,
                    allreduces_per_step=comm["allreduces"] // comm["steps"],
                    allreduce_fraction_of_step=round(reduce_ms / per_step_ms, 3),
                    step_message_ms=round(send_ms, 3), steps=comm["steps"], machine="2 cores, shared"))
        finally:
            two.engine.close()
    write_result("tp_serving", results)


if __name__ == "__main__":
    main()
