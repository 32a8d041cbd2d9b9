"""Bring your own model, end to end (issue 17 §7): a tiny random Qwen2 and a tiny random Llama directory, made by
transformers and tokenizers alone (no lmstack code), each with a real published chat template, BOS/EOS and a list of
EOS ids in generation_config.json, go through the real CLI: `model info`, `generate` (greedy ids equal transformers'
`generate`), `serve` with the openai client (chat, streamed chat, completion; the chat prompt ids on /tokenize equal
transformers' `apply_chat_template`), and `chat` scripted through stdin.

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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

from lmstack.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there, how are you?"}]
PROMPT_TEXT = "the cat sat on the"

# A few hundred short lines for the BPE trainer: words a chat uses, punctuation, and some non-ASCII text.
WORDS = ("the cat sat on mat dog ran to park hello there how are you today system user assistant be brief "
         "yes no maybe please thank good morning night answer question what why when where who").split()
LINES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 6)) + ("?" if i % 3 else ".")
         for i in range(300)] + ["Grüße aus Köln", "日本語のテキスト", "naïve café 🙂"] * 10

# family -> (template file, special tokens, bos, eos, the eos list of generation_config.json)
FAMILIES = {
    "qwen2": ("qwen2.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              ["<|im_end|>", "<|endoftext|>"]),
    "llama": ("llama3.jinja", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>",
              ["<|end_of_text|>", "<|eot_id|>"]),
}


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    template, specials, bos, eos, _ = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:  # Llama-3's tokenizer.json prepends <|begin_of_text|> to plain text, as the real one does
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    extra = {"pad_token": "<|endoftext|>"} if family == "qwen2" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                   chat_template=(FIXTURES / template).read_text(), **extra)


def _build(family: str, path: Path):
    hf_tok = _tokenizer(family)
    eos_list = [hf_tok.convert_tokens_to_ids(t) for t in FAMILIES[family][4]]
    sizes = dict(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    if family == "qwen2":  # Qwen2's tokenizer has no BOS; its config.json names <|endoftext|>, as the real one does
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, bos_token_id=hf_tok.convert_tokens_to_ids("<|endoftext|>")))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes, bos_token_id=hf_tok.bos_token_id))
    model.eval().save_pretrained(path)
    hf_tok.save_pretrained(path)
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen["eos_token_id"] = eos_list
    gen_file.write_text(json.dumps(gen))
    return model, hf_tok, eos_list


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def byo(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"byo_{request.param}")
    model, hf_tok, eos_list = _build(request.param, d)
    return request.param, d, model, hf_tok, eos_list


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
