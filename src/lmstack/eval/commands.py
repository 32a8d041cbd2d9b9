"""`lmstack eval`: evaluate a model directory or an OpenAI-compatible server on named tasks.

Usage:
    lmstack eval --model runs/tiny --tasks arc_easy,hellaswag --num_fewshot 0 --limit 200 --out runs/tiny/eval
    lmstack eval --model http://127.0.0.1:8000 --tasks arc_easy --tokenizer runs/tiny --limit 50
    lmstack eval --model runs/tiny --tasks list          # print the available tasks
"""
from __future__ import annotations

import math

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate as run_eval
from lmstack.eval.openai_lm import OpenAICompletionsLM, api_key_from_env, auth_error, completions_url
from lmstack.eval.task import list_tasks
from lmstack.eval.task_args import available_tasks, resolve_tasks
from lmstack.threads import set_threads


def _server_model(url: str, api_key: str | None = None, name: str | None = None) -> tuple[str, int | None]:
    """(name, context length or None) of the model a server answers to: `name` if given, else the first
    one it lists at /v1/models (vLLM and lmstack serve report `max_model_len` there)."""
    # lazy: heavy (httpx), which this module does not import at its top
    import httpx

    models_url = completions_url(url).rsplit("/", 1)[0] + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(models_url, timeout=30.0, headers=headers)
        if r.status_code == 401:  # not "lists no models": say what is wrong
            raise auth_error(models_url, bool(api_key))
        if r.status_code != 200:
            raise LmstackError(f"cannot list the models at {models_url}: it answered {r.status_code}; "
                               "pass --model_name")
        data = r.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise LmstackError(f"cannot list the models at {models_url}: {e}; pass --model_name") from None
    if not data:
        raise LmstackError(f"{models_url} lists no models; pass --model_name")
    card = next((m for m in data if m.get("id") == name), data[0] if name is None else {})
    context = card.get("max_model_len")
    return name or card["id"], context if isinstance(context, int) and context > 1 else None


def format_table(output: dict) -> str:
    """A plain-text table: task, metric, value ± stderr, chance, n (skipped tasks say why)."""
    rows = [("task", "metric", "value", "stderr", "chance", "n")]
    for name, entry in output["results"].items():
        if "skipped" in entry:
            rows.append((name, "skipped", entry["skipped"][:60], "", "", ""))
            continue
        chance = entry.get("chance")
        for metric, value in entry["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            err = entry["metrics"].get(f"{metric}_stderr")
            rows.append((name, metric, f"{value:.4f}",
                         "" if err is None or (isinstance(err, float) and math.isnan(err)) else f"{err:.4f}",
                         "" if chance is None else f"{chance:.4f}", str(entry["n"])))
            name = ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def evaluate(model: str, tasks: str, num_fewshot: int | None = None, limit: int | None = None, out: str | None = None,
             batch_size: int = 16, device: str = "auto", max_length: int | None = None,
             tokenizer: str | None = None, model_name: str | None = None, api_key: str | None = None,
             chat_template: bool = False,
             seed: int = 1234, bootstrap_iters: int = 1000, progress: bool = True,
             threads: int = 0, include_path: str | None = None, dtype: str = "float32",
             max_model_gib: float | None = None) -> dict | list[str]:
    """Evaluate a model on tasks and print a results table; with --out, write results.json and per-item logs.

    Args:
        model: a model directory, or the URL of an OpenAI-compatible server (starts with http).
        tasks: comma-separated task names, each with optional arguments: name:key=value,key=value (e.g.
            multiple_choice:path=my.jsonl,lambada:path=lam.jsonl; quote a value holding a comma:
            'multiple_choice:path="a,b.jsonl"'), or 'list' to print the available tasks.
        num_fewshot: few-shot examples per prompt (drawn with a fixed seed, never the item itself); default:
            each task's own (an lm-eval YAML's num_fewshot), else 0.
        limit: evaluate only the first N items of each task.
        out: output directory for results.json and samples_<task>.jsonl.
        batch_size: sequences per forward pass (local) or prompts per HTTP request (server).
        device: auto, cpu or cuda (local models).
        max_length: context window in tokens (default: the model's; for a server, its context minus one).
        tokenizer: tokenizer directory (default: the model directory; for a server, optional).
        model_name: the model name a server answers to (default: the first one it lists).
        api_key: key for a server that requires one (default: $OPENAI_API_KEY, else $LMSTACK_API_KEY).
        chat_template: wrap prompts in the tokenizer's chat template.
        seed: seed for few-shot sampling and bootstrap standard errors.
        bootstrap_iters: bootstrap resamples for standard errors (0 = none).
        progress: show a progress bar.
        include_path: a directory of lm-evaluation-harness task YAMLs (local json/csv data) whose tasks
            --tasks may name.
        threads: CPU threads for torch: 0 = auto (the cores this process may use, minus those other processes keep busy
            right now; at least 1), N = exactly N.
        dtype: weights' dtype for a local model: float32 (default: scores do not move with the device or the
            checkpoint's bf16/fp16), bfloat16, float16, or auto (bf16 on CUDA, fp32 on CPU).
        max_model_gib: refuse a local model whose config.json needs more memory than this many GiB, estimated
            before allocating; default: 64 or this machine's RAM, the smaller.
    """

    if tasks.strip() == "list":
        names = available_tasks(include_path)
        print("\n".join(names))
        return names
    # An unknown name or argument fails here, listing what exists, before a model is loaded.
    chosen = resolve_tasks(tasks, include_path)
    if not chosen:
        raise LmstackError(f"--tasks is empty; available tasks: {', '.join(list_tasks())}")

    set_threads(threads)
    if model.startswith(("http://", "https://")):
        key = api_key if api_key is not None else api_key_from_env()
        name, context = (model_name, None) if model_name and max_length else _server_model(model, key, model_name)
        # the server's context minus one: a loglikelihood request echoes the prompt and asks one more token
        lm = OpenAICompletionsLM(model, name, api_key=key, tokenizer=tokenizer, batch_size=batch_size,
                                 max_length=max_length or (context - 1 if context else 2048))
    else:
        # lazy: heavy (numpy, torch), which this module does not import at its top
        from lmstack.eval.local_lm import LocalLM
        from lmstack.model.load_guard import set_max_model_gib

        set_max_model_gib(max_model_gib)
        lm = LocalLM(model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device,
                     chat_template=chat_template, dtype=dtype)
    output = run_eval(lm, chosen, num_fewshot=num_fewshot, limit=limit, seed=seed, chat_template=chat_template,
                      bootstrap_iters=bootstrap_iters, out_dir=out, progress=progress)
    print(format_table(output))
    if out:
        print(f"wrote {out}/results.json")
    return output


COMMANDS = evaluate
