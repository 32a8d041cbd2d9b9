"""Bring your own model, end to end (issue 17 §7): a tiny random Qwen2 and a tiny random Llama directory, made by
transformers and tokenizers alone (tests/hf_tiny.py; no lmstack code), each with a real published chat template,
BOS/EOS and a list of EOS ids in generation_config.json, go through the real CLI:
1. `model info` names the family and its parameter count;
2. `generate`: greedy ids equal transformers' `generate` (and stop on the eos list's second id);
3. `serve` with the openai client: chat, streamed chat, completion; the chat prompt ids on /tokenize equal
   transformers' `apply_chat_template`;
4. `eval --tasks arc_easy --limit 20`: per-item log-likelihoods equal lm-eval's `hf` backend on lm-eval's own
   arc_easy YAML (within 1e-4), and so do acc and acc_norm;
5. `finetune --method lora` for 5 steps on chat rows the directory's own template renders: peft's
   PeftModel.from_pretrained loads the adapter on the transformers model, with our logits (<= 1e-4);
6. `align --method dpo` for 3 steps on TRL conversational preference rows: transformers loads the saved model,
   whose logits moved;
7. `chat`, scripted through stdin.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/e2e/test_bring_your_own_model.py
"""
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_tiny
import lmstack
from lmeval_witness import compare_multiple_choice
from lmstack.adapt.finetune import load_result
from lmstack.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there, how are you?"}]
PROMPT_TEXT = "the cat sat on the"
LINES = hf_tiny.LINES
FAMILIES = {"qwen2": "qwen2", "llama": "llama3"}  # family -> the published template and tokens it is built with


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def byo(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(f"byo_{family}")
    # Llama-3's tokenizer.json prepends <|begin_of_text|> to plain text, as the real one does
    model, hf_tok = hf_tiny.build_dir(d, family, style=FAMILIES[family], bos_in_text=family == "llama")
    return family, d, model, hf_tok, hf_tiny.eos_ids(hf_tok, FAMILIES[family])


def _cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _ids(rendered) -> list[int]:
    return rendered if isinstance(rendered, list) else list(rendered["input_ids"])


def test_model_info_names_the_family(byo):
    family, d, model, *_ = byo
    r = _cli("model", "info", "--model", str(d))
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.startswith("model "))
    assert fields.get("model", "").strip() == family, r.stdout
    total = re.search(r"^total parameters\s+([\d,]+)", r.stdout, flags=re.M)
    assert total and int(total.group(1).replace(",", "")) == model.num_parameters(), r.stdout


def _greedy_pair(d: Path, model, prompt: list[int], eos_list: list[int], capsys) -> tuple[list[int], list[int]]:
    """(lmstack generate's greedy ids, transformers generate's greedy ids) for one prompt, 12 new tokens at most."""
    capsys.readouterr()
    rc = main(["generate", "--model", str(d), "--prompt_ids", json.dumps(prompt), "--max_tokens", "12",
               "--temperature", "0", "--device", "cpu", "--json_output", "true"])
    out = capsys.readouterr().out
    assert rc in (0, None), out
    got = json.loads(out.splitlines()[0])["completions"][0]["token_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, eos_token_id=eos_list,
                             pad_token_id=eos_list[0])[0, len(prompt):].tolist()
    return got, ref


def test_greedy_generate_equals_transformers(byo, capsys, tmp_path):
    family, d, model, hf_tok, eos_list = byo
    prompt = hf_tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    got, ref = _greedy_pair(d, model, prompt, eos_list, capsys)
    assert got == ref and len(got) == 12, (family, got, ref)  # this prompt runs to max_tokens in both

    # The same directory with the lm_head row of the list's SECOND eos id (not config.json's eos_token_id)
    # scaled x3: greedy decoding now ends on it mid-way, and both must stop at the same place.
    stopper = tmp_path / "stopper"
    shutil.copytree(d, stopper)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.lm_head.weight[eos_list[1]] *= 3.0
    scaled.save_pretrained(stopper)
    shutil.copy(d / "generation_config.json", stopper / "generation_config.json")  # keep the eos list
    got, ref = _greedy_pair(stopper, scaled, hf_tok(LINES[2], add_special_tokens=False)["input_ids"], eos_list,
                            capsys)
    assert got == ref, (family, got, ref)
    assert 1 < len(got) < 12 and got[-1] == eos_list[1], (family, got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_the_openai_client(byo, tmp_path):
    from openai import OpenAI

    family, d, model, hf_tok, eos_list = byo
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(d), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--max_model_len", "256", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited early: {(tmp_path / 'serve.log').read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 90 s"
            time.sleep(0.3)

        want = _ids(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
        shown = httpx.post(f"{url}/tokenize", json={"messages": CHAT}, timeout=30).json()["tokens"]
        assert shown == want
        plain = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT_TEXT}, timeout=30).json()["tokens"]
        assert plain == hf_tok(PROMPT_TEXT)["input_ids"]  # Llama's tokenizer.json adds <|begin_of_text|> here

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
        name = client.models.list().data[0].id
        chat = client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.prompt_tokens == len(want) and 1 <= chat.usage.completion_tokens <= 8
        with torch.no_grad():  # the served greedy reply is transformers' greedy reply to the same template ids
            ref = model.generate(torch.tensor([want]), attention_mask=torch.ones(1, len(want), dtype=torch.long),
                                 do_sample=False, max_new_tokens=8, eos_token_id=eos_list,
                                 pad_token_id=eos_list[0])[0, len(want):].tolist()
        assert chat.usage.completion_tokens == len(ref)
        # A random model emits byte-level fragments; the server (as vLLM's incremental detokenizer does) holds back
        # a trailing incomplete UTF-8 sequence, which decode() shows as U+FFFD.
        assert chat.choices[0].message.content == hf_tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")

        stream = client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content  # greedy: streamed equals the whole reply

        done = client.completions.create(model=name, prompt=PROMPT_TEXT, max_tokens=6, temperature=0)
        assert done.choices[0].finish_reason in ("stop", "length") and 1 <= done.usage.completion_tokens <= 6
        assert done.usage.prompt_tokens == len(hf_tok(PROMPT_TEXT)["input_ids"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_chat_scripted_through_stdin(byo):
    family, d, *_ = byo
    r = _cli("chat", "--model", str(d), "--device", "cpu", "--temperature", "0", "--max_tokens", "8",
             stdin="hello there\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "model> " in r.stdout, r.stdout
    reply = r.stdout.split("model> ", 1)[1].split("\n", 1)[0]
    assert reply.strip(), r.stdout


# ---------------------------------------------------------------- step 4: eval arc_easy == lm-eval's hf backend
SHARED_ARC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "arc" / "arc_easy_test.jsonl"
N_ARC = 20


def _arc_rows(n: int) -> list[dict]:
    """n ARC-Easy rows in Hugging Face's layout (what lm-eval's arc_easy YAML reads): the first n of
    ../shared/data's copy when it is there, else made here from the tokenizer's lines (a clone without the data)."""
    if SHARED_ARC.is_file():
        raw = [json.loads(x) for x in SHARED_ARC.read_text(encoding="utf-8").splitlines()[:n]]
        raw = [(r["query"].removeprefix("Question: "), r["choices"], r["gold"]) for r in raw]
    else:
        raw = [(LINES[i], [LINES[i + 40 + k][:24] for k in range(4)], i % 4) for i in range(n)]
    return [{"id": f"q{i}", "question": q, "choices": {"text": list(c), "label": list("ABCDE"[:len(c)])},
             "answerKey": "ABCDE"[g]} for i, (q, c, g) in enumerate(raw)]


def test_eval_arc_easy_per_item_equals_lm_eval_hf(byo, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import yaml
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    import lm_eval

    family, d, *_ = byo
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "arc_easy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _arc_rows(N_ARC)), encoding="utf-8")

    r = _cli("eval", "--model", str(d), "--tasks", f"arc_easy:path={data}", "--limit", str(N_ARC), "--device", "cpu",
             "--out", str(tmp_path / "ours"), "--bootstrap_iters", "0", "--progress", "false", "--threads", "1")
    assert r.returncode == 0, r.stderr
    mine = [json.loads(x) for x in (tmp_path / "ours" / "samples_arc_easy.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "ours" / "results.json").read_text())
    assert len(mine) == N_ARC

    # lm-eval's own arc_easy YAML (its prompt, choices and metrics), pointed at the same local rows
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml").read_text())
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(data)}},
                  training_split=None, validation_split=None)
    config.pop("tag", None)
    theirs = ConfigurableTask(config=config)
    theirs.build_all_requests(rank=0, world_size=1, limit=N_ARC)
    worst, theirs_metrics = compare_multiple_choice(
        mine, theirs, HFLM(pretrained=str(d), dtype="float32", device="cpu", batch_size=8))
    assert worst < 1e-4, (family, worst)
    acc, acc_norm = theirs_metrics["acc"], theirs_metrics["acc_norm"]
    assert results["results"]["arc_easy"]["metrics"]["acc"] == pytest.approx(sum(acc) / N_ARC)
    assert results["results"]["arc_easy"]["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / N_ARC)


# ---------------------------------------------------------------- step 5: finetune lora -> peft loads it
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def test_finetune_lora_adapter_loads_in_peft_with_equal_logits(byo, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    family, d, model, hf_tok, _ = byo
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LINES[i]},
                          {"role": "assistant", "content": LINES[i + 1]}]} for i in range(12)]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    r = _cli("finetune", "--method", "lora", "--data", str(data), "--model", str(d), "--out", str(tmp_path / "ft"),
             "--train.steps", "5", "--train.eval_every", "0", "--train.progress", "false", "--train.threads", "1",
             "--optim.lr", "1e-2", "--batch_size", "4", "--seq_len", "64", "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "ft" / "data.json").read_text())
    assert summary["train"]["kept"] == len(rows), summary  # the directory's own template rendered every row

    ids = _ids(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                                       tmp_path / "ft" / "adapter").eval()
    ours = load_result(d, json.loads((tmp_path / "ft" / "summary.json").read_text())["result"]).eval()
    assert type(ours).__module__.startswith("lmstack.")  # our model with the adapter, not transformers'
    got, want = _logits(ours, ids), _logits(theirs, ids)
    assert (got - want).abs().max().item() <= 1e-4, (family, (got - want).abs().max().item())
    assert (want - _logits(model, ids)).abs().max().item() > 1e-3  # the adapter trained: it moves the logits


# ---------------------------------------------------------------- step 6: align dpo -> transformers loads it
def test_align_dpo_output_loads_in_transformers_and_moved(byo, tmp_path):
    family, d, model, hf_tok, eos_list = byo
    prefs = []
    for i in range(6):  # TRL's conversational preference rows, with and without a separate prompt
        prefs += [{"chosen": [{"role": "user", "content": LINES[i]}, {"role": "assistant", "content": "yes"}],
                   "rejected": [{"role": "user", "content": LINES[i]}, {"role": "assistant", "content": "no"}]},
                  {"prompt": [{"role": "user", "content": LINES[i + 9]}],
                   "chosen": [{"role": "assistant", "content": "good morning"}],
                   "rejected": [{"role": "assistant", "content": "the the"}]}]
    data = _write_jsonl(tmp_path / "prefs.jsonl", prefs)
    r = _cli("align", "--method", "dpo", "--model", str(d), "--data", str(data), "--out", str(tmp_path / "dpo"),
             "--train.steps", "3", "--batch_size", "2", "--optim.lr", "1e-3", "--train.progress", "false",
             "--train.threads", "1", "--max_len", "64")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["skipped_rows"] == 0

    out = tmp_path / "dpo" / "model"
    aligned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(aligned) is type(model)  # still the family the user brought
    ids = _ids(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    after = _logits(aligned, ids)
    assert (after - _logits(model, ids)).abs().max().item() > 1e-4  # it trained
    assert (_logits(lmstack.load_model(out), ids) - after).abs().max().item() <= 1e-4  # and we read back the same
    # and it still talks as the directory the user brought: its eos list, its tokenizer and template files
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos_list
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (d / name).read_bytes(), name
